//! Recomputation: a miner's gradient recomputed on its pages at `theta_w` and compared with
//! the gradient its slice implies, through the scoring device's norm kernel; which miners to
//! recompute, in a private order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bistro_chain::Metagraph;
use bistro_model::{Llama, Params};
use bistro_train::data::{Dataset, TextTokenizer};
use bistro_train::hparams::HParams;
use bistro_train::slices::{self, Rejection};
use bistro_train::step;
use bistro_train::sync::WindowSlices;
use candle_core::Device;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::validator::ValidatorError;

/// Recomputes gradients and scores one window. Pure: used by the validator loop and by tests.
pub struct Scorer {
    /// The network's hyper-parameters.
    pub hparams: HParams,
    /// Data.
    pub dataset: Arc<Dataset>,
    /// Tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// Compute device.
    pub device: Device,
    /// Rows per micro-batch.
    pub micro_batch_rows: usize,
}

impl std::fmt::Debug for Scorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scorer")
            .field("hparams_hash", &self.hparams.hash().ok())
            .field("dataset", &self.dataset.describe())
            .field("device", &self.device)
            .field("micro_batch_rows", &self.micro_batch_rows)
            .finish()
    }
}

/// The raw result of scoring one miner.
#[derive(Clone, Debug, PartialEq)]
pub struct MinerResult {
    /// uid.
    pub uid: u16,
    /// hotkey.
    pub hotkey: String,
    /// `ok` or a rejection code.
    pub status: String,
    /// `R = -||g_m - g_v||` (NaN when the slice was invalid and nothing was recomputed).
    pub r: f64,
    /// `e` (1 for a missing or invalid slice: `g_m = 0`).
    pub e: f64,
    /// Whether `g_v` was recomputed (a valid slice); invalid slices score `e = 1` without it.
    pub recomputed: bool,
}

impl MinerResult {
    /// Whether this window says anything about the miner. A download that ran out of this
    /// validator's collection budget (`timeout`) does not: it may be the validator's own
    /// network or another peer's load as much as the miner's endpoint, so it is neither
    /// scored nor penalised (red team 3, F4). Nor does a slice built on another state than
    /// this validator's (`stale-state`): the miner or this validator missed an aggregate
    /// (red team 3, F5).
    pub fn observed(&self) -> bool {
        self.status != "timeout" && self.status != "stale-state"
    }
}

impl Scorer {
    /// Score each `(uid, hotkey)` of `miners`, in that order: a missing or invalid slice
    /// counts as `g_m = 0` (`e = 1`, nothing recomputed); a valid one is compared with `g_v`
    /// recomputed on the miner's pages at `theta_w`. Stops at `budget_end` (miners not
    /// reached are left out of the result) or when `stop` is set.
    pub fn score(
        &self,
        theta_w: &Params,
        ws: &WindowSlices,
        miners: &[(u16, String)],
        stop: &AtomicBool,
        budget_end: Option<Instant>,
    ) -> Result<Vec<MinerResult>, ValidatorError> {
        let h = &self.hparams;
        let eta = h.learning_rate_at(ws.window) as f32;
        let model = Llama::new(theta_w)?;
        let norm = bistro_kernels::NormKernel::for_device(cuda_ordinal(&self.device))?;
        let theta_flat: Vec<f32> = ws.theta_at_i.iter().flatten().copied().collect();
        let mut out = Vec::with_capacity(miners.len());
        for (uid, hotkey) in miners {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let peer = ws.peers.iter().find(|p| &p.hotkey == hotkey);
            let slice_flat: Vec<f32> = match peer.map(|p| &p.outcome) {
                Some(Ok(values)) => values.iter().flatten().copied().collect(),
                Some(Err(r)) => {
                    out.push(MinerResult {
                        uid: *uid,
                        hotkey: hotkey.clone(),
                        status: r.code().into(),
                        r: f64::NAN,
                        e: 1.0,
                        recomputed: false,
                    });
                    continue;
                }
                None => {
                    let status = Rejection::Missing.code().into();
                    out.push(MinerResult {
                        uid: *uid,
                        hotkey: hotkey.clone(),
                        status,
                        r: f64::NAN,
                        e: 1.0,
                        recomputed: false,
                    });
                    continue;
                }
            };
            if budget_end.is_some_and(|end| Instant::now() >= end) {
                continue;
            }
            let pages = self.dataset.pages(&h.network, hotkey, ws.window, h.pages_per_window);
            let batch = self.dataset.window_batch(&self.tokenizer, &pages, h.seq_len)?;
            let grad = step::window_gradient(&model, theta_w, &batch, self.micro_batch_rows, &self.device, || {
                !stop.load(Ordering::Relaxed)
            })?;
            let gv: Vec<f32> = slices::gather_grads(&grad.grads, &ws.indices)?.into_iter().flatten().collect();
            let norms = norm.diff_norms(&theta_flat, &gv, eta, &[&slice_flat])?;
            let e = norms.relative_errors()[0];
            out.push(MinerResult {
                uid: *uid,
                hotkey: hotkey.clone(),
                status: "ok".into(),
                r: -norms.sq_dist[0].sqrt(),
                e,
                recomputed: true,
            });
        }
        Ok(out)
    }
}

/// The CUDA device the norm kernel runs on for a scoring `device` (`None`: the CPU kernel).
/// The gradient is recomputed on `device`; its values at the slice indices are gathered to
/// the host once and, on CUDA, copied up once with the miner's slice for the kernel.
pub fn cuda_ordinal(device: &Device) -> Option<usize> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    }
}

/// The order in which to recompute `miners`: a random permutation from this validator's
/// own entropy, drawn after the upload deadline, so no miner can know in advance whether or
/// when it will be checked; at most `max` of them.
pub fn private_sample(miners: &[(u16, String)], max: usize) -> Vec<(u16, String)> {
    let mut rng = ChaCha20Rng::from_os_rng();
    let mut v = miners.to_vec();
    let n = v.len();
    for i in 0..n.saturating_sub(1) {
        let j = i + bistro_train::data::pages::uniform_below(&mut rng, (n - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(max);
    v
}

/// The miners of a metagraph: registered uids without a validator permit.
pub fn miners_of(mg: &Metagraph) -> Vec<(u16, String)> {
    mg.neurons.iter().filter(|n| !n.validator_permit).map(|n| (n.uid, n.hotkey.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_norm_kernel_follows_the_scoring_device() {
        assert_eq!(cuda_ordinal(&Device::Cpu), None);
        assert_eq!(bistro_kernels::NormKernel::for_device(cuda_ordinal(&Device::Cpu)).unwrap().name(), "cpu");
    }
}
