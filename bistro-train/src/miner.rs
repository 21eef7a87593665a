//! The miner: follow the chain window by window, train on the assigned pages, upload the
//! slice after the window ends, then apply the window's accepted set (the lead validator's
//! aggregate) so that it holds the same state as every other node.
//!
//! Embed it in an application with [`Miner::new`], observe it with [`Miner::on_event`],
//! and drive it with [`Miner::run`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bistro_chain::{BlockHash, Chain};
use bistro_model::{Llama, ModelConfig, Params};
use bytes::Bytes;

use crate::data::WindowBatch;
use crate::node::{Followed, Listeners, Node, NodeConfig, Pace, now_ms};
use crate::slices::{self, SliceIndices};
use crate::step::{self, StepError, WindowGradient};

pub use crate::node::NodeError as MinerError;

/// Everything a miner needs (the settings every node shares).
pub type MinerConfig = NodeConfig;

/// What a miner reports while it runs.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum MinerEvent {
    /// Ready: uid, the model and the window state it holds.
    Started {
        /// This miner's uid.
        uid: u16,
        /// The window `theta` belongs to.
        window: u64,
        /// Where the state came from (`local state`, `checkpoint ...`, `genesis`).
        origin: String,
    },
    /// A window's training began.
    WindowStarted {
        /// The window.
        window: u64,
    },
    /// The window's pages were read and tokenised.
    PagesLoaded {
        /// The window.
        window: u64,
        /// Pages.
        pages: usize,
        /// Targets (tokens predicted).
        tokens: usize,
    },
    /// The gradient was computed.
    StepDone {
        /// The window.
        window: u64,
        /// Mean loss over the window's tokens at `theta_w`.
        loss: f64,
        /// Training throughput.
        tokens_per_sec: f64,
    },
    /// The slice was uploaded.
    SliceUploaded {
        /// The window.
        window: u64,
        /// Object size.
        bytes: usize,
        /// Upload time.
        seconds: f64,
    },
    /// The slice could not be uploaded in time.
    UploadFailed {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
    /// The window's accepted set was applied, or there was none, or a fork was found.
    Followed(Followed),
    /// A window was skipped.
    Skipped {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
}

/// Totals of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinerSummary {
    /// Windows trained.
    pub windows_trained: u64,
    /// Slices uploaded.
    pub slices_uploaded: u64,
    /// Windows whose accepted set was followed (applied, or no update).
    pub windows_merged: u64,
    /// Windows caught up on without training.
    pub windows_caught_up: u64,
    /// Last training loss.
    pub last_loss: Option<f64>,
}

/// A batch being read and tokenised in the background.
type Prefetch = tokio::task::JoinHandle<Result<WindowBatch, crate::data::DataError>>;

/// A miner node.
pub struct Miner {
    node: Node,
    /// How long the last train-and-upload took (ms): a window is trained only while at
    /// least this much time is left before its upload deadline.
    last_step_ms: u64,
    listeners: Listeners<MinerEvent>,
    /// The next window's batch, read and tokenised while this window merges.
    prefetch: std::sync::Mutex<Option<(u64, Prefetch)>>,
    /// The last follow ended on a fork it could not repair: the held state is not the
    /// accepted one, so this miner does not train on it (red team 3, F5).
    off_state: bool,
}

impl std::fmt::Debug for Miner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miner")
            .field("hotkey", &self.node.cfg.hotkey)
            .field("uid", &self.node.uid)
            .field("window", &self.node.window)
            .finish()
    }
}

impl Miner {
    /// Build a miner: open data, model state and bucket; register (devnet) and commit the bucket URL.
    pub async fn new(cfg: MinerConfig, chain: Arc<dyn Chain>) -> Result<Self, MinerError> {
        let node = Node::join(cfg, chain, " (register it with `btcli subnet register`)").await?;
        Ok(Miner {
            node,
            last_step_ms: 0,
            listeners: Listeners::default(),
            prefetch: std::sync::Mutex::new(None),
            off_state: false,
        })
    }

