//! Recomputation: a miner's gradient recomputed on its pages at `theta_w` and its slice's
//! codes checked against it code by code ([`check_codes`]); which miners to recompute, in a
//! private order.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    /// `R = -||decoded codes - nearest consistent codes||`: minus how far the slice is from
    /// any upload consistent with the recomputed gradient (NaN when the slice was invalid and
    /// nothing was recomputed).
    pub r: f64,
    /// `e`: `-R` relative to the recomputed gradient's norm (0 for an honest miner; 1 for a
    /// missing or invalid slice).
    pub e: f64,
    /// Whether `g_v` was recomputed (a valid slice); invalid slices score `e = 1` without it.
    pub recomputed: bool,
}

impl MinerResult {
    /// A miner whose slice was missing or invalid (`status`): `g_m = 0`, so `e = 1`, and
    /// nothing recomputed.
    pub fn unrecomputed(uid: u16, hotkey: &str, status: &str) -> Self {
        MinerResult { uid, hotkey: hotkey.to_string(), status: status.into(), r: f64::NAN, e: 1.0, recomputed: false }
    }

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

/// The share of the verification budget that miners on probation (never scored honest:
/// new hotkeys, sybils, proven cheaters) may take before every established miner of the
/// order has had its turn (red team 3, F10: format-valid garbage from many hotkeys cost a
/// full recomputation each and pushed the honest miners out of the budget).
pub const PROBATION_SHARE: f64 = 0.25;

/// How long a window's recomputations may take.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Recomputation stops here: a recomputation still running is cancelled, and miners
    /// not reached are left out of the result (not observed).
    pub end: Instant,
    /// Miners on probation are recomputed before this only; after it, once every other
    /// miner of the order has been, while the budget lasts.
    pub probation_end: Instant,
    /// Hotkeys on probation.
    pub probation: HashSet<String>,
}

impl Budget {
    /// A budget of `ms` from now, [`PROBATION_SHARE`] of it open to `probation`.
    pub fn from_now(ms: u64, probation: HashSet<String>) -> Self {
        let now = Instant::now();
        Budget {
            end: now + Duration::from_millis(ms),
            probation_end: now + Duration::from_millis((ms as f64 * PROBATION_SHARE) as u64),
            probation,
        }
    }

    fn over(&self) -> bool {
        Instant::now() >= self.end
    }
}

impl Scorer {
    /// Score each `(uid, hotkey)` of `miners`, in that order: a missing or invalid slice
    /// counts as `g_m = 0` (`e = 1`, nothing recomputed); a valid one is compared with `g_v`
    /// recomputed on the miner's pages at `theta_w`. Under a `budget`, miners on probation
    /// past its probation share wait until the others have been recomputed, and
    /// recomputation stops at its end (miners not reached are left out of the result); it
    /// stops as well when `stop` is set. Results come in the order they were decided.
    pub fn score(
        &self,
        theta_w: &Params,
        ws: &WindowSlices,
        miners: &[(u16, String)],
        stop: &AtomicBool,
        budget: Option<&Budget>,
    ) -> Result<Vec<MinerResult>, ValidatorError> {
        let model = Llama::new(theta_w)?;
        let shared = Shared { model: &model, theta_w, ws };
        let mut out = Vec::with_capacity(miners.len());
        let mut waiting = Vec::new();
        for (uid, hotkey) in miners {
            if stop.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let slice = match ws.peers.iter().find(|p| &p.hotkey == hotkey).map(|p| &p.outcome) {
                Some(Ok(slice)) => slice,
                Some(Err(r)) => {
                    out.push(MinerResult::unrecomputed(*uid, hotkey, r.code()));
                    continue;
                }
                None => {
                    out.push(MinerResult::unrecomputed(*uid, hotkey, Rejection::Missing.code()));
                    continue;
                }
            };
            if let Some(b) = budget
                && b.probation.contains(hotkey)
                && Instant::now() >= b.probation_end
            {
                waiting.push((*uid, hotkey, slice));
                continue;
            }
            if let Some(r) = self.recompute(&shared, *uid, hotkey, slice, stop, budget)? {
                out.push(r);
            }
        }
        for (uid, hotkey, slice) in waiting {
            if let Some(r) = self.recompute(&shared, uid, hotkey, slice, stop, budget)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Recompute one miner's gradient and compare: `None` when the budget ended first (or
    /// during it: the recomputation is cancelled between micro-batches).
    fn recompute(
        &self,
        s: &Shared<'_>,
        uid: u16,
        hotkey: &str,
        slice: &slices::SliceUpdate,
        stop: &AtomicBool,
        budget: Option<&Budget>,
    ) -> Result<Option<MinerResult>, ValidatorError> {
        let h = &self.hparams;
        if budget.is_some_and(Budget::over) {
            return Ok(None);
        }
        let pages = self.dataset.pages(&h.network, hotkey, s.ws.window, h.pages_per_window);
        let batch = h.window_batch(&self.dataset, &self.tokenizer, &pages)?;
        let keep_going = || !stop.load(Ordering::Relaxed) && !budget.is_some_and(Budget::over);
        let (rows, device) = (self.micro_batch_rows, &self.device);
        let grad = match step::window_gradient(s.model, s.theta_w, &batch, rows, device, keep_going) {
            Ok(g) => g,
            Err(step::StepError::Cancelled) if budget.is_some_and(Budget::over) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let gv = slices::gather_grads(&grad.grads, &s.ws.indices)?;
        let c = check_codes(h, &s.ws.seed, hotkey, &s.ws.indices, &gv, slice);
        Ok(Some(MinerResult {
            uid,
            hotkey: hotkey.to_string(),
            status: "ok".into(),
            r: 0.0 - c.excess_sq.sqrt(),
            e: c.relative_error(),
            recomputed: true,
        }))
    }
}

/// What every recomputation of one window shares.
struct Shared<'a> {
    /// The model at `theta_w`.
    model: &'a Llama,
    theta_w: &'a Params,
    ws: &'a WindowSlices,
}

/// Check `hotkey`'s codes in `slice` against the recomputed gradient `gv` at `indices`
/// (the window of `seed`), tensor by tensor with the miner's public dithers, under the
/// network's code tolerance ([`bistro_train::slices::quant::Codec::check`]). Its
/// [`relative_error`](bistro_train::slices::quant::Consistency::relative_error) is the `e`
/// a miner is scored by: 0 for an honest miner.
pub fn check_codes(
    h: &HParams,
    seed: &[u8],
    hotkey: &str,
    indices: &slices::SliceIndices,
    gv: &[Vec<f32>],
    slice: &slices::SliceUpdate,
) -> slices::quant::Consistency {
    slices::check_codes(&h.codec(), h.code_tolerance(), seed, hotkey, indices, gv, &slice.codes)
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
