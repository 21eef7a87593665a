//! Slices: select indices, build, encode, validate and aggregate.
//!
//! A slice is the miner's window gradient at a random `1/compression` of the coordinates,
//! sent as dithered codes ([`quant`]) whose dither every node recomputes from the window's
//! seed and the miner's hotkey: an honest miner's codes are a function of public data, so a
//! validator that recomputes the gradient checks them code by code. Every node applies the
//! accepted mean of the decoded codes through the public AdamW ([`crate::public_adam`]).

pub mod aggregate;
pub mod format;
pub mod indices;
pub mod quant;

use bistro_model::Params;
use candle_core::Tensor;

pub use aggregate::{Aggregate, Contribution, aggregate, update_norm};
pub use format::{SliceExpectation, SliceMeta, SliceUpdate, decode, encode, header_bound, size_bound};
pub use indices::{SliceIndices, slice_len};

/// Why a peer's slice was not accepted. Every variant is a normal outcome, logged and
/// scored, never a crash.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// No object under the expected key.
    #[error("missing: no slice was uploaded")]
    Missing,
    /// The object is larger than the limit.
    #[error("too large: {size} bytes > limit {limit}")]
    TooLarge {
        /// Object size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not a valid safetensors file (truncated, huge header, bad JSON, bad offsets).
    #[error("malformed: {0}")]
    Malformed(String),
    /// Metadata differs from what the window and hotkey require.
    #[error("metadata: `{field}` is {found:?}, expected {expected:?}")]
    Metadata {
        /// The metadata field.
        field: String,
        /// Expected value.
        expected: String,
        /// Found value.
        found: String,
    },
    /// A parameter's tensor is absent.
    #[error("missing key `{0}`")]
    MissingKey(String),
    /// A tensor that is not a parameter is present.
    #[error("unexpected key `{0}`")]
    UnexpectedKey(String),
    /// A tensor is not f32.
    #[error("`{name}` has the wrong dtype {dtype}")]
    WrongDtype {
        /// Tensor name.
        name: String,
        /// Found dtype.
        dtype: String,
    },
    /// A tensor has the wrong shape or length.
    #[error("`{name}` has shape {found:?}, expected [{expected}]")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Expected length.
        expected: usize,
        /// Found shape.
        found: Vec<usize>,
    },
    /// A value is NaN or infinite.
    #[error("`{name}` has a non-finite value at {index}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Position in the slice.
        index: usize,
    },
    /// The implied update norm is far above the median of recently included norms.
    #[error("outlier: update norm {norm:.3e} > {factor} x recent median {median:.3e}")]
    Outlier {
        /// The slice's norm.
        norm: f64,
        /// The median norm of recently included slices.
        median: f64,
        /// The configured factor.
        factor: f64,
    },
    /// The slice was built on another state than the reader's (`parent`): the miner missed
    /// an aggregate, or the reader did. Not the miner's fault as far as the reader can
    /// tell, so never penalised (red team 3, F5).
    #[error("stale-state: built on state {found}, this state is {expected}")]
    StaleState {
        /// The reader's state hash.
        expected: String,
        /// The slice's parent.
        found: String,
    },
    /// The endpoint did not deliver the object within the lead's collection budget.
    #[error("timeout: not delivered within the collection budget of {budget_ms} ms")]
    Timeout {
        /// The budget.
        budget_ms: u64,
    },
    /// Downloading failed after retries.
    #[error("download failed: {0}")]
    Download(String),
}

impl Rejection {
    /// A short stable code for tables and reports (`missing`, `late`, `nan`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::TooLarge { .. } => "too-large",
            Rejection::Malformed(_) => "malformed",
            Rejection::Metadata { .. } => "metadata",
            Rejection::MissingKey(_) => "missing-key",
            Rejection::UnexpectedKey(_) => "unexpected-key",
            Rejection::WrongDtype { .. } => "dtype",
            Rejection::WrongShape { .. } => "shape",
            Rejection::NonFinite { .. } => "nan",
            Rejection::Outlier { .. } => "outlier",
            Rejection::Download(_) => "download",
            Rejection::Timeout { .. } => "timeout",
            Rejection::StaleState { .. } => "stale-state",
        }
    }
}