    /// Call `f` for every event.
    pub fn on_event(&mut self, f: impl Fn(&MinerEvent) + Send + Sync + 'static) {
        self.listeners.add(f);
    }

    fn emit(&self, e: MinerEvent) {
        self.listeners.emit(&e);
    }

    /// The parameters held now (`theta_w` for [`Miner::window`]).
    pub fn params(&self) -> &Params {
        &self.node.params
    }

    /// The window the held parameters belong to.
    pub fn window(&self) -> u64 {
        self.node.window
    }

    /// This miner's uid.
    pub fn uid(&self) -> u16 {
        self.node.uid
    }

    /// The model config.
    pub fn model_config(&self) -> &ModelConfig {
        &self.node.model_config
    }

    /// Apply the held window's accepted set (waiting for it as `pace` says) and advance.
    pub async fn follow(&mut self, pace: Pace, stop: &AtomicBool) -> Result<Followed, MinerError> {
        let f = self.node.follow(pace, stop).await?;
        self.off_state = matches!(f, Followed::Forked { .. });
        match &f {
            Followed::Forked { .. } => tracing::warn!("{}", f.describe()),
            _ => tracing::debug!("{}", f.describe()),
        }
        self.emit(MinerEvent::Followed(f.clone()));
        Ok(f)
    }

    /// The node (data, bucket, chain, model state) this miner runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node, mutably (test drivers use it to make a miner miss an aggregate).
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// Compute the gradient of the held window on this miner's pages (batching and
    /// training run on blocking threads). `Ok(None)` when cancelled or skipped.
    /// A miner whose last follow ended off the accepted state (an unrepaired fork) skips
    /// the window: a slice of a stale state would only be rejected as `stale-state`.
    pub async fn compute_gradient(&self, stop: &Arc<AtomicBool>) -> Result<Option<WindowGradient>, MinerError> {
        let w = self.node.window;
        if self.off_state {
            let reason = "this node is off the accepted state (a fork not repaired yet): not training on it";
            tracing::warn!(window = w, "{reason}");
            self.emit(MinerEvent::Skipped { window: w, reason: reason.into() });
            return Ok(None);
        }
        let h = &self.node.cfg.hparams;
        let pages = self.node.dataset.pages(&h.network, &self.node.cfg.hotkey, w, h.pages_per_window);
        let prefetched = self.prefetch.lock().ok().and_then(|mut p| p.take()).filter(|(pw, _)| *pw == w);
        let task = match prefetched {
            Some((_, task)) => task,
            None => self.spawn_batch(w),
        };
        let batch = task.await.map_err(|e| MinerError::Config(format!("batch task failed: {e}")))??;
        self.emit(MinerEvent::PagesLoaded { window: w, pages: pages.len(), tokens: batch.n_targets });
        let (model, params, device, rows) = (
            Llama::new(&self.node.params)?,
            self.node.params.clone(),
            self.node.cfg.device.clone(),
            self.node.cfg.micro_batch_rows,
        );
        let flag = stop.clone();
        let started = Instant::now();
        let grad = tokio::task::spawn_blocking(move || {
            step::window_gradient(&model, &params, &batch, rows, &device, || !flag.load(Ordering::Relaxed))
        })
        .await
        .map_err(|e| MinerError::Config(format!("training task failed: {e}")))?;
        crate::telemetry::phase_seconds("step", started.elapsed().as_secs_f64());
        match grad {
            Ok(g) => {
                metrics::gauge!(crate::telemetry::LOSS).set(g.loss);
                metrics::gauge!(crate::telemetry::TOKENS_PER_SECOND).set(g.tokens_per_sec());
                self.emit(MinerEvent::StepDone { window: w, loss: g.loss, tokens_per_sec: g.tokens_per_sec() });
                Ok(Some(g))
            }
            Err(StepError::Cancelled) => Ok(None),
            Err(e) => {
                self.emit(MinerEvent::Skipped { window: w, reason: e.to_string() });
                Ok(None)
            }
        }
    }

