//! Buckets: one small API over `object_store` for local directories, S3-compatible stores
//! and memory.
//!
//! A bucket is named by a URL, so it can be committed on chain:
//!
//! * `file:///abs/path` (or a plain path): a local directory (the embedded default);
//! * `s3://bucket[/prefix]?endpoint=http://host:port&region=us-east-1&path_style=true`:
//!   AWS S3, Cloudflare R2, MinIO or any S3-compatible server; the owner's credentials come
//!   from [`BucketOptions`] (environment or a file), never from the URL. The URL may carry a
//!   read-only key for peers (`&read_key=..&read_secret=..`, public by design); peers read
//!   with exactly that, or unsigned ([`Bucket::open_peer`]);
//! * `memory://name`: an in-process store shared by every handle with the same name (tests).
//!
//! Uploads use multipart above a threshold; every operation has a timeout and retries
//! transient failures with exponential backoff; downloads check the size before reading
//! the body and stop reading at the cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};

/// Errors of bucket operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The bucket URL cannot be used.
    #[error("invalid bucket URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No object under this key.
    #[error("{bucket}: object `{key}` not found")]
    NotFound {
        /// The bucket URL.
        bucket: String,
        /// The key.
        key: String,
    },
    /// The object is larger than the caller allows.
    #[error("{bucket}: object `{key}` is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// The bucket URL.
        bucket: String,
        /// The key.
        key: String,
        /// Its size (or the bytes read before stopping).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The server refused the credentials.
    #[error("{bucket}: access denied for `{key}` (check the access key and secret): {source}")]
    Auth {
        /// The bucket URL.
        bucket: String,
        /// The key.
        key: String,
        /// The server's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The operation failed after all retries.
    #[error("{bucket}: {op} `{key}` failed after {attempts} attempt(s): {source}")]
    Failed {
        /// The bucket URL.
        bucket: String,
        /// The operation (`put`, `get`, ...).
        op: &'static str,
        /// The key.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for bucket operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Timeouts, retries and multipart settings.
#[derive(Clone, Debug)]
pub struct TransferConfig {
    /// Attempts per operation (1 = no retry).
    pub attempts: u32,
    /// First backoff delay; doubled after each failure.
    pub backoff: Duration,
    /// Limit for one attempt.
    pub timeout: Duration,
    /// Objects at least this large are uploaded in parts.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads (S3 requires at least 5 MiB for all but the last).
    pub part_size: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            attempts: 3,
            backoff: Duration::from_millis(200),
            timeout: Duration::from_secs(60),
            multipart_threshold: 8 * 1024 * 1024,
            part_size: 5 * 1024 * 1024,
        }
    }
}

/// A secret string (an S3 secret key): never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself (only to hand it to the S3 client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Credentials and transfer settings for opening this node's own bucket. Peers' buckets
/// are never opened with them ([`Bucket::open_peer`]).
#[derive(Clone, Debug, Default)]
pub struct BucketOptions {
    /// S3 access key id (else `BISTRO_S3_ACCESS_KEY_ID`, then `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// S3 secret (else `BISTRO_S3_SECRET_ACCESS_KEY`, then `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<Secret>,
    /// Timeouts and retries.
    pub transfer: TransferConfig,
}

/// Metadata of a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the bucket's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Server-side last-modified time.
    pub last_modified: DateTime<Utc>,
}

/// A downloaded object.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The body.
    pub bytes: Bytes,
    /// Server-side last-modified time.
    pub last_modified: DateTime<Utc>,
}

