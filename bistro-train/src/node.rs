//! What every node (miner or validator) does: join a network (open data, tokenizer and own
//! bucket, register on a devnet, commit the bucket URL, bootstrap the model state) and, every
//! window, follow the accepted set: find the aggregate, check it against its own state,
//! repair a fork, apply it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bistro_chain::{Chain, ChainError};
use bistro_model::{ModelConfig, Params};
use candle_core::Device;

use bytes::Bytes;

use crate::accepted::{AcceptedSet, AggregateObject, state_hash, validators_by_stake};
use crate::data::{Dataset, TextTokenizer};
use crate::history::{HistoryError, apply_checked, short};
use crate::hparams::HParams;
use crate::state::{self, StateInfo};
use crate::storage::{Bucket, BucketOptions};
use crate::sync::{SyncContext, SyncError};

/// Errors that stop a node (a peer's bad data or a transient outage never does).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Configuration is wrong.
    #[error("config: {0}")]
    Config(String),
    /// The hyper-parameters are invalid.
    #[error(transparent)]
    HParams(#[from] crate::hparams::HParamsError),
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
    /// Accept peers' endpoints on internal addresses (devnet and tests only).
    pub allow_private_endpoints: bool,
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
    /// [`state_hash`] of `params`.
    pub state_hash: String,
    /// Where `params` came from.
    pub origin: String,
    /// Whether this node keeps a published history (validators: applied aggregates and
    /// checkpoints in its bucket, for joiners and repairs).
    pub publishes_history: bool,
    /// Forks detected (an aggregate's parent was not this node's state).
    pub forks: u64,
    /// Forks repaired from a validator's verified history.
    pub repairs: u64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("hotkey", &self.cfg.hotkey)
            .field("uid", &self.uid)
            .field("window", &self.window)
            .field("state", &short(&self.state_hash))
            .finish()
    }
}

/// How a node waits for the accepted set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Follow the wall clock: wait for the upload deadline, poll the lead until its cut-off,
    /// then the fallback validators until theirs.
    Live,
    /// Look once, in fallback order, without waiting (drivers that run windows in lockstep,
    /// such as the in-process devnet). `Live` also looks only once for a window whose
    /// cut-offs have passed, so catching up never waits.
    Lockstep,
}

