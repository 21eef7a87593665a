//! From a bucket URL to a store: local directories, S3-compatible servers (this node's
//! credentials for its own bucket; a peer's published read key, or none, for theirs) and
//! memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::{Bucket, BucketOptions, Result, Secret, StorageError, TransferConfig};

/// An S3 store for a parsed `s3://bucket/prefix?endpoint=..&region=..&path_style=..` URL,
/// signed with `creds` or unsigned without them, through `connector` when given.
fn s3_store(
    parsed: &url::Url,
    creds: Option<(String, Secret)>,
    t: &TransferConfig,
    connector: Option<crate::endpoint::PeerConnector>,
) -> std::result::Result<(Arc<dyn ObjectStore>, ObjPath), String> {
    let bucket = parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| "missing bucket name".to_string())?;
    let q: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
    let region = q.get("region").cloned().unwrap_or_else(|| "us-east-1".into());
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_retry(RetryConfig { max_retries: 1, retry_timeout: t.timeout, backoff: Default::default() })
        .with_client_options(
            ClientOptions::new()
                .with_timeout(t.timeout)
                .with_connect_timeout(crate::protocol::CONNECT_TIMEOUT.min(t.timeout))
                .with_allow_http(q.get("endpoint").is_some_and(|e| e.starts_with("http://"))),
        );
    b = match creds {
        Some((key, secret)) => b.with_access_key_id(key).with_secret_access_key(secret.expose()),
        None => b.with_skip_signature(true),
    };
    if let Some(c) = connector {
        b = b.with_http_connector(c);
    }
    if let Some(ep) = q.get("endpoint") {
        b = b.with_endpoint(ep.clone());
    }
    let path_style = q.get("path_style").map(|v| v != "false").unwrap_or(q.contains_key("endpoint"));
    b = b.with_virtual_hosted_style_request(!path_style);
    let s3 = b.build().map_err(|e| e.to_string())?;
    Ok((Arc::new(s3), ObjPath::from(parsed.path().trim_matches('/'))))
}

fn memory_registry() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static REG: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

fn env_first(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

impl Bucket {
    /// Open the bucket named by `url`.
    pub fn open(url: &str, opts: &BucketOptions) -> Result<Self> {
        let invalid = |reason: String| StorageError::InvalidUrl { url: url.to_string(), reason };
        if !url.contains("://") {
            let abs = std::path::absolute(url).map_err(|e| invalid(e.to_string()))?;
            return Self::open(&format!("file://{}", abs.display()), opts);
        }
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjPath) = match parsed.scheme() {
            "file" => {
                let path = parsed.to_file_path().map_err(|_| invalid("not an absolute file path".into()))?;
                std::fs::create_dir_all(&path)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", path.display())))?;
                let fs = LocalFileSystem::new_with_prefix(&path).map_err(|e| invalid(e.to_string()))?;
                (Arc::new(fs), ObjPath::default())
            }
            "memory" => {
                let name = parsed.host_str().unwrap_or("default").to_string();
                let mut reg = memory_registry().lock().unwrap_or_else(|p| p.into_inner());
                let mem = reg.entry(name).or_insert_with(|| Arc::new(InMemory::new())).clone();
                (mem, ObjPath::from(parsed.path().trim_matches('/')))
            }
            "s3" => {
                let key_id = opts
                    .access_key_id
                    .clone()
                    .or_else(|| env_first(&["BISTRO_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"]))
                    .ok_or_else(|| invalid("no S3 access key (set --s3.access-key or AWS_ACCESS_KEY_ID)".into()))?;
                let secret = opts
                    .secret_access_key
                    .clone()
                    .or_else(|| env_first(&["BISTRO_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"]).map(Secret::new))
                    .ok_or_else(|| {
                        invalid("no S3 secret key (set BISTRO_S3_SECRET_ACCESS_KEY or --s3.secret-key-file)".into())
                    })?;
                s3_store(&parsed, Some((key_id, secret)), &opts.transfer, None).map_err(invalid)?
            }
            other => return Err(invalid(format!("unsupported scheme `{other}` (use file://, s3:// or memory://)"))),
        };
        Ok(Bucket { url: url.to_string(), store, prefix, transfer: opts.transfer.clone() })
    }

    /// Open a peer's bucket named by its committed `url`: read with the read-only key the
    /// peer published in the URL (`read_key`, `read_secret`) or unsigned when it published
    /// none, never with this node's keys; no redirects; internal addresses refused unless
    /// `allow_internal` (see [`crate::endpoint`]).
    pub fn open_peer(url: &str, transfer: &TransferConfig, allow_internal: bool) -> Result<Self> {
        let invalid = |reason: String| StorageError::InvalidUrl { url: url.to_string(), reason };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !parsed.scheme().eq_ignore_ascii_case("s3") {
            return Self::open(url, &BucketOptions { transfer: transfer.clone(), ..Default::default() });
        }
        crate::endpoint::check_peer_url(&parsed).map_err(|e| invalid(e.to_string()))?;
        let q: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        if let Some(ep) = q.get("endpoint")
            && !allow_internal
        {
            crate::endpoint::check_literal(ep).map_err(|e| invalid(e.to_string()))?;
        }
        let creds = match (q.get("read_key"), q.get("read_secret")) {
            (Some(k), Some(s)) => Some((k.clone(), Secret::new(s.clone()))),
            _ => None,
        };
        let connector = crate::endpoint::PeerConnector { timeout: transfer.timeout, allow_internal };
        let store = s3_store(&parsed, creds, transfer, Some(connector)).map_err(invalid)?;
        Ok(Bucket { url: url.to_string(), store: store.0, prefix: store.1, transfer: transfer.clone() })
    }
}
