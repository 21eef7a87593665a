//! The miner: follow the chain window by window, train on the assigned pages, upload the
//! slice after the window ends, merge everyone's accepted slices.
//!
//! Embed it in an application with [`Miner::new`], observe it with [`Miner::on_event`],
//! and drive it with [`Miner::run`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bistro_chain::{Chain, ChainError};
use bistro_model::{Llama, ModelConfig, Params};
use bytes::Bytes;
use candle_core::Device;

use crate::data::{Dataset, TextTokenizer};
use crate::hparams::HParams;
use crate::slices::{self, SliceIndices};
use crate::state::{self, StateInfo};
use crate::step::{self, StepError};
use crate::storage::{Bucket, BucketOptions};
use crate::sync::{SyncContext, SyncError, WindowSlices};

/// Errors that stop a miner (everything a peer or a transient outage causes is logged and survived).
#[derive(Debug, thiserror::Error)]
pub enum MinerError {
    /// Configuration is wrong.
    #[error("miner config: {0}")]
    Config(String),
    /// The chain refused something fatal (e.g. the hotkey is not registered).
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The model could not be built or loaded.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// The data could not be opened.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Own bucket cannot be opened.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// Local state cannot be used.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Window sync failed fatally.
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// Everything a miner needs.
#[derive(Clone, Debug)]
pub struct MinerConfig {
    /// The network's hyper-parameters.
    pub hparams: HParams,
    /// The subnet.
    pub netuid: u16,
    /// This miner's hotkey.
    pub hotkey: String,
    /// Own bucket URL (committed on chain).
    pub bucket_url: String,
    /// Credentials and transfer settings.
    pub bucket_options: BucketOptions,
    /// Directory for local state (model and window).
    pub state_dir: PathBuf,
    /// Compute device.
    pub device: Device,
    /// Rows per micro-batch (gradient accumulation).
    pub micro_batch_rows: usize,
    /// Register with this stake on a devnet (None: must already be registered).
    pub auto_register: Option<u64>,
    /// Accept peers' `file://` buckets (devnet only).
    pub allow_local_buckets: bool,
}

/// What a miner reports while it runs.
#[derive(Clone, Debug, PartialEq)]
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
    /// A window's slices were merged into the model.
    Merged {
        /// The window that was merged (theta now belongs to `window + 1`).
        window: u64,
        /// Accepted slices (hotkeys).
        accepted: Vec<String>,
        /// Rejected slices: (hotkey, reason code).
        rejected: Vec<(String, String)>,
    },
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
    /// Windows merged.
    pub windows_merged: u64,
    /// Last training loss.
    pub last_loss: Option<f64>,
}

type Listener = Arc<dyn Fn(&MinerEvent) + Send + Sync>;

/// A miner node.
pub struct Miner {
    cfg: MinerConfig,
    chain: Arc<dyn Chain>,
    ctx: SyncContext,
    model_config: ModelConfig,
    params: Params,
    window: u64,
    dataset: Arc<Dataset>,
    tokenizer: Arc<TextTokenizer>,
    bucket: Bucket,
    uid: u16,
    origin: String,
    listeners: Vec<Listener>,
}

impl std::fmt::Debug for Miner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miner").field("hotkey", &self.cfg.hotkey).field("uid", &self.uid).field("window", &self.window).finish()
    }
}

