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
//! the body and stop reading at the cap. Large objects (checkpoints) are read by
//! [`Bucket::get_large`]: a time limit scaled to their size, resumed after interruptions,
//! with progress reports.

mod config;
mod error;
mod large;
mod open;
mod retry;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

pub use config::{BucketOptions, Secret, TransferConfig};
pub use error::{Result, StorageError};
pub use large::{DownloadProgress, MAX_RESUMES, MIN_LARGE_RATE, ProgressHook, set_progress_hook};

/// The most keys a listing returns: far above what any node keeps (its history is bounded
/// by `max_history`), far below what would exhaust memory.
pub const MAX_LIST_ENTRIES: usize = 100_000;

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

impl Bucket {
    /// The URL this bucket was opened from (what goes on chain).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.as_ref().is_empty() { ObjPath::from(key) } else { self.prefix.clone().join(key) }
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
        let listed = self
            .retry("list", prefix, || {
                let base = base.clone();
                async move {
                    let metas: Vec<_> = self
                        .store
                        .list(if base.as_ref().is_empty() { None } else { Some(&base) })
                        .take(MAX_LIST_ENTRIES + 1)
                        .try_collect()
                        .await
                        .map_err(|e| self.classify("list", prefix, 1, e))?;
                    let metas_len = metas.len();
                    let strip = if base.as_ref().is_empty() { String::new() } else { format!("{}/", base.as_ref()) };
                    let mut out: Vec<ObjectInfo> = metas
                        .into_iter()
                        .filter_map(|m| {
                            let key =
                                m.location.as_ref().strip_prefix(&strip).unwrap_or(m.location.as_ref()).to_string();
                            key.starts_with(prefix).then_some(ObjectInfo {
                                key,
                                size: m.size,
                                last_modified: m.last_modified,
                            })
                        })
                        .collect();
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    Ok((out, metas_len))
                }
            })
            .await?;
        // A hostile listing (continuation tokens without end) stops here, not in memory
        // (red team 3, F13).
        if listed.1 > MAX_LIST_ENTRIES {
            return Err(StorageError::TooManyKeys {
                bucket: self.url.clone(),
                prefix: prefix.to_string(),
                limit: MAX_LIST_ENTRIES,
            });
        }
        Ok(listed.0)
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
