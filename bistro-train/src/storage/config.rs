//! How a bucket is opened: timeouts and retries, and this node's own credentials.

use std::time::Duration;

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

impl TransferConfig {
    /// These settings as a peer's bucket is read with them: a slow or hostile peer must not
    /// stall a window, so at most [`crate::protocol::PEER_ATTEMPTS`] attempts of at most
    /// [`crate::protocol::PEER_TIMEOUT`] each.
    pub fn for_peers(&self) -> TransferConfig {
        TransferConfig {
            attempts: self.attempts.min(crate::protocol::PEER_ATTEMPTS),
            timeout: self.timeout.min(crate::protocol::PEER_TIMEOUT),
            ..self.clone()
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
/// are never opened with them ([`super::Bucket::open_peer`]).
#[derive(Clone, Debug, Default)]
pub struct BucketOptions {
    /// S3 access key id (else `BISTRO_S3_ACCESS_KEY_ID`, then `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// S3 secret (else `BISTRO_S3_SECRET_ACCESS_KEY`, then `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<Secret>,
    /// Timeouts and retries.
    pub transfer: TransferConfig,
}