/// A bucket: an object store plus a key prefix, named by its URL.
#[derive(Clone, Debug)]
pub struct Bucket {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    transfer: TransferConfig,
}

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
                    .or_else(|| env_first(&["BISTRO_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"]).map(Secret))
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
        let q: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
        if let Some(ep) = q.get("endpoint")
            && !allow_internal
        {
            crate::endpoint::check_literal(ep).map_err(|e| invalid(e.to_string()))?;
        }
        let creds = match (q.get("read_key"), q.get("read_secret")) {
            (Some(k), Some(s)) => Some((k.clone(), Secret(s.clone()))),
            _ => None,
        };
        let connector = crate::endpoint::PeerConnector { timeout: transfer.timeout, allow_internal };
        let store = s3_store(&parsed, creds, transfer, Some(connector)).map_err(invalid)?;
        Ok(Bucket { url: url.to_string(), store: store.0, prefix: store.1, transfer: transfer.clone() })
    }

    /// The URL this bucket was opened from (what goes on chain).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.as_ref().is_empty() { ObjPath::from(key) } else { self.prefix.clone().join(key) }
    }

    fn classify(&self, op: &'static str, key: &str, attempts: u32, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { .. } => {
                StorageError::NotFound { bucket: self.url.clone(), key: key.into() }
            }
            object_store::Error::Unauthenticated { source, .. }
            | object_store::Error::PermissionDenied { source, .. } => {
                StorageError::Auth { bucket: self.url.clone(), key: key.into(), source }
            }
            other => StorageError::Failed {
                bucket: self.url.clone(),
                op,
                key: key.into(),
                attempts,
                source: Box::new(other),
            },
        }
    }

    /// Run `f` with a timeout per attempt, retrying transient failures with backoff.
    async fn retry<T, F, Fut>(&self, op: &'static str, key: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let attempts = self.transfer.attempts.max(1);
        let mut delay = self.transfer.backoff;
        let mut last = None;
        for attempt in 1..=attempts {
            let outcome = match tokio::time::timeout(self.transfer.timeout, f()).await {
                Ok(r) => r,
                Err(_) => Err(StorageError::Failed {
                    bucket: self.url.clone(),
                    op,
                    key: key.into(),
                    attempts: attempt,
                    source: Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("timed out after {:?}", self.transfer.timeout),
                    )),
                }),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(
                    e @ (StorageError::NotFound { .. }
                    | StorageError::Auth { .. }
                    | StorageError::TooLarge { .. }
                    | StorageError::InvalidUrl { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(bucket = %self.url, op, key, attempt, error = %e, "transient storage error");
                    last = Some(e);
                    if attempt < attempts {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
        Err(match last {
            Some(StorageError::Failed { bucket, op, key, source, .. }) => {
                StorageError::Failed { bucket, op, key, attempts, source }
            }
            Some(e) => e,
            None => StorageError::Failed {
                bucket: self.url.clone(),
                op,
                key: key.into(),
                attempts,
                source: "no attempt".into(),
            },
        })
    }

    /// Store `bytes` under `key` (multipart above the threshold).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(key);
        self.retry("put", key, || {
            let (path, bytes) = (path.clone(), bytes.clone());
            async move {
                if bytes.len() >= self.transfer.multipart_threshold {
                    let upload = self.store.put_multipart(&path).await.map_err(|e| self.classify("put", key, 1, e))?;
                    let mut w = WriteMultipart::new_with_chunk_size(upload, self.transfer.part_size);
                    w.put(bytes);
                    w.finish().await.map_err(|e| self.classify("put", key, 1, e))?;
                } else {
                    self.store
                        .put(&path, PutPayload::from(bytes))
                        .await
                        .map_err(|e| self.classify("put", key, 1, e))?;
                }
                Ok(())
            }
        })
        .await
    }

    /// Metadata of `key`.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo> {
        let path = self.path(key);
        self.retry("head", key, || {
            let path = path.clone();
            async move {
                let m = self.store.head(&path).await.map_err(|e| self.classify("head", key, 1, e))?;
                Ok(ObjectInfo { key: key.to_string(), size: m.size, last_modified: m.last_modified })
            }
        })
        .await
    }

    /// Download `key`, refusing objects over `max_bytes` before and while reading the body.
    pub async fn get(&self, key: &str, max_bytes: u64) -> Result<Fetched> {
        let path = self.path(key);
        self.retry("get", key, || {
            let path = path.clone();
            async move {
                let r = self.store.get(&path).await.map_err(|e| self.classify("get", key, 1, e))?;
                let too_large =
                    |size| StorageError::TooLarge { bucket: self.url.clone(), key: key.into(), size, limit: max_bytes };
                if r.meta.size > max_bytes {
                    return Err(too_large(r.meta.size));
                }
                let last_modified = r.meta.last_modified;
                let mut stream = r.into_stream();
                let mut buf = Vec::with_capacity(r_size_hint(max_bytes));
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| self.classify("get", key, 1, e))?;
                    if (buf.len() + chunk.len()) as u64 > max_bytes {
                        return Err(too_large((buf.len() + chunk.len()) as u64));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(Fetched { bytes: Bytes::from(buf), last_modified })
            }
        })
        .await
    }

    /// Objects whose key starts with `prefix` (keys relative to the bucket), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let base = self.prefix.clone();
        self.retry("list", prefix, || {
            let base = base.clone();
            async move {
                let metas: Vec<_> = self
                    .store
                    .list(if base.as_ref().is_empty() { None } else { Some(&base) })
                    .try_collect()
                    .await
                    .map_err(|e| self.classify("list", prefix, 1, e))?;
                let strip = if base.as_ref().is_empty() { String::new() } else { format!("{}/", base.as_ref()) };
                let mut out: Vec<ObjectInfo> = metas
                    .into_iter()
                    .filter_map(|m| {
                        let key = m.location.as_ref().strip_prefix(&strip).unwrap_or(m.location.as_ref()).to_string();
                        key.starts_with(prefix).then_some(ObjectInfo {
                            key,
                            size: m.size,
                            last_modified: m.last_modified,
                        })
                    })
                    .collect();
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            }
        })
        .await
    }

    /// Delete `key` (deleting a missing key is not an error).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match self
            .retry("delete", key, || {
                let path = path.clone();
                async move { self.store.delete(&path).await.map_err(|e| self.classify("delete", key, 1, e)) }
            })
            .await
        {
            Ok(()) | Err(StorageError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete this hotkey's slices (and checkpoints) older than `max_history` windows
    /// before `current_window`; returns how many were deleted.
    pub async fn cleanup(&self, hotkey: &str, current_window: u64, max_history: u64) -> Result<usize> {
        let mut deleted = 0;
        for obj in self.list("slice-").await? {
            let Some(rest) = obj.key.strip_prefix("slice-").and_then(|r| r.strip_suffix(".safetensors")) else {
                continue;
            };
            let Some((w, hk)) = rest.split_once('-') else { continue };
            let Ok(w) = w.parse::<u64>() else { continue };
            if hk == hotkey && w + max_history < current_window {
                self.delete(&obj.key).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

fn r_size_hint(max: u64) -> usize {
    max.min(64 * 1024 * 1024) as usize / 4
}

/// Download many objects with at most `concurrency` in flight; results are in request order.
pub async fn get_many(requests: &[(Bucket, String)], max_bytes: u64, concurrency: usize) -> Vec<Result<Fetched>> {
    futures::stream::iter(requests.iter().map(|(b, k)| b.get(k, max_bytes)))
        .buffered(concurrency.max(1))
        .collect()
        .await
}
