//! What can go wrong with a bucket, typed.

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
    /// A listing holds more keys than any bucket of the protocol does.
    #[error("{bucket}: listing `{prefix}` returned more than {limit} keys; not read further")]
    TooManyKeys {
        /// The bucket URL.
        bucket: String,
        /// The prefix listed.
        prefix: String,
        /// The limit.
        limit: usize,
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

impl StorageError {
    /// Whether trying again may help: not for a missing object, refused credentials, an
    /// object over its limit or an unusable URL; yes for everything else (timeouts,
    /// connections, servers' errors).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            StorageError::NotFound { .. }
                | StorageError::Auth { .. }
                | StorageError::TooLarge { .. }
                | StorageError::InvalidUrl { .. }
        )
    }
}
