//! What every node (miner or validator) does to join a network: open data, tokenizer and
//! own bucket, register (devnet) and commit the bucket URL, and bootstrap the model state.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bistro_chain::{Chain, ChainError};
use bistro_model::{ModelConfig, Params};
use candle_core::Device;

use crate::data::{Dataset, TextTokenizer};
use crate::hparams::HParams;
use crate::state::{self, StateInfo};
use crate::storage::{Bucket, BucketOptions};
use crate::sync::{SyncContext, SyncError, WindowSlices};

/// Errors that stop a node (a peer's bad data or a transient outage never does).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Configuration is wrong.
    #[error("config: {0}")]
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
    /// Window sync failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// Settings every node shares.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The network's hyper-parameters.
    pub hparams: HParams,
    /// The subnet.
    pub netuid: u16,
    /// This node's hotkey.
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

/// A node that has joined the network: its data, bucket, uid and model state.
pub struct Node {
    /// The settings.
    pub cfg: NodeConfig,
    /// The chain.
    pub chain: Arc<dyn Chain>,
    /// Window synchronisation.
    pub ctx: SyncContext,
    /// The model config.
    pub model_config: ModelConfig,
    /// The dataset.
    pub dataset: Arc<Dataset>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// Own bucket.
    pub bucket: Bucket,
    /// Own uid.
    pub uid: u16,
    /// `theta_w`.
    pub params: Params,
    /// The window `params` belongs to.
    pub window: u64,
    /// Where `params` came from.
    pub origin: String,
}

/// Wall-clock time in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Sleep until the wall clock reaches `unix_ms`, or `stop` is set.
pub async fn sleep_until_ms(unix_ms: u64, stop: &AtomicBool) {
    loop {
        let now = now_ms();
        if now >= unix_ms || stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis((unix_ms - now).min(200))).await;
    }
}