    /// Read and tokenise the pages of `window` on a blocking thread.
    fn spawn_batch(&self, window: u64) -> tokio::task::JoinHandle<Result<WindowBatch, crate::data::DataError>> {
        let h = &self.node.cfg.hparams;
        let pages = self.node.dataset.pages(&h.network, &self.node.cfg.hotkey, window, h.pages_per_window);
        let (ds, tok, h) = (self.node.dataset.clone(), self.node.tokenizer.clone(), h.clone());
        tokio::task::spawn_blocking(move || h.window_batch(&ds, &tok, &pages))
    }

    /// Start preparing the batch of `window` now (pages do not depend on the model), so
    /// that reading and tokenising overlap with waiting for the merge.
    pub fn prefetch(&self, window: u64) {
        if let Ok(mut p) = self.prefetch.lock() {
            *p = Some((window, self.spawn_batch(window)));
        }
    }

    /// The encoded slice of the held window for `seed`: the dithered codes of `g[I]`.
    pub fn build_slice(&self, seed: &BlockHash, grad: &WindowGradient) -> Result<Vec<u8>, MinerError> {
        let g = self.slice_gradient(seed, grad)?;
        self.encode_slice(seed, &g)
    }

    /// `g[I]`: the gradient at the slice coordinates of `seed`.
    pub fn slice_gradient(&self, seed: &BlockHash, grad: &WindowGradient) -> Result<Vec<Vec<f32>>, MinerError> {
        let indices = SliceIndices::select(self.node.params.specs(), seed, self.node.cfg.hparams.compression);
        Ok(slices::gather_grads(&grad.grads, &indices)?)
    }

    /// The slice of the held window for `seed` whose codes quantise `g_at_i` (one vector per
    /// parameter at the slice coordinates) with this miner's public dithers.
    pub fn encode_slice(&self, seed: &BlockHash, g_at_i: &[Vec<f32>]) -> Result<Vec<u8>, MinerError> {
        let w = self.node.window;
        let h = &self.node.cfg.hparams;
        let indices = SliceIndices::select(self.node.params.specs(), seed, h.compression);
        let codec = h.codec();
        let dithers = slices::dithers(seed, &self.node.cfg.hotkey, &indices);
        let codes = slices::encode_gradient(&codec, g_at_i, &dithers);
        let names: Vec<String> = self.node.params.specs().iter().map(|s| s.name.clone()).collect();
        slices::encode(&self.node.ctx.meta(w, &self.node.cfg.hotkey, &self.node.state_hash), &names, &codec, &codes)
            .map_err(|e| MinerError::Config(format!("cannot encode own slice: {e}")))
    }