/// What happened to a window's accepted set at this node.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Followed {
    /// An aggregate was applied.
    Applied {
        /// The window (the state now belongs to `window + 1`).
        window: u64,
        /// Hotkey of the validator whose bucket it came from.
        from: String,
        /// The decision.
        set: AcceptedSet,
        /// Whether a fork was detected and repaired first.
        repaired: bool,
    },
    /// No validator published an aggregate in time: the state stays as it is.
    NoUpdate {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
    /// A fork was detected and could not be repaired this window: the state is kept, the
    /// node moves on and tries again with the next aggregate.
    Forked {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
}

impl Followed {
    /// The window this outcome is about.
    pub fn window(&self) -> u64 {
        match self {
            Followed::Applied { window, .. } | Followed::NoUpdate { window, .. } | Followed::Forked { window, .. } => {
                *window
            }
        }
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        match self {
            Followed::Applied { window, from, set, repaired } => {
                let excl: Vec<String> = set.excluded.iter().map(|x| format!("{}: {}", x.hotkey, x.reason)).collect();
                format!(
                    "window {window}: applied the accepted set of {} ({} included, {} scored{}){}{}",
                    from,
                    set.included.len(),
                    set.scored,
                    if from != &set.lead { format!(", decided by {}", set.lead) } else { String::new() },
                    if excl.is_empty() { String::new() } else { format!("; excluded {}", excl.join(", ")) },
                    if *repaired { "; fork repaired first" } else { "" }
                )
            }
            Followed::NoUpdate { window, reason } => format!("window {window}: no update ({reason})"),
            Followed::Forked { window, reason } => format!("window {window}: FORKED, not repaired yet ({reason})"),
        }
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
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

/// One validator that may publish the accepted set, with its bucket.
struct Publisher {
    hotkey: String,
    bucket: Bucket,
}

impl Node {
    /// Join: validate the config, open data and bucket, register (devnet) or check the
    /// registration (`register_hint` says how to register), commit the bucket URL when it
    /// changed, and bootstrap the model: local state, else the newest verified checkpoint
    /// of the validators (most stake first), else genesis at window 0.
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
            hparams_hash: cfg.hparams.hash()?,
            model_hash: model_config.hash()?,
            bucket_options: cfg.bucket_options.clone(),
            allow_local_buckets: cfg.allow_local_buckets,
            allow_private_endpoints: cfg.allow_private_endpoints,
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
        let params = Params::genesis(&model_config, cfg.hparams.genesis_seed, &cfg.device)?;
        let state_hash = state_hash(&params)?;
        let mut node = Node {
            chain,
            ctx,
            model_config,
            dataset: Arc::new(dataset),
            tokenizer: Arc::new(tokenizer),
            bucket,
            uid,
            params,
            window: 0,
            state_hash,
            origin: format!("genesis (seed {})", cfg.hparams.genesis_seed),
            publishes_history: false,
            forks: 0,
            repairs: 0,
            cfg,
        };
        node.bootstrap().await?;
        Ok(node)
    }

    async fn bootstrap(&mut self) -> Result<(), NodeError> {
        let dir = self.cfg.state_dir.clone();
        if let Some((info, params)) =
            crate::state::load(&dir, &self.model_config, &self.ctx.hparams_hash, &self.cfg.device)?
        {
            self.install(params, info.window)?;
            self.origin = format!("local state ({})", dir.display());
            return Ok(());
        }
        let chain_window = self.chain_window().await?;
        for p in self.publishers(true).await? {
            match self.ctx.rebuild_from(&p.bucket, &self.model_config, &self.cfg.device, None, chain_window).await {
                Ok(r) => {
                    self.install(r.params, r.window)?;
                    self.origin = format!("verified checkpoint of window {} from {}", r.checkpoint, p.hotkey);
                    return Ok(());
                }
                Err(e) => tracing::info!(validator = %p.hotkey, reason = %e, "no usable checkpoint"),
            }
        }
        Ok(())
    }

    /// Replace the held state (same config) and recompute its hash.
    fn install(&mut self, params: Params, window: u64) -> Result<(), NodeError> {
        self.params.assign(&params)?;
        self.window = window;
        self.state_hash = state_hash(&self.params)?;
        Ok(())
    }

    /// The lead: the first validator by stake among those with a usable commitment. Every
    /// role uses this one rule (red team 3, F7: the validator led by stake alone, followers
    /// skipped validators without a bucket, so a top-stake permit holder that does not run
    /// BISTRO left the network with no lead at all).
    pub async fn lead(&self) -> Result<Option<String>, ChainError> {
        Ok(self.publishers(false).await?.into_iter().next().map(|p| p.hotkey))
    }

    /// The validators that may publish the accepted set, in fallback order (the lead
    /// first), with their buckets: permit holders by stake that committed a bucket URL this
    /// node can open (this node's own bucket stands for itself, once it is committed).
    /// Validators whose bucket cannot be opened are skipped with a log line.
    async fn publishers(&self, exclude_self: bool) -> Result<Vec<Publisher>, ChainError> {
        let mg = self.chain.metagraph(self.cfg.netuid).await?;
        let mut out = Vec::new();
        for n in validators_by_stake(&mg) {
            let Some(url) = self.chain.commitment(self.cfg.netuid, &n.hotkey).await? else { continue };
            if n.hotkey == self.cfg.hotkey {
                if !exclude_self {
                    out.push(Publisher { hotkey: n.hotkey, bucket: self.bucket.clone() });
                }
                continue;
            }
            match self.ctx.peer_bucket(&url) {
                Ok(bucket) => out.push(Publisher { hotkey: n.hotkey, bucket }),
                Err(e) => tracing::warn!(validator = %n.hotkey, reason = %e, "cannot read this validator's bucket"),
            }
        }
        Ok(out)
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

    /// When nodes stop waiting for the lead's aggregate of `window` (Unix ms), and when they
    /// stop waiting for any aggregate of it.
    pub async fn cutoffs_ms(&self, window: u64) -> Result<(u64, u64), ChainError> {
        Ok(self.cutoffs_after(self.ctx.deadline_ms(window).await?))
    }

    /// The two cut-offs of a window whose upload deadline is `deadline` (Unix ms).
    fn cutoffs_after(&self, deadline: u64) -> (u64, u64) {
        let lead = deadline + self.cfg.hparams.aggregate_wait_ms;
        (lead, lead + self.cfg.hparams.fallback_wait_ms)
    }

    /// Wait for the held window's accepted set and apply it: the lead's aggregate, else the
    /// first fallback validator's, else no update. `candidate` is this validator's own
    /// aggregate, published to its bucket when the lead's is missing at the lead's cut-off.
    /// A parent mismatch is a fork: the node rebuilds its state from the publisher's
    /// verified history, then applies. State is saved; validators publish their history.
    pub async fn follow(
        &mut self,
        pace: Pace,
        stop: &AtomicBool,
        candidate: Option<Bytes>,
    ) -> Result<Followed, NodeError> {
        let w = self.window;
        crate::telemetry::phase("follow");
        let started = std::time::Instant::now();
        let indices = self.ctx.indices(&self.params, w).await?;
        let deadline = self.ctx.deadline_ms(w).await?;
        let (lead_cutoff, final_cutoff) = self.cutoffs_after(deadline);
        let publishers = self.publishers(false).await?;
        let mut found = None;
        if pace == Pace::Live {
            sleep_until_ms(deadline, stop).await;
        }
        // Live, every fetch runs under the cut-off it serves: a publisher that stalls instead
        // of answering costs at most that wait, and is not asked again in this window (red
        // team 3, F3: one stalling lead held every node for two 15 s attempts per poll).
        let mut stalled: std::collections::HashSet<String> = std::collections::HashSet::new();
        // The lead alone until its cut-off (once, in lockstep).
        if let Some(lead) = publishers.first() {
            loop {
                found = self.try_publisher_until(lead, &indices, w, pace, lead_cutoff, &mut stalled).await;
                if found.is_some()
                    || stalled.contains(&lead.hotkey)
                    || pace == Pace::Lockstep
                    || now_ms() >= lead_cutoff
                    || stop.load(Ordering::Relaxed)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if found.is_none()
            && let Some(bytes) = &candidate
            && publishers.first().is_some_and(|p| p.hotkey != self.cfg.hotkey)
            && (pace == Pace::Lockstep || now_ms() < final_cutoff)
        {
            tracing::info!(window = w, "the lead's aggregate is missing: publishing this validator's as a fallback");
            if let Err(e) = self.bucket.put(&crate::protocol::aggregate_key(w), bytes.clone()).await {
                tracing::warn!(window = w, error = %e, "cannot publish the fallback aggregate");
            }
        }
        while found.is_none() && !publishers.is_empty() {
            for p in &publishers {
                if stalled.contains(&p.hotkey) {
                    continue;
                }
                found = self.try_publisher_until(p, &indices, w, pace, final_cutoff, &mut stalled).await;
                if found.is_some() {
                    break;
                }
            }
            if found.is_some() || pace == Pace::Lockstep || now_ms() >= final_cutoff || stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut applied = None;
        let outcome = match found {
            None => {
                let reason = if publishers.is_empty() {
                    "no validator on the network".to_string()
                } else {
                    format!("no aggregate from {} validator(s) by the cut-off", publishers.len())
                };
                self.window = w + 1;
                Followed::NoUpdate { window: w, reason }
            }
            Some((who, obj, bytes)) => {
                let outcome = self.apply(who, obj, &indices, &publishers).await?;
                // A validator republishes what it applied from another validator.
                if matches!(&outcome, Followed::Applied { from, .. } if from != &self.cfg.hotkey) {
                    applied = Some(bytes);
                }
                outcome
            }
        };
        crate::telemetry::phase_seconds("follow", started.elapsed().as_secs_f64());
        crate::telemetry::aggregate(match &outcome {
            Followed::Applied { from, .. } if publishers.first().is_some_and(|p| &p.hotkey != from) => "fallback",
            Followed::Applied { .. } => "applied",
            Followed::NoUpdate { .. } => "missing",
            Followed::Forked { .. } => "forked",
        });
        if let Ok(cw) = self.chain_window().await {
            crate::telemetry::windows(self.window, cw);
        }
        if let Err(e) = self.save_state() {
            tracing::error!(error = %e, "cannot save local state");
        }
        if self.publishes_history {
            crate::history::publish_history(
                &self.bucket,
                &self.cfg.hotkey,
                applied.as_ref(),
                w,
                Some((self.window, &self.params)),
                &self.cfg.hparams,
            )
            .await;
        } else {
            crate::history::cleanup(&self.bucket, &self.cfg.hotkey, self.window, &self.cfg.hparams).await;
        }
        Ok(outcome)
    }

    /// [`Self::try_publisher`] under `cutoff_ms` (Unix ms) when live; a publisher that has
    /// not answered by then goes into `stalled`. This node's own bucket is read without the
    /// cut-off: what it published itself it must apply, or its published history would no
    /// longer link (a slow own bucket is this node's problem, not a peer's attack).
    async fn try_publisher_until(
        &self,
        p: &Publisher,
        indices: &crate::slices::SliceIndices,
        w: u64,
        pace: Pace,
        cutoff_ms: u64,
        stalled: &mut std::collections::HashSet<String>,
    ) -> Option<(String, AggregateObject, Bytes)> {
        if pace == Pace::Lockstep || p.hotkey == self.cfg.hotkey {
            return self.try_publisher(p, indices, w).await;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(cutoff_ms.saturating_sub(now_ms()));
        match tokio::time::timeout_at(until, self.try_publisher(p, indices, w)).await {
            Ok(found) => found,
            Err(_) => {
                tracing::warn!(window = w, validator = %p.hotkey, "no answer by the cut-off: not asked again this window");
                stalled.insert(p.hotkey.clone());
                None
            }
        }
    }

    async fn try_publisher(
        &self,
        p: &Publisher,
        indices: &crate::slices::SliceIndices,
        w: u64,
    ) -> Option<(String, AggregateObject, Bytes)> {
        match self.ctx.fetch_aggregate(&p.bucket, &self.params, indices, w).await {
            Ok(Some((obj, bytes))) => Some((p.hotkey.clone(), obj, bytes)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(window = w, validator = %p.hotkey, error = %e, "unusable aggregate");
                None
            }
        }
    }

    async fn apply(
        &mut self,
        who: String,
        obj: AggregateObject,
        indices: &crate::slices::SliceIndices,
        publishers: &[Publisher],
    ) -> Result<Followed, NodeError> {
        let w = obj.set.window;
        let mut repaired = false;
        if obj.set.parent != self.state_hash {
            self.forks += 1;
            tracing::warn!(
                window = w,
                own = short(&self.state_hash),
                expected = short(&obj.set.parent),
                from = %who,
                "fork detected: this state is not the one the accepted set applies to; repairing"
            );
            let bucket = publishers.iter().find(|p| p.hotkey == who).map(|p| p.bucket.clone());
            let chain_window = self.chain_window().await.unwrap_or(w + 1);
            let rebuilt = match bucket {
                Some(b) => self.ctx.rebuild_from(&b, &self.model_config, &self.cfg.device, Some(w), chain_window).await,
                None => Err(HistoryError::Other(format!("{who} has no bucket"))),
            };
            match rebuilt {
                Ok(r) if r.hash == obj.set.parent => {
                    self.install(r.params, w)?;
                    self.repairs += 1;
                    crate::telemetry::fork(true);
                    repaired = true;
                    tracing::info!(window = w, checkpoint = r.checkpoint, from = %who, "fork repaired");
                }
                Ok(r) => {
                    crate::telemetry::fork(false);
                    self.window = w + 1;
                    return Ok(Followed::Forked {
                        window: w,
                        reason: format!("rebuilt state {} is not {}", short(&r.hash), short(&obj.set.parent)),
                    });
                }
                Err(e) => {
                    crate::telemetry::fork(false);
                    self.window = w + 1;
                    return Ok(Followed::Forked { window: w, reason: e.to_string() });
                }
            }
        }
        match apply_checked(&self.params, indices, &obj, &self.state_hash) {
            Ok(h) => self.state_hash = h,
            Err(e) => {
                // The values were written but do not hash to what the aggregate names: the
                // next aggregate's parent check will find and repair the fork.
                self.state_hash = state_hash(&self.params)?;
                self.forks += 1;
                self.window = w + 1;
                return Ok(Followed::Forked { window: w, reason: e.to_string() });
            }
        }
        self.window = w + 1;
        Ok(Followed::Applied { window: w, from: who, set: obj.set, repaired })
    }
}

/// One event callback.
pub type Listener<E> = Arc<dyn Fn(&E) + Send + Sync>;

/// Callbacks that observe a node's events (`Miner::on_event`, `Validator::on_event`).
pub struct Listeners<E>(Vec<Listener<E>>);

impl<E> std::fmt::Debug for Listeners<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listeners({})", self.0.len())
    }
}

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
