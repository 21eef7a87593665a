//! Data pages, corpus and tokenizer: from `(window, hotkey)` to token batches.
//!
//! Miners and validators derive the **same** pages for `(network, hotkey, window)` with
//! [`Dataset::pages`] and turn them into the same rows with [`Dataset::window_batch`].

pub mod batch;
pub mod error;
pub mod hub;
pub mod pages;
pub mod parquet;
pub mod source;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

pub use batch::WindowBatch;
pub use error::{DataError, Result};
pub use pages::Page;
pub use source::{MemoryShards, RowSource, ShardInfo};
pub use tokenizer::TextTokenizer;

/// A dataset: ordered shards of rows, read in pages of `rows_per_page` rows.
#[derive(Clone)]
pub struct Dataset {
    source: Arc<dyn RowSource>,
    rows_per_page: usize,
    page_starts: Vec<u64>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("source", &self.source.describe())
            .field("shards", &self.page_starts.len())
            .field("rows_per_page", &self.rows_per_page)
            .finish()
    }
}

impl Dataset {
    /// Wrap a row source. Every shard must hold at least one page, and the dataset must not be empty.
    pub fn new(source: Arc<dyn RowSource>, rows_per_page: usize) -> Result<Self> {
        if rows_per_page == 0 {
            return Err(DataError::Invalid("rows_per_page must be positive".into()));
        }
        let shards = source.shards();
        if shards.is_empty() || shards.iter().all(|s| s.rows == 0) {
            return Err(DataError::EmptyCorpus(source.describe()));
        }
        let mut page_starts = Vec::with_capacity(shards.len());
        for s in shards {
            if s.rows < rows_per_page as u64 {
                return Err(DataError::ShardTooShort { shard: s.name.clone(), rows: s.rows, rows_per_page });
            }
            page_starts.push(s.rows - rows_per_page as u64 + 1);
        }
        Ok(Dataset { source, rows_per_page, page_starts })
    }

    /// The shipped corpus.
    pub fn embedded(rows_per_page: usize) -> Result<Self> {
        Self::new(Arc::new(MemoryShards::embedded()?), rows_per_page)
    }

    /// Open a dataset spec: `embedded`; `hf:OWNER/NAME[@REV][:FILES]` (parquet shards from
    /// the Hugging Face hub, see [`hub`]); or a path to `.parquet`, `.jsonl`, `.jsonl.gz` or
    /// `.txt` files (a file or a directory of them).
    pub fn open(spec: &str, rows_per_page: usize) -> Result<Self> {
        match spec {
            "" | "embedded" => Self::embedded(rows_per_page),
            s if s.starts_with("hf:") => {
                let hs = hub::HubSpec::parse(s)?;
                let files = hub::fetch(&hs, None, None)?;
                Self::new(Arc::new(parquet::ParquetShards::open(s, &files, "text")?), rows_per_page)
            }
            path => {
                let p = Path::new(path);
                let parquet_files: Vec<_> = source::list_files(p, &["parquet"])
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
                    .collect();
                if !parquet_files.is_empty() {
                    return Self::new(
                        Arc::new(parquet::ParquetShards::open(path, &parquet_files, "text")?),
                        rows_per_page,
                    );
                }
                Self::new(Arc::new(MemoryShards::from_path(p)?), rows_per_page)
            }
        }
    }

    /// Rows per page.
    pub fn rows_per_page(&self) -> usize {
        self.rows_per_page
    }

    /// The shards.
    pub fn shards(&self) -> &[ShardInfo] {
        self.source.shards()
    }

    /// What this dataset is, for logs.
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// Number of distinct pages (valid start rows over all shards).
    pub fn num_pages(&self) -> u64 {
        self.page_starts.iter().sum()
    }

    /// The `n` pages assigned to `hotkey` in `window` on `network` (see [`pages`]).
    pub fn pages(&self, network: &str, hotkey: &str, window: u64, n: usize) -> Vec<Page> {
        pages::draw_pages(&self.page_starts, network, hotkey, window, n)
    }

    /// The rows of one page.
    pub fn read_page(&self, page: Page) -> Result<Vec<String>> {
        let starts = self.page_starts.get(page.shard).copied().unwrap_or(0);
        if page.row_offset >= starts {
            return Err(DataError::PageOutOfRange {
                page: page.to_string(),
                reason: format!("shard {} has {} page starts", page.shard, starts),
            });
        }
        self.source.read_rows(page.shard, page.row_offset, self.rows_per_page)
    }

    /// Read `pages` in order, tokenise their rows in parallel and pack them into rows of `seq_len`.
    pub fn window_batch(&self, tokenizer: &TextTokenizer, pages: &[Page], seq_len: usize) -> Result<WindowBatch> {
        self.window_batch_capped(tokenizer, pages, seq_len, usize::MAX)
    }

    /// [`Self::window_batch`] of the first `max_tokens` tokens (how the protocol reads a
    /// window: `HParams::window_batch`).
    pub fn window_batch_capped(
        &self,
        tokenizer: &TextTokenizer,
        pages: &[Page],
        seq_len: usize,
        max_tokens: usize,
    ) -> Result<WindowBatch> {
        let mut docs = Vec::with_capacity(pages.len() * self.rows_per_page);
        for &p in pages {
            docs.extend(self.read_page(p)?);
        }
        WindowBatch::from_documents_capped(tokenizer, &docs, seq_len, max_tokens)
    }
}