    /// Upload `bytes` as this miner's slice of the held window, retrying until shortly
    /// before `deadline_ms`. Returns whether it was stored.
    pub async fn upload_slice(&self, bytes: Vec<u8>, deadline_ms: u64, stop: &AtomicBool) -> bool {
        let w = self.node.window;
        let started = Instant::now();
        let size = bytes.len();
        let key = crate::protocol::slice_key(w, &self.node.cfg.hotkey);
        let body = Bytes::from(bytes);
        loop {
            crate::telemetry::phase("upload");
            match self.node.bucket.put(&key, body.clone()).await {
                Ok(()) => {
                    metrics::counter!(crate::telemetry::BYTES_UP).increment(size as u64);
                    metrics::counter!(crate::telemetry::UPLOADS, "result" => "ok").increment(1);
                    crate::telemetry::phase_seconds("upload", started.elapsed().as_secs_f64());
                    self.emit(MinerEvent::SliceUploaded {
                        window: w,
                        bytes: size,
                        seconds: started.elapsed().as_secs_f64(),
                    });
                    return true;
                }
                Err(e) if now_ms() + 500 < deadline_ms && !stop.load(Ordering::Relaxed) => {
                    tracing::warn!(window = w, error = %e, "upload failed; retrying before the deadline");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => {
                    metrics::counter!(crate::telemetry::UPLOADS, "result" => "failed").increment(1);
                    self.emit(MinerEvent::UploadFailed { window: w, reason: e.to_string() });
                    return false;
                }
            }
        }
    }

    /// Train on the current window and upload the slice. Returns whether a slice was uploaded.
    async fn train_and_upload(&mut self, stop: &Arc<AtomicBool>) -> Result<bool, MinerError> {
        let w = self.node.window;
        self.emit(MinerEvent::WindowStarted { window: w });
        crate::telemetry::phase("train");
        let Some(grad) = self.compute_gradient(stop).await? else { return Ok(false) };
        // The slice seed exists once the next window's first block does.
        let seed_block = self.node.cfg.hparams.first_block(w + 1);
        let deadline = self.node.ctx.deadline_ms(w).await?;
        let wait = Duration::from_millis(deadline.saturating_sub(now_ms())) + self.node.chain.block_time();
        if let Err(e) = self.node.chain.wait_for_block(seed_block, wait).await {
            self.emit(MinerEvent::UploadFailed { window: w, reason: e.to_string() });
            return Ok(false);
        }
        let seed = self.node.ctx.seed(w).await?;
        let bytes = self.build_slice(&seed, &grad)?;
        Ok(self.upload_slice(bytes, deadline, stop).await)
    }

    /// Run the window loop until `max_windows` windows were trained (then follow the last
    /// one and return) or `stop` is set. State is saved after every window.
    pub async fn run(&mut self, max_windows: Option<u64>, stop: Arc<AtomicBool>) -> Result<MinerSummary, MinerError> {
        self.emit(MinerEvent::Started {
            uid: self.node.uid,
            window: self.node.window,
            origin: self.node.origin.clone(),
        });
        let mut summary = MinerSummary::default();
        while !stop.load(Ordering::Relaxed) {
            if max_windows.is_some_and(|m| summary.windows_trained >= m) {
                break;
            }
            let current = match self.node.chain_window().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "chain unavailable; retrying");
                    tokio::time::sleep(self.node.chain.block_time()).await;
                    continue;
                }
            };
            // Train the held window while its upload deadline is still ahead (with room for
            // the last step's duration); otherwise catch up on it without training.
            if self.node.window < current {
                let w = self.node.window;
                let can_train = match self.node.ctx.deadline_ms(w).await {
                    Ok(d) => w + 1 == current && now_ms() + self.last_step_ms < d,
                    Err(_) => false,
                };
                if !can_train {
                    if current - w > 1 {
                        tracing::info!(from = w, to = current, "catching up on missed windows");
                    }
                    match self.follow(Pace::Live, &stop).await {
                        Ok(_) => summary.windows_caught_up += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot follow the window; retrying");
                            tokio::time::sleep(self.node.chain.block_time()).await;
                        }
                    }
                    continue;
                }
            }
            if self.node.window > current {
                tokio::time::sleep(self.node.chain.block_time() / 4).await;
                continue;
            }
            let started = Instant::now();
            match self.train_and_upload(&stop).await {
                Ok(uploaded) => {
                    summary.windows_trained += 1;
                    summary.slices_uploaded += uploaded as u64;
                }
                Err(e) => {
                    tracing::warn!(window = self.node.window, error = %e, "window failed");
                    self.emit(MinerEvent::Skipped { window: self.node.window, reason: e.to_string() });
                    summary.windows_trained += 1;
                }
            }
            self.last_step_ms = started.elapsed().as_millis() as u64;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Prepare the next window's data while this one's accepted set is decided.
            self.prefetch(self.node.window + 1);
            loop {
                match self.follow(Pace::Live, &stop).await {
                    Ok(_) => {
                        summary.windows_merged += 1;
                        break;
                    }
                    Err(e) if !stop.load(Ordering::Relaxed) => {
                        tracing::warn!(error = %e, "cannot follow the window; retrying");
                        tokio::time::sleep(self.node.chain.block_time()).await;
                    }
                    Err(_) => break,
                }
            }
        }
        if let Err(e) = self.node.save_state() {
            tracing::error!(error = %e, "cannot save local state");
        }
        Ok(summary)
    }
}