/// Sleep until the wall clock reaches `unix_ms`, or `stop` is set.
async fn sleep_until_ms(unix_ms: u64, stop: &AtomicBool) {
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        if now >= unix_ms || stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis((unix_ms - now).min(200))).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Miner {
    /// Build a miner: open data, model state and bucket; register (devnet) and commit the bucket URL.
    pub async fn new(cfg: MinerConfig, chain: Arc<dyn Chain>) -> Result<Self, MinerError> {
        cfg.hparams.validate().map_err(|e| MinerError::Config(e.to_string()))?;
        let model_config = ModelConfig::resolve(&cfg.hparams.model)?;
        let tokenizer = TextTokenizer::open(&cfg.hparams.tokenizer)?;
        if tokenizer.vocab_size() > model_config.vocab_size {
            return Err(MinerError::Config(format!(
                "tokenizer {} has {} tokens but the model's vocabulary is {}",
                tokenizer.source_name(),
                tokenizer.vocab_size(),
                model_config.vocab_size
            )));
        }
        if cfg.hparams.seq_len > model_config.max_position_embeddings {
            return Err(MinerError::Config(format!(
                "seq_len {} exceeds the model's max_position_embeddings {}",
                cfg.hparams.seq_len, model_config.max_position_embeddings
            )));
        }
        let dataset = Dataset::open(&cfg.hparams.dataset, cfg.hparams.rows_per_page)?;
        let bucket = Bucket::open(&cfg.bucket_url, &cfg.bucket_options)?;
        let ctx = SyncContext {
            chain: chain.clone(),
            netuid: cfg.netuid,
            hparams: cfg.hparams.clone(),
            hparams_hash: cfg.hparams.hash(),
            model_hash: model_config.hash(),
            bucket_options: cfg.bucket_options.clone(),
            allow_local_buckets: cfg.allow_local_buckets,
            concurrency: 8,
        };
        let uid = match cfg.auto_register {
            Some(stake) => chain.ensure_registered(cfg.netuid, &cfg.hotkey, stake).await?,
            None => chain.metagraph(cfg.netuid).await?.uid_of(&cfg.hotkey).ok_or_else(|| ChainError::NotRegistered {
                hotkey: cfg.hotkey.clone(),
                netuid: cfg.netuid,
                hint: " (register it with `btcli subnet register`)".into(),
            })?,
        };
        if chain.commitment(cfg.netuid, &cfg.hotkey).await?.as_deref() != Some(bucket.url()) {
            chain.set_commitment(cfg.netuid, &cfg.hotkey, bucket.url()).await?;
            tracing::info!(bucket = bucket.url(), "committed bucket URL on chain");
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| MinerError::Config(format!("cannot create state dir {}: {e}", cfg.state_dir.display())))?;
        let (params, window, origin) = ctx.bootstrap(&cfg.hotkey, &cfg.state_dir, &model_config, &cfg.device).await?;
        Ok(Miner {
            chain,
            ctx,
            model_config,
            params,
            window,
            dataset: Arc::new(dataset),
            tokenizer: Arc::new(tokenizer),
            bucket,
            uid,
            origin,
            listeners: Vec::new(),
            cfg,
        })
    }

    /// Call `f` for every event.
    pub fn on_event(&mut self, f: impl Fn(&MinerEvent) + Send + Sync + 'static) {
        self.listeners.push(Arc::new(f));
    }

    fn emit(&self, e: MinerEvent) {
        for l in &self.listeners {
            l(&e);
        }
    }

    /// The parameters held now (`theta_w` for [`Miner::window`]).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The window the held parameters belong to.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// This miner's uid.
    pub fn uid(&self) -> u16 {
        self.uid
    }

    /// The model config.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn save_state(&self) -> Result<(), MinerError> {
        let info = StateInfo { window: self.window, hparams_hash: self.ctx.hparams_hash.clone(), model_hash: self.ctx.model_hash.clone() };
        state::save(&self.cfg.state_dir, &self.params, &info)?;
        Ok(())
    }

    /// Merge the slices of `self.window` (waiting for its deadline) and advance.
    async fn merge_current(&mut self, stop: &AtomicBool) -> Result<WindowSlices, MinerError> {
        let w = self.window;
        let deadline = self.ctx.deadline_ms(w).await?;
        sleep_until_ms(deadline, stop).await;
        let mut ws = loop {
            match self.ctx.collect(&self.params, w).await {
                Ok(ws) => break ws,
                Err(e) => {
                    tracing::warn!(window = w, error = %e, "cannot collect slices; retrying");
                    if stop.load(Ordering::Relaxed) {
                        return Err(e.into());
                    }
                    tokio::time::sleep(self.chain.block_time()).await;
                }
            }
        };
        let agg = self.ctx.merge(&self.params, &mut ws)?;
        self.window = w + 1;
        let rejected = ws
            .peers
            .iter()
            .filter_map(|p| p.outcome.as_ref().err().map(|r| (p.hotkey.clone(), r.code().to_string())))
            .collect();
        self.emit(MinerEvent::Merged { window: w, accepted: agg.used.clone(), rejected });
        if let Err(e) = self.save_state() {
            tracing::error!(error = %e, "cannot save local state");
        }
        self.publish_checkpoint_and_cleanup().await;
        Ok(ws)
    }

    async fn publish_checkpoint_and_cleanup(&self) {
        crate::sync::publish_checkpoint_and_cleanup(&self.bucket, &self.cfg.hotkey, &self.params, self.window, &self.cfg.hparams).await;
    }

    /// Train on the current window and upload the slice. Returns whether a slice was uploaded.
    async fn train_and_upload(&mut self, stop: &Arc<AtomicBool>) -> Result<bool, MinerError> {
        let w = self.window;
        let h = &self.cfg.hparams;
        self.emit(MinerEvent::WindowStarted { window: w });
        let pages = self.dataset.pages(&h.network, &self.cfg.hotkey, w, h.pages_per_window);
        let (ds, tok, seq) = (self.dataset.clone(), self.tokenizer.clone(), h.seq_len);
        let pages_for_batch = pages.clone();
        let batch = tokio::task::spawn_blocking(move || ds.window_batch(&tok, &pages_for_batch, seq))
            .await
            .map_err(|e| MinerError::Config(format!("batch task failed: {e}")))??;
        self.emit(MinerEvent::PagesLoaded { window: w, pages: pages.len(), tokens: batch.n_targets });
        let (model, params, device, rows) =
            (Llama::new(&self.params)?, self.params.clone(), self.cfg.device.clone(), self.cfg.micro_batch_rows);
        let flag = stop.clone();
        let grad = tokio::task::spawn_blocking(move || step::window_gradient(&model, &params, &batch, rows, &device, || !flag.load(Ordering::Relaxed)))
            .await
            .map_err(|e| MinerError::Config(format!("training task failed: {e}")))?;
        let grad = match grad {
            Ok(g) => g,
            Err(StepError::Cancelled) => return Ok(false),
            Err(e) => {
                self.emit(MinerEvent::Skipped { window: w, reason: e.to_string() });
                return Ok(false);
            }
        };
        self.emit(MinerEvent::StepDone { window: w, loss: grad.loss, tokens_per_sec: grad.tokens_per_sec() });
        // The slice seed exists once the next window's first block does.
        let seed_block = h.first_block(w + 1);
        let deadline = self.ctx.deadline_ms(w).await?;
        let wait = Duration::from_millis(deadline.saturating_sub(now_ms())) + self.chain.block_time();
        if let Err(e) = self.chain.wait_for_block(seed_block, wait).await {
            self.emit(MinerEvent::UploadFailed { window: w, reason: e.to_string() });
            return Ok(false);
        }
        let seed = self.ctx.seed(w).await?;
        let started = Instant::now();
        let indices = SliceIndices::select(self.params.specs(), &seed, h.compression);
        let theta = slices::gather_params(&self.params, &indices)?;
        let g = slices::gather_grads(&grad.grads, &indices)?;
        let values = slices::step_values(&theta, &g, h.learning_rate_at(w));
        let names: Vec<String> = self.params.specs().iter().map(|s| s.name.clone()).collect();
        let bytes = slices::encode(&self.ctx.meta(w, &self.cfg.hotkey), &names, &values)
            .map_err(|e| MinerError::Config(format!("cannot encode own slice: {e}")))?;
        let size = bytes.len();
        let key = slices::slice_key(w, &self.cfg.hotkey);
        loop {
            match self.bucket.put(&key, Bytes::from(bytes.clone())).await {
                Ok(()) => {
                    self.emit(MinerEvent::SliceUploaded { window: w, bytes: size, seconds: started.elapsed().as_secs_f64() });
                    return Ok(true);
                }
                Err(e) if now_ms() + 500 < deadline && !stop.load(Ordering::Relaxed) => {
                    tracing::warn!(window = w, error = %e, "upload failed; retrying before the deadline");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => {
                    self.emit(MinerEvent::UploadFailed { window: w, reason: e.to_string() });
                    return Ok(false);
                }
            }
        }
    }

    /// Run the window loop until `max_windows` windows were trained (then merge the last
    /// one and return) or `stop` is set. State is saved after every merge.
    pub async fn run(&mut self, max_windows: Option<u64>, stop: Arc<AtomicBool>) -> Result<MinerSummary, MinerError> {
        self.emit(MinerEvent::Started { uid: self.uid, window: self.window, origin: self.origin.clone() });
        let mut summary = MinerSummary::default();
        while !stop.load(Ordering::Relaxed) {
            if max_windows.is_some_and(|m| summary.windows_trained >= m) {
                break;
            }
            let current = match self.chain.block_number().await {
                Ok(b) => self.cfg.hparams.window_of(b),
                Err(e) => {
                    tracing::warn!(error = %e, "chain unavailable; retrying");
                    tokio::time::sleep(self.chain.block_time()).await;
                    continue;
                }
            };
            // Catch up: merge every window we hold an older state for.
            if self.window < current {
                if current - self.window > 1 {
                    tracing::info!(from = self.window, to = current, "catching up on missed windows");
                }
                if let Err(e) = self.merge_current(&stop).await {
                    tracing::warn!(error = %e, "merge failed");
                    continue;
                }
                summary.windows_merged += 1;
                continue;
            }
            if self.window > current {
                tokio::time::sleep(self.chain.block_time() / 4).await;
                continue;
            }
            match self.train_and_upload(&stop).await {
                Ok(uploaded) => {
                    summary.windows_trained += 1;
                    summary.slices_uploaded += uploaded as u64;
                }
                Err(e) => {
                    tracing::warn!(window = self.window, error = %e, "window failed");
                    self.emit(MinerEvent::Skipped { window: self.window, reason: e.to_string() });
                    summary.windows_trained += 1;
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Merge the window just trained (its deadline is in the next window).
            match self.merge_current(&stop).await {
                Ok(_) => summary.windows_merged += 1,
                Err(e) => tracing::warn!(error = %e, "merge failed"),
            }
        }
        if let Err(e) = self.save_state() {
            tracing::error!(error = %e, "cannot save local state");
        }
        Ok(summary)
    }
}

