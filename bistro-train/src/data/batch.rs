//! Packing tokenised documents into training rows.
//!
//! Every document is tokenised without special tokens and followed by the EOS token; the
//! documents of a window are concatenated in page order, then row order, into one stream
//! (documents are *packed*: a row may hold the end of one document and the start of the
//! next, separated by EOS, as in GPT-style pre-training). The stream is cut into rows of
//! `seq_len` tokens that overlap by one token (row `k` starts at `k * (seq_len - 1)`), so
//! every token of the stream except the first is a prediction target exactly once. The
//! last row is padded with EOS; padded positions carry the label `-100` and are ignored by
//! the loss. The result depends only on the pages, the tokenizer and `seq_len`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::error::{DataError, Result};
use super::tokenizer::TextTokenizer;
use bistro_model::IGNORE_INDEX;

/// The token rows of one window, ready to be cut into micro-batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowBatch {
    /// Tokens per row.
    pub seq_len: usize,
    /// Number of rows.
    pub rows: usize,
    /// Row-major `[rows, seq_len]` input ids.
    pub input_ids: Vec<u32>,
    /// Row-major `[rows, seq_len]` labels (`-100` on padding).
    pub labels: Vec<i64>,
    /// Number of prediction targets in the whole window (the loss's denominator).
    pub n_targets: usize,
    /// Number of real (non-padding) tokens in the stream.
    pub n_tokens: usize,
}

impl WindowBatch {
    /// Pack already-tokenised documents (EOS is appended to each).
    pub fn pack(docs: &[Vec<u32>], eos_id: u32, seq_len: usize) -> Result<Self> {
        Self::pack_capped(docs, eos_id, seq_len, usize::MAX)
    }

    /// [`Self::pack`], keeping only the first `max_tokens` tokens of the stream (EOS
    /// included): a window's cost is bounded whatever its documents hold.
    pub fn pack_capped(docs: &[Vec<u32>], eos_id: u32, seq_len: usize, max_tokens: usize) -> Result<Self> {
        if seq_len < 2 {
            return Err(DataError::Invalid(format!("seq_len must be at least 2, got {seq_len}")));
        }
        let total: usize = docs.iter().map(|d| d.len() + 1).sum::<usize>().min(max_tokens);
        let mut stream = Vec::with_capacity(total);
        for d in docs {
            if stream.len() >= total {
                break;
            }
            stream.extend_from_slice(d);
            stream.push(eos_id);
        }
        stream.truncate(total);
        let n_targets = stream.len().saturating_sub(1);
        let step = seq_len - 1;
        let rows = n_targets.div_ceil(step);
        let mut input_ids = Vec::with_capacity(rows * seq_len);
        let mut labels = Vec::with_capacity(rows * seq_len);
        for r in 0..rows {
            let start = r * step;
            for j in 0..seq_len {
                match stream.get(start + j) {
                    Some(&t) => {
                        input_ids.push(t);
                        labels.push(t as i64);
                    }
                    None => {
                        input_ids.push(eos_id);
                        labels.push(IGNORE_INDEX);
                    }
                }
            }
        }
        Ok(WindowBatch { seq_len, rows, input_ids, labels, n_targets, n_tokens: stream.len() })
    }

    /// Tokenise `docs` in parallel (rayon) and pack them.
    pub fn from_documents(tokenizer: &TextTokenizer, docs: &[String], seq_len: usize) -> Result<Self> {
        Self::from_documents_capped(tokenizer, docs, seq_len, usize::MAX)
    }

    /// Tokenise `docs` in parallel (rayon) and pack the first `max_tokens` tokens.
    pub fn from_documents_capped(
        tokenizer: &TextTokenizer,
        docs: &[String],
        seq_len: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        let tokens = docs.par_iter().map(|d| tokenizer.encode(d)).collect::<Result<Vec<_>>>()?;
        Self::pack_capped(&tokens, tokenizer.eos_id(), seq_len, max_tokens)
    }

    /// Ranges of rows `[start, end)` for micro-batches of at most `rows_per_batch` rows.
    pub fn micro_batches(&self, rows_per_batch: usize) -> Vec<std::ops::Range<usize>> {
        let n = rows_per_batch.max(1);
        (0..self.rows).step_by(n).map(|s| s..(s + n).min(self.rows)).collect()
    }

    /// Input ids `[n, seq_len]` (u32) and labels `[n, seq_len]` (i64) of rows `range` on `device`.
    pub fn tensors(&self, range: std::ops::Range<usize>, device: &Device) -> Result<(Tensor, Tensor)> {
        if range.start > range.end || range.end > self.rows {
            return Err(DataError::Invalid(format!("rows {range:?} of a batch with {} rows", self.rows)));
        }
        let (a, b) = (range.start * self.seq_len, range.end * self.seq_len);
        let n = range.len();
        let ids = Tensor::from_slice(&self.input_ids[a..b], (n, self.seq_len), device)?;
        let labels = Tensor::from_slice(&self.labels[a..b], (n, self.seq_len), device)?;
        Ok((ids, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_targets_every_token_once() {
        let docs = vec![vec![1, 2, 3], vec![4, 5], vec![6]];
        // stream: 1 2 3 E 4 5 E 6 E  (E = 0), 9 tokens, 8 targets
        let b = WindowBatch::pack(&docs, 0, 4).unwrap();
        assert_eq!(b.n_targets, 8);
        assert_eq!(b.rows, 3); // starts at 0, 3, 6
        assert_eq!(&b.input_ids[0..4], &[1, 2, 3, 0]);
        assert_eq!(&b.input_ids[4..8], &[0, 4, 5, 0]);
        assert_eq!(&b.input_ids[8..12], &[0, 6, 0, 0]);
        assert_eq!(&b.labels[8..12], &[0, 6, 0, -100]);
        // Count targets the way the loss does: label positions 1.. of each row, not ignored.
        let counted: usize =
            (0..b.rows).map(|r| b.labels[r * 4 + 1..(r + 1) * 4].iter().filter(|&&l| l >= 0).count()).sum();
        assert_eq!(counted, b.n_targets);
    }

    #[test]
    fn micro_batches_cover_all_rows() {
        let docs = vec![(0..100).collect::<Vec<u32>>()];
        let b = WindowBatch::pack(&docs, 999, 8).unwrap();
        let mb = b.micro_batches(3);
        assert_eq!(mb.first().unwrap().start, 0);
        assert_eq!(mb.last().unwrap().end, b.rows);
        let (ids, labels) = b.tensors(mb[1].clone(), &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), &[3, 8]);
        assert_eq!(labels.dims(), &[3, 8]);
        assert!(b.tensors(0..b.rows + 1, &Device::Cpu).is_err());
        assert!(WindowBatch::pack(&docs, 0, 1).is_err());
    }

    #[test]
    fn empty_input_gives_empty_batch() {
        let b = WindowBatch::pack(&[], 0, 8).unwrap();
        assert_eq!(b.rows, 0);
        assert_eq!(b.n_targets, 0);
    }
}