impl Node {
    /// Join: validate the config, open data and bucket, register (devnet) or check the
    /// registration (`register_hint` says how to register), commit the bucket URL when it
    /// changed, and bootstrap the model.
    pub async fn join(cfg: NodeConfig, chain: Arc<dyn Chain>, register_hint: &str) -> Result<Self, NodeError> {
        cfg.hparams.validate().map_err(|e| NodeError::Config(e.to_string()))?;
        let model_config = ModelConfig::resolve(&cfg.hparams.model)?;
        let tokenizer = TextTokenizer::open(&cfg.hparams.tokenizer)?;
        if tokenizer.vocab_size() > model_config.vocab_size {
            return Err(NodeError::Config(format!(
                "tokenizer {} has {} tokens but the model's vocabulary is {}",
                tokenizer.source_name(),
                tokenizer.vocab_size(),
                model_config.vocab_size
            )));
        }
        if cfg.hparams.seq_len > model_config.max_position_embeddings {
            return Err(NodeError::Config(format!(
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
            None => {
                chain.metagraph(cfg.netuid).await?.uid_of(&cfg.hotkey).ok_or_else(|| ChainError::NotRegistered {
                    hotkey: cfg.hotkey.clone(),
                    netuid: cfg.netuid,
                    hint: register_hint.to_string(),
                })?
            }
        };
        if chain.commitment(cfg.netuid, &cfg.hotkey).await?.as_deref() != Some(bucket.url()) {
            chain.set_commitment(cfg.netuid, &cfg.hotkey, bucket.url()).await?;
            tracing::info!(bucket = bucket.url(), "committed bucket URL on chain");
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| NodeError::Config(format!("cannot create state dir {}: {e}", cfg.state_dir.display())))?;
        let (params, window, origin) = ctx.bootstrap(&cfg.hotkey, &cfg.state_dir, &model_config, &cfg.device).await?;
        Ok(Node {
            chain,
            ctx,
            model_config,
            dataset: Arc::new(dataset),
            tokenizer: Arc::new(tokenizer),
            bucket,
            uid,
            params,
            window,
            origin,
            cfg,
        })
    }

    /// Save `theta_w` and its window to the state directory.
    pub fn save_state(&self) -> Result<(), state::StateError> {
        let info = StateInfo {
            window: self.window,
            hparams_hash: self.ctx.hparams_hash.clone(),
            model_hash: self.ctx.model_hash.clone(),
        };
        state::save(&self.cfg.state_dir, &self.params, &info)
    }

    /// The current window of the chain.
    pub async fn chain_window(&self) -> Result<u64, ChainError> {
        Ok(self.cfg.hparams.window_of(self.chain.block_number().await?))
    }

    /// Wait for the deadline of the held window, collect its slices (retrying while the
    /// chain or storage is down), merge them (theta moves to the next window), save state and
    /// publish a checkpoint when due. Returns the window's slices, and `theta_w` as it was
    /// before the merge when `keep_theta`.
    pub async fn merge_window(
        &mut self,
        stop: &AtomicBool,
        keep_theta: bool,
    ) -> Result<(WindowSlices, Option<Params>), NodeError> {
        let w = self.window;
        let deadline = self.ctx.deadline_ms(w).await?;
        sleep_until_ms(deadline, stop).await;
        let ws = loop {
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
        self.apply(ws, keep_theta).await
    }

    /// Collect and merge the held window now, without waiting for its deadline (for
    /// drivers that run windows in lockstep, such as the in-process devnet).
    pub async fn merge_now(&mut self, keep_theta: bool) -> Result<(WindowSlices, Option<Params>), NodeError> {
        let ws = self.ctx.collect(&self.params, self.window).await?;
        self.apply(ws, keep_theta).await
    }

    async fn apply(
        &mut self,
        mut ws: WindowSlices,
        keep_theta: bool,
    ) -> Result<(WindowSlices, Option<Params>), NodeError> {
        let theta_w = if keep_theta { Some(self.params.deep_clone()?) } else { None };
        self.ctx.merge(&self.params, &mut ws)?;
        self.window = ws.window + 1;
        if let Err(e) = self.save_state() {
            tracing::error!(error = %e, "cannot save local state");
        }
        crate::sync::publish_checkpoint_and_cleanup(
            &self.bucket,
            &self.cfg.hotkey,
            &self.params,
            self.window,
            &self.cfg.hparams,
        )
        .await;
        Ok((ws, theta_w))
    }
}

/// One event callback.
pub type Listener<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// Callbacks that observe a node's events (`Miner::on_event`, `Validator::on_event`).
pub struct Listeners<E>(Vec<Listener<E>>);

impl<E> Default for Listeners<E> {
    fn default() -> Self {
        Listeners(Vec::new())
    }
}

impl<E> Listeners<E> {
    /// Register `f`.
    pub fn add(&mut self, f: impl Fn(&E) + Send + Sync + 'static) {
        self.0.push(Arc::new(f));
    }

    /// Call every listener with `e`.
    pub fn emit(&self, e: &E) {
        for l in &self.0 {
            l(e);
        }
    }
}

/// Hotkeys and reason codes of the slices a merge did not use (invalid ones and outliers).
pub fn rejected_of(ws: &WindowSlices) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = ws
        .peers
        .iter()
        .filter_map(|p| p.outcome.as_ref().err().map(|r| (p.hotkey.clone(), r.code().to_string())))
        .collect();
    out.extend(ws.outliers.iter().map(|(h, r)| (h.clone(), r.code().to_string())));
    out
}

/// Hotkeys whose slices a merge used.
pub fn accepted_of(ws: &WindowSlices) -> Vec<String> {
    ws.peers
        .iter()
        .filter(|p| p.outcome.is_ok() && !ws.outliers.iter().any(|(h, _)| h == &p.hotkey))
        .map(|p| p.hotkey.clone())
        .collect()
}
