//! The validator: recompute each miner's gradient on its pages from `theta_w`, compare with
//! the gradient its slice implies, keep per-uid EMAs and set weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bistro_chain::{Chain, ChainError, Metagraph};
use bistro_model::{Llama, Params};
use bistro_train::data::{Dataset, TextTokenizer};
use bistro_train::hparams::{HParams, PROTOCOL_VERSION};
use bistro_train::node::{Listeners, Node, NodeConfig, NodeError, rejected_of};
use bistro_train::slices::{self, Rejection};
use bistro_train::step;
use bistro_train::sync::{SyncError, WindowSlices};
use candle_core::Device;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};

use crate::score::{Scoreboard, honesty_score, quantize};

/// Errors that stop a validator.
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    /// Configuration is wrong.
    #[error("validator config: {0}")]
    Config(String),
    /// The chain refused something fatal.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// Data could not be opened.
    #[error(transparent)]
    Data(#[from] bistro_train::data::DataError),
    /// Window sync failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Joining or merging failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Recomputation failed.
    #[error(transparent)]
    Step(#[from] step::StepError),
    /// The kernel failed.
    #[error(transparent)]
    Kernel(#[from] bistro_kernels::KernelError),
}

/// Everything a validator needs.
#[derive(Clone, Debug)]
pub struct ValidatorConfig {
    /// The settings every node shares.
    pub node: NodeConfig,
    /// Most miners recomputed per window (sampled when there are more).
    pub max_miners_per_window: usize,
}

/// One miner's result in one window.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ScoreRow {
    /// The miner's uid.
    pub uid: u16,
    /// The miner's hotkey.
    pub hotkey: String,
    /// `ok`, or the rejection code (`missing`, `late`, `nan`, ...).
    pub status: String,
    /// `R = -||g_m - g_v||`.
    pub r: f64,
    /// `e = ||g_m - g_v|| / ||g_v||`.
    pub e: f64,
    /// The window score `honesty_score(e)`.
    pub score: f64,
    /// The EMA after this window.
    pub ema: f64,
    /// The weight share after this window.
    pub weight: f64,
}

/// What a validator reports.
#[derive(Clone, Debug, PartialEq)]
pub enum ValidatorEvent {
    /// Ready.
    Started {
        /// This validator's uid.
        uid: u16,
        /// The window its model belongs to.
        window: u64,
        /// Where the model came from.
        origin: String,
    },
    /// A window was merged.
    Merged {
        /// The window.
        window: u64,
        /// Accepted slices.
        accepted: usize,
        /// Rejected slices (hotkey, reason).
        rejected: Vec<(String, String)>,
    },
    /// A window was scored.
    Scored {
        /// The window.
        window: u64,
        /// One row per evaluated miner.
        rows: Vec<ScoreRow>,
        /// Time spent recomputing.
        seconds: f64,
    },
    /// Weights were set on chain.
    WeightsSet {
        /// The window.
        window: u64,
        /// `(uid, u16 weight)`.
        weights: Vec<(u16, u16)>,
    },
    /// Setting weights failed (retried next time).
    WeightsFailed {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
}

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

/// The raw result of scoring one miner.
#[derive(Clone, Debug, PartialEq)]
pub struct MinerResult {
    /// uid.
    pub uid: u16,
    /// hotkey.
    pub hotkey: String,
    /// `ok` or a rejection code.
    pub status: String,
    /// `R = -||g_m - g_v||`.
    pub r: f64,
    /// `e`.
    pub e: f64,
}

impl Scorer {
    /// Recompute `g_v` for each `(uid, hotkey)` on its pages at `theta_w` and compare with
    /// its slice in `ws` (a missing or rejected slice counts as `g_m = 0`).
    pub fn score(
        &self,
        theta_w: &Params,
        ws: &WindowSlices,
        miners: &[(u16, String)],
        stop: &AtomicBool,
    ) -> Result<Vec<MinerResult>, ValidatorError> {
        let h = &self.hparams;
        let eta = h.learning_rate_at(ws.window) as f32;
        let model = Llama::new(theta_w)?;
        let theta_flat: Vec<f32> = ws.theta_at_i.iter().flatten().copied().collect();
        let mut out = Vec::with_capacity(miners.len());
        for (uid, hotkey) in miners {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let peer = ws.peers.iter().find(|p| &p.hotkey == hotkey);
            let (status, slice_flat): (String, Vec<f32>) = match peer.map(|p| &p.outcome) {
                Some(Ok(values)) => ("ok".into(), values.iter().flatten().copied().collect()),
                Some(Err(r)) => (r.code().into(), theta_flat.clone()),
                None => (Rejection::Missing.code().into(), theta_flat.clone()),
            };
            let pages = self.dataset.pages(&h.network, hotkey, ws.window, h.pages_per_window);
            let batch = self.dataset.window_batch(&self.tokenizer, &pages, h.seq_len)?;
            let grad = step::window_gradient(&model, theta_w, &batch, self.micro_batch_rows, &self.device, || {
                !stop.load(Ordering::Relaxed)
            })?;
            let gv: Vec<f32> = slices::gather_grads(&grad.grads, &ws.indices)?.into_iter().flatten().collect();
            let norms = bistro_kernels::cpu::diff_norms(&theta_flat, &gv, eta, &[&slice_flat])?;
            let e = norms.relative_errors()[0];
            out.push(MinerResult { uid: *uid, hotkey: hotkey.clone(), status, r: -norms.sq_dist[0].sqrt(), e });
        }
        Ok(out)
    }
}

/// Which miners to evaluate: all when they fit, else `max` sampled with ChaCha20 keyed by
/// `sha256("bistro/validator-sample/v1" || seed || own hotkey)` (partial Fisher-Yates).
pub fn sample_miners(miners: &[(u16, String)], max: usize, seed: &[u8], own_hotkey: &str) -> Vec<(u16, String)> {
    if miners.len() <= max {
        return miners.to_vec();
    }
    let mut h = Sha256::new();
    h.update(b"bistro/validator-sample/v1");
    h.update(seed);
    h.update(own_hotkey.as_bytes());
    let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
    let mut v = miners.to_vec();
    for i in 0..max {
        let j = i + bistro_train::data::pages::uniform_below(&mut rng, (v.len() - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(max);
    v.sort();
    v
}

/// The miners of a metagraph: registered uids without a validator permit.
pub fn miners_of(mg: &Metagraph) -> Vec<(u16, String)> {
    mg.neurons.iter().filter(|n| !n.validator_permit).map(|n| (n.uid, n.hotkey.clone())).collect()
}

/// A validator node.
pub struct Validator {
    node: Node,
    max_miners_per_window: usize,
    scorer: Arc<Scorer>,
    board: Scoreboard,
    listeners: Listeners<ValidatorEvent>,
}

impl Validator {
    /// Build a validator: data, model state, scores, bucket; register (devnet) and commit the bucket.
    pub async fn new(cfg: ValidatorConfig, chain: Arc<dyn Chain>) -> Result<Self, ValidatorError> {
        let node = Node::join(cfg.node, chain, " (register it with `btcli subnet register` and stake to it)").await?;
        let board = Scoreboard::load(&node.cfg.state_dir.join("scores.json")).map_err(ValidatorError::Config)?;
        let scorer = Arc::new(Scorer {
            hparams: node.cfg.hparams.clone(),
            dataset: node.dataset.clone(),
            tokenizer: node.tokenizer.clone(),
            device: node.cfg.device.clone(),
            micro_batch_rows: node.cfg.micro_batch_rows,
        });
        Ok(Validator {
            node,
            max_miners_per_window: cfg.max_miners_per_window.max(1),
            scorer,
            board,
            listeners: Listeners::default(),
        })
    }

    /// Call `f` for every event.
    pub fn on_event(&mut self, f: impl Fn(&ValidatorEvent) + Send + Sync + 'static) {
        self.listeners.add(f);
    }

    fn emit(&self, e: ValidatorEvent) {
        self.listeners.emit(&e);
    }

    /// The parameters held now.
    pub fn params(&self) -> &Params {
        &self.node.params
    }

    /// The window the parameters belong to.
    pub fn window(&self) -> u64 {
        self.node.window
    }

    /// The scoreboard.
    pub fn scoreboard(&self) -> &Scoreboard {
        &self.board
    }

    /// Merge window `self.window`, score it when not far behind, and set weights on schedule.
    /// Returns whether the window was scored.
    async fn process_window(&mut self, current: u64, stop: &Arc<AtomicBool>) -> Result<bool, ValidatorError> {
        let w = self.node.window;
        let (ws, theta_w) = self.node.merge_window(stop, true).await?;
        let accepted = bistro_train::node::accepted_of(&ws).len();
        self.emit(ValidatorEvent::Merged { window: w, accepted, rejected: rejected_of(&ws) });
        let theta_w = theta_w.ok_or_else(|| ValidatorError::Config("theta_w was not kept".into()))?;
        if current > w + 2 {
            tracing::info!(window = w, current, "behind the chain: merged without scoring");
            return Ok(false);
        }
        let mg = self.node.chain.metagraph(self.node.cfg.netuid).await?;
        let miners = sample_miners(&miners_of(&mg), self.max_miners_per_window, &ws.seed, &self.node.cfg.hotkey);
        let started = Instant::now();
        let scorer = self.scorer.clone();
        let flag = stop.clone();
        let ws = Arc::new(ws);
        let ws2 = ws.clone();
        let results = tokio::task::spawn_blocking(move || scorer.score(&theta_w, &ws2, &miners, &flag))
            .await
            .map_err(|e| ValidatorError::Config(format!("scoring task failed: {e}")))??;
        let h = &self.node.cfg.hparams;
        let mut rows = Vec::with_capacity(results.len());
        for r in &results {
            let score = honesty_score(r.e, h.honest_tolerance);
            let ema = self.board.update(r.uid, &r.hotkey, w, score, h.ema_alpha);
            rows.push(ScoreRow {
                uid: r.uid,
                hotkey: r.hotkey.clone(),
                status: r.status.clone(),
                r: r.r,
                e: r.e,
                score,
                ema,
                weight: 0.0,
            });
        }
        // Forget uids whose hotkey left.
        self.board.uids.retain(|uid, s| mg.neuron(*uid).is_some_and(|n| n.hotkey == s.hotkey && !n.validator_permit));
        let weights = self.board.weights(h.temperature);
        for row in &mut rows {
            row.weight = weights.iter().find(|(u, _)| *u == row.uid).map(|(_, w)| *w).unwrap_or(0.0);
        }
        self.emit(ValidatorEvent::Scored { window: w, rows, seconds: started.elapsed().as_secs_f64() });
        if let Err(e) = self.board.save(&self.node.cfg.state_dir.join("scores.json")) {
            tracing::error!(error = %e, "cannot save scores");
        }
        if (w + 1).is_multiple_of(h.windows_per_weights) && !weights.is_empty() {
            let (uids, q) = quantize(&weights);
            match self
                .node
                .chain
                .set_weights(self.node.cfg.netuid, &self.node.cfg.hotkey, &uids, &q, PROTOCOL_VERSION as u64)
                .await
            {
                Ok(()) => {
                    self.emit(ValidatorEvent::WeightsSet { window: w, weights: uids.into_iter().zip(q).collect() })
                }
                Err(e) => self.emit(ValidatorEvent::WeightsFailed { window: w, reason: e.to_string() }),
            }
        }
        Ok(true)
    }

    /// Run until `max_windows` windows were scored or `stop` is set.
    pub async fn run(&mut self, max_windows: Option<u64>, stop: Arc<AtomicBool>) -> Result<u64, ValidatorError> {
        self.emit(ValidatorEvent::Started {
            uid: self.node.uid,
            window: self.node.window,
            origin: self.node.origin.clone(),
        });
        let mut scored = 0u64;
        while !stop.load(Ordering::Relaxed) && max_windows.is_none_or(|m| scored < m) {
            let current = match self.node.chain_window().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "chain unavailable; retrying");
                    tokio::time::sleep(self.node.chain.block_time()).await;
                    continue;
                }
            };
            if self.node.window >= current {
                tokio::time::sleep(self.node.chain.block_time() / 4).await;
                continue;
            }
            match self.process_window(current, &stop).await {
                Ok(true) => scored += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(window = self.node.window, error = %e, "window failed; retrying");
                    tokio::time::sleep(self.node.chain.block_time()).await;
                }
            }
        }
        Ok(scored)
    }
}
