//! Large downloads (checkpoints): a time limit scaled to the object's size, resumption
//! with ranged reads after an interruption, and progress reports.
//!
//! A small object is read under one per-attempt timeout ([`Bucket::get`]); a `small`
//! checkpoint is half a gigabyte and a `1b` one many, which no fixed timeout fits. Here the
//! bucket's per-attempt timeout bounds a *stall* (no bytes for that long), and the whole
//! download may take `timeout + size / MIN_LARGE_RATE`. When the connection breaks or
//! stalls, the download goes on from the last byte received (`Range: bytes=N-`, with
//! `If-Match` on the object's ETag so that a replaced object is never spliced), at most
//! [`MAX_RESUMES`] times.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStoreExt};

use super::{Bucket, Fetched, Result, StorageError};

/// The slowest average rate a large download may have: its whole budget is the bucket's
/// timeout plus `size / MIN_LARGE_RATE` seconds (a `small` checkpoint, 539 MB: 9 min).
pub const MIN_LARGE_RATE: u64 = 1 << 20;

/// Interruptions a large download resumes from.
pub const MAX_RESUMES: u32 = 8;

/// Where a large download stands.
#[derive(Clone, Debug)]
pub struct DownloadProgress {
    /// The bucket's URL.
    pub bucket: String,
    /// The object.
    pub key: String,
    /// Bytes received.
    pub done: u64,
    /// The object's size.
    pub total: u64,
    /// Interruptions resumed from so far.
    pub resumes: u32,
    /// Time since the download started.
    pub elapsed: Duration,
    /// Whether this is the last report (the download is complete).
    pub finished: bool,
}

/// A receiver of download progress (a terminal bar, a log line).
pub type ProgressHook = Arc<dyn Fn(&DownloadProgress) + Send + Sync>;

static HOOK: RwLock<Option<ProgressHook>> = RwLock::new(None);

/// Send every large download's progress to `hook` (a binary draws a bar with it); `None`
/// restores the default, an INFO log line every tenth of the object.
pub fn set_progress_hook(hook: Option<ProgressHook>) {
    *HOOK.write().unwrap_or_else(|p| p.into_inner()) = hook;
}

fn report(p: &DownloadProgress, last_logged: &mut u64) {
    let hook = HOOK.read().unwrap_or_else(|e| e.into_inner()).clone();
    match hook {
        Some(h) => h(p),
        None => {
            let tenth = (p.done * 10).checked_div(p.total).unwrap_or(10);
            if tenth > *last_logged || p.finished {
                *last_logged = tenth;
                tracing::info!(
                    "downloading {} from {}: {:.1} of {:.1} MB ({}%), {:.1} MB/s{}",
                    p.key,
                    p.bucket,
                    p.done as f64 / 1e6,
                    p.total as f64 / 1e6,
                    (p.done * 100).checked_div(p.total).unwrap_or(100),
                    p.done as f64 / 1e6 / p.elapsed.as_secs_f64().max(1e-3),
                    if p.resumes > 0 { format!(", resumed {} time(s)", p.resumes) } else { String::new() }
                );
            }
        }
    }
}

impl Bucket {
    /// Download a large object (at most `max_bytes`): resumable, with a size-scaled time
    /// limit and progress reports (see the module documentation).
    pub async fn get_large(&self, key: &str, max_bytes: u64) -> Result<Fetched> {
        let path = self.path(key);
        let meta = tokio::time::timeout(self.transfer.timeout, self.store.head(&path))
            .await
            .map_err(|_| self.stalled("head", key, 1))?
            .map_err(|e| self.classify("head", key, 1, e))?;
        let total = meta.size;
        if total > max_bytes {
            return Err(StorageError::TooLarge {
                bucket: self.url.clone(),
                key: key.into(),
                size: total,
                limit: max_bytes,
            });
        }
        let budget = self.transfer.timeout + Duration::from_secs(total / MIN_LARGE_RATE);
        let start = Instant::now();
        let mut buf: Vec<u8> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut resumes = 0u32;
        let mut last_logged = 0u64;
        let mut last_report = Instant::now();
        let mut last_modified = meta.last_modified;
        let progress = |done: u64, resumes: u32, finished: bool| DownloadProgress {
            bucket: self.url.clone(),
            key: key.to_string(),
            done,
            total,
            resumes,
            elapsed: start.elapsed(),
            finished,
        };
        loop {
            let attempt = async {
                let opts = GetOptions {
                    if_match: meta.e_tag.clone(),
                    range: (!buf.is_empty()).then_some(GetRange::Offset(buf.len() as u64)),
                    ..Default::default()
                };
                let r = tokio::time::timeout(self.transfer.timeout, self.store.get_opts(&path, opts))
                    .await
                    .map_err(|_| self.stalled("get", key, resumes + 1))?
                    .map_err(|e| self.classify("get", key, resumes + 1, e))?;
                last_modified = r.meta.last_modified;
                let mut stream = r.into_stream();
                loop {
                    let next = tokio::time::timeout(self.transfer.timeout, stream.next())
                        .await
                        .map_err(|_| self.stalled("get", key, resumes + 1))?;
                    let Some(chunk) = next else { break };
                    let chunk = chunk.map_err(|e| self.classify("get", key, resumes + 1, e))?;
                    if (buf.len() + chunk.len()) as u64 > total {
                        return Err(StorageError::TooLarge {
                            bucket: self.url.clone(),
                            key: key.into(),
                            size: (buf.len() + chunk.len()) as u64,
                            limit: total,
                        });
                    }
                    buf.extend_from_slice(&chunk);
                    if last_report.elapsed() >= Duration::from_millis(250) {
                        last_report = Instant::now();
                        report(&progress(buf.len() as u64, resumes, false), &mut last_logged);
                    }
                }
                Ok(())
            };
            let left = budget.saturating_sub(start.elapsed());
            let outcome = match tokio::time::timeout(left, attempt).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(self.timed_out(
                        "get",
                        key,
                        resumes + 1,
                        format!(
                            "{:.1} of {:.1} MB after the whole budget of {} s (at least {} KiB/s on average)",
                            buf.len() as f64 / 1e6,
                            total as f64 / 1e6,
                            budget.as_secs(),
                            MIN_LARGE_RATE / 1024
                        ),
                    ));
                }
            };
            match outcome {
                Ok(()) if buf.len() as u64 == total => break,
                Ok(()) => {
                    tracing::debug!(key, received = buf.len(), total, "the body ended early; resuming");
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(key, received = buf.len(), total, error = %e, "download interrupted; resuming")
                }
            }
            resumes += 1;
            if resumes > MAX_RESUMES {
                return Err(self.timed_out("get", key, resumes, format!("interrupted {MAX_RESUMES} times")));
            }
            tokio::time::sleep(self.transfer.backoff).await;
        }
        report(&progress(total, resumes, true), &mut last_logged);
        Ok(Fetched { bytes: Bytes::from(buf), last_modified })
    }

    fn stalled(&self, op: &'static str, key: &str, attempts: u32) -> StorageError {
        self.timed_out(op, key, attempts, format!("no bytes for {:?}", self.transfer.timeout))
    }
}
