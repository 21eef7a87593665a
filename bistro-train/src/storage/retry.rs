//! Timeouts, retries with backoff, and the typing of the store's errors.

use super::{Bucket, Result, StorageError};

impl Bucket {
    pub(super) fn classify(&self, op: &'static str, key: &str, attempts: u32, e: object_store::Error) -> StorageError {
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

    /// A [`StorageError::Failed`] whose cause is time: `why` says how much.
    pub(super) fn timed_out(&self, op: &'static str, key: &str, attempts: u32, why: String) -> StorageError {
        StorageError::Failed {
            bucket: self.url.clone(),
            op,
            key: key.into(),
            attempts,
            source: Box::new(std::io::Error::new(std::io::ErrorKind::TimedOut, why)),
        }
    }

    /// Run `f` with a timeout per attempt, retrying transient failures with backoff.
    pub(super) async fn retry<T, F, Fut>(&self, op: &'static str, key: &str, mut f: F) -> Result<T>
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
                Err(_) => Err(self.timed_out(op, key, attempt, format!("timed out after {:?}", self.transfer.timeout))),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
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
}