/// The parameter names and per-parameter lengths of slices for these indices; the size cap
/// is the smaller of `max_bytes` and the largest object such a slice can be
/// ([`format::size_bound`]).
pub fn expectation(
    params: &Params,
    indices: &SliceIndices,
    meta: SliceMeta,
    max_bytes: u64,
    codec: quant::Codec,
) -> SliceExpectation {
    let names: Vec<String> = params.specs().iter().map(|s| s.name.clone()).collect();
    let lengths: Vec<usize> = indices.all().iter().map(Vec::len).collect();
    let max_bytes = max_bytes.min(format::size_bound(&names, &lengths, &codec));
    SliceExpectation { names, lengths, codec, meta, max_bytes }
}

/// The public dithers of `hotkey`'s codes in the window of `seed`: one stream per parameter
/// (its canonical position), one value per index.
pub fn dithers(seed: &[u8], hotkey: &str, indices: &SliceIndices) -> Vec<Vec<f32>> {
    indices.all().iter().enumerate().map(|(p, ids)| quant::dither(seed, hotkey, p as u64, ids.len())).collect()
}

/// The validator's check of `hotkey`'s codes against its own gradient `gv` at `indices` (the
/// window of `seed`): each tensor with the miner's public dithers, in parallel, merged in
/// canonical order ([`quant::Codec::check`]). Codes for another number of tensors fail as
/// a whole.
pub fn check_codes(
    codec: &quant::Codec,
    tol: quant::Tolerance,
    seed: &[u8],
    hotkey: &str,
    indices: &SliceIndices,
    gv: &[Vec<f32>],
    codes: &[quant::Quantised],
) -> quant::Consistency {
    use rayon::prelude::*;
    let mut total = quant::Consistency::default();
    if codes.len() != gv.len() || indices.len() != gv.len() {
        total.excess_sq = f64::INFINITY;
        return total;
    }
    let parts: Vec<quant::Consistency> = gv
        .par_iter()
        .zip(codes)
        .enumerate()
        .map(|(p, (x, q))| codec.check(x, q, &quant::dither(seed, hotkey, p as u64, x.len()), tol))
        .collect();
    for c in &parts {
        total.merge(c);
    }
    total
}

/// An honest slice's codes: the gradient at the indices, quantised with `hotkey`'s dithers.
pub fn encode_gradient(codec: &quant::Codec, grad_at_i: &[Vec<f32>], dithers: &[Vec<f32>]) -> Vec<quant::Quantised> {
    grad_at_i.iter().zip(dithers).map(|(g, u)| codec.encode(g, u)).collect()
}

/// `theta[I]`: the current parameter values at the slice indices.
pub fn gather_params(params: &Params, indices: &SliceIndices) -> bistro_model::Result<Vec<Vec<f32>>> {
    (0..params.len()).map(|i| params.gather(i, indices.param(i))).collect()
}

/// `g[I]`: gradient values (canonical order) at the slice indices.
pub fn gather_grads(grads: &[Tensor], indices: &SliceIndices) -> bistro_model::Result<Vec<Vec<f32>>> {
    grads.iter().zip(indices.all()).map(|(g, idx)| bistro_model::params::gather_flat(g, idx)).collect()
}

/// Overwrite the parameters at the slice indices with `values`.
pub fn scatter_params(params: &Params, indices: &SliceIndices, values: &[Vec<f32>]) -> bistro_model::Result<()> {
    for (i, v) in values.iter().enumerate() {
        params.scatter(i, indices.param(i), v)?;
    }
    Ok(())
}
