//! Errors of the data pipeline.

use std::path::PathBuf;

/// Everything that can go wrong between a dataset spec and a token batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents could not be parsed.
    #[error("cannot parse {path}{}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line, when it applies.
        line: Option<usize>,
        /// What went wrong.
        reason: String,
    },
    /// The dataset has no rows at all.
    #[error("dataset {0} is empty: it has no rows")]
    EmptyCorpus(String),
    /// A shard cannot hold even one page.
    #[error("shard {shard} has {rows} rows, fewer than one page of {rows_per_page} rows")]
    ShardTooShort {
        /// The shard's name (usually its file).
        shard: String,
        /// Its row count.
        rows: u64,
        /// The configured page size.
        rows_per_page: usize,
    },
    /// A page does not lie inside the dataset.
    #[error("page {page} is outside the dataset ({reason})")]
    PageOutOfRange {
        /// The page, as text.
        page: String,
        /// Why.
        reason: String,
    },
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer {source_name}: {reason}")]
    Tokenizer {
        /// The tokenizer file or `embedded`.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// A setting is invalid.
    #[error("invalid data setting: {0}")]
    Invalid(String),
    /// Building tensors failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the data pipeline.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}
