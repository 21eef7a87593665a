//! The training step: the mean-loss gradient over all tokens of a window's pages.
//!
//! The miner and the validator run exactly this code, so an honest miner's gradient and
//! the validator's recomputation differ only by floating-point noise.

use std::time::Instant;

use bistro_model::{Llama, Params};
use candle_core::{Device, Tensor};

use crate::data::WindowBatch;

/// Errors of the training step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// Building a batch failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The window has no targets.
    #[error("the window's pages produced no training tokens")]
    Empty,
    /// The step was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// The gradient of one window and what it cost.
#[derive(Debug)]
pub struct WindowGradient {
    /// Gradient per parameter (canonical order), of the mean loss over all targets.
    pub grads: Vec<Tensor>,
    /// Mean loss over all targets.
    pub loss: f64,
    /// Number of targets (tokens predicted).
    pub n_targets: usize,
    /// Rows processed.
    pub rows: usize,
    /// Wall time of forward + backward.
    pub seconds: f64,
}

impl WindowGradient {
    /// Tokens per second of the step.
    pub fn tokens_per_sec(&self) -> f64 {
        self.n_targets as f64 / self.seconds.max(1e-9)
    }
}

/// Compute the gradient of the mean causal-LM loss over every target of `batch`, in
/// micro-batches of `micro_rows` rows (gradient accumulation in a fixed order).
/// `keep_going` is polled between micro-batches; returning false cancels.
pub fn window_gradient(
    model: &Llama,
    params: &Params,
    batch: &WindowBatch,
    micro_rows: usize,
    device: &Device,
    mut keep_going: impl FnMut() -> bool,
) -> Result<WindowGradient, StepError> {
    if batch.n_targets == 0 || batch.rows == 0 {
        return Err(StepError::Empty);
    }
    let start = Instant::now();
    let total = batch.n_targets as f64;
    let mut acc: Option<Vec<Tensor>> = None;
    let mut loss_sum = 0f64;
    for range in batch.micro_batches(micro_rows) {
        if !keep_going() {
            return Err(StepError::Cancelled);
        }
        let (ids, labels) = batch.tensors(range, device)?;
        let out = model.loss_grads(&ids, &labels, 1.0 / total)?;
        if out.count == 0 {
            continue;
        }
        loss_sum += out.loss_sum;
        let grads = params.gradients(&out.grads)?;
        acc = Some(match acc {
            None => grads,
            Some(prev) => prev.iter().zip(&grads).map(|(a, b)| a.add(b)).collect::<candle_core::Result<Vec<_>>>()?,
        });
    }
    let grads = acc.ok_or(StepError::Empty)?;
    Ok(WindowGradient {
        grads,
        loss: loss_sum / total,
        n_targets: batch.n_targets,
        rows: batch.rows,
        seconds: start.elapsed().as_secs_f64(),
    })
}
