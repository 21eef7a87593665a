//! What every node (miner or validator) does: join a network (open data, tokenizer and own
//! bucket, register on a devnet, commit the bucket URL, bootstrap the model state) and, every
//! window, follow the accepted set: find the aggregate, check it against its own state,
//! repair a fork, apply it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bistro_chain::{Chain, ChainError};
use bistro_model::{ModelConfig, Params};
use candle_core::Device;

use bytes::Bytes;

use crate::accepted::{AcceptedSet, AggregateObject, bytes_sha256, state_hash, validators_by_stake};
use crate::data::{Dataset, TextTokenizer};
use crate::history::{HistoryError, short};
use crate::hparams::HParams;
use crate::network::attestation::{self, Attestation, Tally, Voice};
use crate::public_adam::PublicAdam;
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

impl NodeError {
    /// Whether the operator's settings are wrong (hyper-parameters, network, model config,
    /// saved state of another network), as opposed to a failure at run time.
    pub fn is_config(&self) -> bool {
        match self {
            NodeError::Model(e) => e.is_config(),
            _ => matches!(
                self,
                NodeError::Config(_)
                    | NodeError::HParams(_)
                    | NodeError::Chain(ChainError::Config(_))
                    | NodeError::State(state::StateError::File { .. })
            ),
        }
    }
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
    /// The public optimizer state of window `window` (part of the shared state).
    pub adam: PublicAdam,
    /// The window `params` belongs to.
    pub window: u64,
    /// The identity of `params` and `adam` ([`crate::lineage`]: a hash chain over the
    /// applied updates, anchored by a full [`state_hash`] before every checkpoint).
    pub state_hash: String,
    /// The anchored link that names the held state, when the last update applied was an
    /// anchor's (what a checkpoint of it carries).
    pub anchor: Option<crate::lineage::Link>,
    /// The held state's full [`state_hash`], when known (genesis, a checkpoint, an anchor).
    pub full_hash: Option<String>,
    /// Where `params` came from.
    pub origin: String,
    /// Whether this node keeps a published history (validators: applied aggregates and
    /// checkpoints in its bucket, for joiners and repairs).
    pub publishes_history: bool,
    /// Forks detected (an aggregate's parent was not this node's state).
    pub forks: u64,
    /// Forks repaired from a validator's verified history.
    pub repairs: u64,
    /// Validators skipped, with the last window they are skipped in: a lead whose aggregate
    /// a stake majority disputed ([`attestation::DISPUTED_LEAD_SKIP`] windows), and a
    /// validator whose bucket did not answer by a cut-off ([`attestation::STALLED_SKIP`];
    /// neither lead nor read for attestations meanwhile, and counting against every quorum).
    pub skipped: HashMap<String, u64>,
    /// A lead's aggregate this node rejected before a stake majority had disputed it
    /// (window, lead, aggregate digest): looked at again once, a window later, by
    /// [`Node::review_disputes`].
    pending_dispute: Option<(u64, String, String)>,
    /// Aggregates read in the current window, so that a validator's follow applies the one
    /// it attested instead of downloading and decoding it again.
    fetched: std::sync::Mutex<Vec<Found>>,
    /// How the local state is saved: the window of the last full save, the journal written
    /// since, the update applied since the last save, and whether the next save must be full.
    saving: Saving,
}

/// The local state's saving between full saves (see [`state::full_save_period`]).
#[derive(Debug, Default)]
struct Saving {
    base: Option<u64>,
    base_state: Option<String>,
    base_full: Option<String>,
    journal: Vec<u64>,
    pending: Option<state::JournalEntry>,
    full_due: bool,
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

/// One validator that may publish the accepted set: its hotkey, stake and bucket.
#[derive(Clone, Debug)]
pub struct Publisher {
    /// The validator's hotkey.
    pub hotkey: String,
    /// Its stake (its voice in attestation quorums).
    pub stake: u64,
    /// Its bucket (this node's own for itself).
    pub bucket: Bucket,
}

/// An aggregate a node found in a publisher's bucket.
#[derive(Clone, Debug)]
pub struct Found {
    /// The publisher.
    pub from: String,
    /// The decoded object.
    pub obj: AggregateObject,
    /// Its bytes.
    pub bytes: Bytes,
    /// Hex sha256 of the bytes (what attestations name).
    pub digest: String,
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
        // The URL is committed on chain below: refuse one the chain would refuse, before
        // anything else happens.
        bistro_chain::check_commitment_len(bucket.url().len()).map_err(|e| NodeError::Config(e.to_string()))?;
        let ctx = SyncContext {
            chain: chain.clone(),
            netuid: cfg.netuid,
            hparams: cfg.hparams.clone(),
            hparams_hash: cfg.hparams.hash()?,
            model_hash: model_config.hash()?,
            bucket_options: cfg.bucket_options.clone(),
            allow_local_buckets: cfg.allow_local_buckets,
            allow_private_endpoints: cfg.allow_private_endpoints,
            rosters: Default::default(),
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
        // What `doctor` compares against (the slices' hash is what counts): best effort.
        match toml::to_string(&cfg.hparams) {
            Ok(text) => {
                if let Err(e) = bucket.put(crate::protocol::HPARAMS_KEY, text.into()).await {
                    tracing::warn!(error = %e, "cannot publish the hparams in the bucket");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialise the hparams"),
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| NodeError::Config(format!("cannot create state dir {}: {e}", cfg.state_dir.display())))?;
        let params = Params::genesis(&model_config, cfg.hparams.genesis_seed, &cfg.device)?;
        let adam = PublicAdam::zeros(params.specs());
        let state_hash = state_hash(&params, &adam)?;
        let mut node = Node {
            chain,
            ctx,
            model_config,
            dataset: Arc::new(dataset),
            tokenizer: Arc::new(tokenizer),
            bucket,
            uid,
            params,
            adam,
            window: 0,
            full_hash: Some(state_hash.clone()),
            state_hash,
            anchor: None,
            origin: format!("genesis (seed {})", cfg.hparams.genesis_seed),
            publishes_history: false,
            forks: 0,
            repairs: 0,
            skipped: HashMap::new(),
            pending_dispute: None,
            fetched: Default::default(),
            saving: Saving::default(),
            cfg,
        };
        node.bootstrap().await?;
        Ok(node)
    }

    async fn bootstrap(&mut self) -> Result<(), NodeError> {
        let dir = self.cfg.state_dir.clone();
        if let Some((info, params, adam)) =
            crate::state::load(&dir, &self.model_config, &self.ctx.hparams_hash, &self.cfg.device)?
        {
            let id = info.state.clone().unwrap_or_default();
            let full = if info.journal.is_empty() { info.base_full.clone() } else { None };
            self.install(params, adam, info.window, id, None, full)?;
            self.origin = format!("local state ({})", dir.display());
            return Ok(());
        }
        let chain_window = self.chain_window().await?;
        let publishers = self.publishers(chain_window, true).await?;
        // A few validators' histories at most, under one deadline (red team 3, F8).
        let budget = crate::protocol::REPAIR_BUDGET;
        let search = async {
            for p in publishers.iter().take(crate::protocol::REPAIR_SOURCES) {
                let attested = |w, hash| self.state_attested(&publishers, w, hash);
                match self
                    .ctx
                    .rebuild_from(&p.bucket, &self.model_config, &self.cfg.device, None, chain_window, attested)
                    .await
                {
                    Ok(r) => return Some((r, p.hotkey.clone())),
                    Err(e) => tracing::info!(validator = %p.hotkey, reason = %e, "no usable checkpoint"),
                }
            }
            None
        };
        match tokio::time::timeout(budget, search).await {
            Ok(Some((r, from))) => {
                let (window, checkpoint) = (r.window, r.checkpoint);
                self.install_rebuilt(r, window)?;
                self.origin = format!("verified checkpoint of window {checkpoint} from {from}");
            }
            Ok(None) => {}
            Err(_) => {
                tracing::warn!(seconds = budget.as_secs(), "bootstrap ran out of its budget: starting from genesis")
            }
        }
        Ok(())
    }

    /// Replace the held state (same config) with `params` and `adam` of `window`, named
    /// `id` (with its anchored link and full hash when known). The next save is a full one.
    fn install(
        &mut self,
        params: Params,
        adam: PublicAdam,
        window: u64,
        id: String,
        anchor: Option<crate::lineage::Link>,
        full: Option<String>,
    ) -> Result<(), NodeError> {
        self.params.assign(&params)?;
        self.adam = adam;
        self.window = window;
        self.state_hash = id;
        self.anchor = anchor;
        self.full_hash = full;
        self.saving.full_due = true;
        Ok(())
    }

    /// [`Self::install`] a state rebuilt from a validator's history as the state of `window`.
    fn install_rebuilt(&mut self, r: crate::history::Rebuilt, window: u64) -> Result<(), NodeError> {
        self.install(r.params, r.adam, window, r.hash, r.anchor, r.full)
    }

    /// The lead of `window`: the first validator by stake among those with a usable
    /// commitment, skipping a lead whose aggregate a stake majority disputed or whose bucket
    /// stalled, for a while (see [`Node::skipped`]: a stalling lead costs one window's wait,
    /// then none). Every role uses this one rule (red team
    /// 3, F7: the validator led by stake alone, followers skipped validators without a
    /// bucket, so a top-stake permit holder that does not run BISTRO left the network with
    /// no lead at all).
    pub async fn lead(&self, window: u64) -> Result<Option<String>, ChainError> {
        Ok(self.lead_among(&self.publishers(window, false).await?, window).map(|p| p.hotkey.clone()))
    }

    /// [`Self::lead`] among `publishers` (in stake order).
    pub fn lead_among<'a>(&self, publishers: &'a [Publisher], window: u64) -> Option<&'a Publisher> {
        publishers.iter().find(|p| !self.is_skipped(&p.hotkey, window)).or(publishers.first())
    }

    /// Whether `hotkey` is skipped in `window` among `publishers`: skips apply only while
    /// at least one publisher is not skipped (a node never skips every validator).
    pub fn skipped_among(&self, publishers: &[Publisher], hotkey: &str, window: u64) -> bool {
        self.is_skipped(hotkey, window) && publishers.iter().any(|p| !self.is_skipped(&p.hotkey, window))
    }

    /// Whether `hotkey` is skipped in `window` (see [`Node::skipped`]).
    pub fn is_skipped(&self, hotkey: &str, window: u64) -> bool {
        self.skipped.get(hotkey).is_some_and(|&until| window <= until)
    }

    /// Skip `hotkey` for `windows` windows from `window` on (see [`Node::skipped`]); never
    /// this node itself.
    pub fn skip(&mut self, hotkey: &str, window: u64, windows: u64, why: &str) {
        if hotkey != self.cfg.hotkey {
            tracing::warn!(window, validator = hotkey, why, windows, "skipping this validator for the next windows");
            self.skipped.insert(hotkey.to_string(), window + windows);
        }
    }

    /// The validators that may publish the accepted set, in fallback order (most stake
    /// first), with their buckets: permit holders that committed a bucket URL this node can
    /// open (this node's own bucket stands for itself, once it is committed). Validators
    /// whose bucket cannot be opened are skipped with a log line.
    pub async fn publishers(&self, window: u64, exclude_self: bool) -> Result<Vec<Publisher>, ChainError> {
        let roster = self.ctx.roster(window).await?;
        let mut out = Vec::new();
        for n in validators_by_stake(&roster.metagraph) {
            let Some(url) = roster.commitments.get(&n.uid).cloned() else { continue };
            if n.hotkey == self.cfg.hotkey {
                if !exclude_self {
                    out.push(Publisher { hotkey: n.hotkey, stake: n.stake, bucket: self.bucket.clone() });
                }
                continue;
            }
            match self.ctx.peer_bucket(&url) {
                Ok(bucket) => out.push(Publisher { hotkey: n.hotkey, stake: n.stake, bucket }),
                Err(e) => tracing::warn!(validator = %n.hotkey, reason = %e, "cannot read this validator's bucket"),
            }
        }
        Ok(out)
    }

    /// Sign `statements` about `window` with this node's hotkey and publish them as its
    /// attestation of the window (replacing an earlier one of the same window).
    pub async fn publish_attestation(
        &self,
        window: u64,
        statements: Vec<attestation::Statement>,
    ) -> Result<(), NodeError> {
        let a = Attestation::new(window, &self.cfg.hotkey, statements);
        let sig = self.chain.sign(&self.cfg.hotkey, &a.signing_bytes())?;
        let a = a.with_signature(&sig);
        self.bucket
            .put(&attestation::attestation_key(window), Bytes::from(a.encode()))
            .await
            .map_err(NodeError::Storage)
    }

    /// Sign `verdicts` on this validator's assigned miners of `window` (the assignment drawn
    /// from `assignment`, hex) and publish them as its verdict sheet of the window.
    pub async fn publish_verdicts(
        &self,
        window: u64,
        assignment: &str,
        verdicts: Vec<crate::verdicts::MinerVerdict>,
    ) -> Result<(), NodeError> {
        let s = crate::verdicts::VerdictSheet::new(window, &self.cfg.hotkey, assignment, verdicts);
        let sig = self.chain.sign(&self.cfg.hotkey, &s.signing_bytes())?;
        let s = s.with_signature(&sig);
        self.bucket
            .put(&crate::verdicts::verdicts_key(window), Bytes::from(s.encode()))
            .await
            .map_err(NodeError::Storage)
    }

    /// One publisher's attestation of `window`: `Ok(Some)` when valid, `Ok(None)` when
    /// absent, `Err` when an object is there but unusable (logged; the publisher still counts
    /// as publishing, so a bad object can only weigh against a quorum).
    async fn attestation_of(&self, p: &Publisher, window: u64) -> Result<Option<Attestation>, ()> {
        let key = attestation::attestation_key(window);
        match p.bucket.get(&key, attestation::MAX_ATTESTATION_BYTES).await {
            Ok(f) => match Attestation::decode(&f.bytes, window, &p.hotkey) {
                Ok(a) => Ok(Some(a)),
                Err(e) => {
                    tracing::warn!(window, validator = %p.hotkey, error = %e, "unusable attestation");
                    Err(())
                }
            },
            Err(crate::storage::StorageError::NotFound { .. }) => Ok(None),
            Err(e) => {
                tracing::debug!(window, validator = %p.hotkey, error = %e, "cannot read the attestation");
                Err(())
            }
        }
    }

    /// Every publisher's voice on `window`: its attestation of the window, and whether it
    /// published recently (this window or one of the [`attestation::RECENT_WINDOWS`]
    /// before; `recent` caches that per publisher across polls of one window). All reads
    /// run at once, each under `cutoff_ms` (Unix ms); a publisher that has not answered by
    /// then, or whose object is unusable, or that this node skips, has no attestation and
    /// counts as recent (against a quorum, never for one).
    pub async fn voices(
        &self,
        publishers: &[Publisher],
        window: u64,
        cutoff_ms: u64,
        recent: &mut HashMap<String, bool>,
    ) -> Vec<Voice> {
        let reads = publishers.iter().map(|p| {
            let known_recent = recent.get(&p.hotkey).copied();
            let skipped = self.skipped_among(publishers, &p.hotkey, window);
            async move {
                if skipped {
                    return Voice {
                        hotkey: p.hotkey.clone(),
                        stake: p.stake,
                        attestation: None,
                        recent: true,
                        answered: false,
                    };
                }
                let read = async {
                    let a = self.attestation_of(p, window).await;
                    let was_recent = match (&a, known_recent) {
                        (Ok(None), Some(r)) => r,
                        (Ok(None), None) => {
                            let mut any = false;
                            for back in 1..=attestation::RECENT_WINDOWS.min(window) {
                                if !matches!(self.attestation_of(p, window - back).await, Ok(None)) {
                                    any = true;
                                    break;
                                }
                            }
                            any
                        }
                        _ => true,
                    };
                    (a.ok().flatten(), was_recent)
                };
                let until = tokio::time::Instant::now() + Duration::from_millis(cutoff_ms.saturating_sub(now_ms()));
                let (answered, (a, was_recent)) = match tokio::time::timeout_at(until, read).await {
                    Ok(r) => (true, r),
                    Err(_) => (false, (None, known_recent.unwrap_or(true))),
                };
                Voice { hotkey: p.hotkey.clone(), stake: p.stake, attestation: a, recent: was_recent, answered }
            }
        });
        let voices: Vec<Voice> = futures::future::join_all(reads).await;
        for v in &voices {
            recent.insert(v.hotkey.clone(), v.recent);
        }
        voices
    }

    /// Look once more at a lead's aggregate this node rejected in an earlier window before
    /// the other validators' disputes were in (live, every validator counts right after
    /// publishing its own attestation): a lead a stake majority disputed is skipped from
    /// `window` on for [`attestation::DISPUTED_LEAD_SKIP`] windows. At most one bounded
    /// read of attestations, and only after such a rejection.
    pub async fn review_disputes(&mut self, window: u64) -> Result<(), ChainError> {
        if self.pending_dispute.as_ref().is_none_or(|(w, _, _)| *w >= window) {
            return Ok(());
        }
        let Some((w, lead, digest)) = self.pending_dispute.take() else { return Ok(()) };
        if self.is_skipped(&lead, window) {
            return Ok(());
        }
        let publishers = self.publishers(w, false).await?;
        let wait = self.cfg.hparams.fallback_wait_ms.min(crate::protocol::PEER_TIMEOUT.as_millis() as u64);
        let voices = self.voices(&publishers, w, now_ms() + wait, &mut HashMap::new()).await;
        let t = Tally::count(&voices, &digest);
        if t.majority_disputed() {
            let why = format!("its aggregate of window {w} was disputed by a stake majority");
            self.skip(&lead, window, attestation::DISPUTED_LEAD_SKIP, &why);
        }
        Ok(())
    }

    /// Whether a stake majority of `publishers` attested `hash` as the state produced by
    /// `window` (how a checkpoint of window `window + 1` is accepted).
    pub async fn state_attested(&self, publishers: &[Publisher], window: u64, hash: String) -> bool {
        let cutoff = now_ms() + crate::protocol::PEER_TIMEOUT.as_millis() as u64;
        self.state_attested_by(publishers, window, hash, cutoff).await
    }

    /// [`Self::state_attested`] with the attestations read until `cutoff_ms` (Unix ms).
    async fn state_attested_by(&self, publishers: &[Publisher], window: u64, hash: String, cutoff_ms: u64) -> bool {
        let voices = self.voices(publishers, window, cutoff_ms, &mut HashMap::new()).await;
        let t = Tally::count_where(&voices, |s| s.state == hash);
        if !t.accepted() {
            tracing::info!(window, state = short(&hash), tally = %t.describe(), "state not attested");
        }
        t.accepted()
    }

    /// Save `theta_w` and its window to the state directory: in full (parameters and
    /// optimizer state) after a restart, a repair or a fork, and every
    /// [`state::full_save_period`] windows (8 for a state under a gigabyte); in between
    /// only the window's update, as a journal
    /// entry a restart replays.
    pub fn save_state(&mut self) -> Result<(), state::StateError> {
        let dir = self.cfg.state_dir.clone();
        let pending = self.saving.pending.take();
        let full = self.saving.full_due
            || self.saving.base.is_none_or(|b| self.window >= b + self.full_save_period())
            || pending.as_ref().is_some_and(|e| e.window + 1 != self.window);
        let mut info = StateInfo {
            window: self.window,
            hparams_hash: self.ctx.hparams_hash.clone(),
            model_hash: self.ctx.model_hash.clone(),
            ..StateInfo::default()
        };
        info.state = Some(self.state_hash.clone());
        if full {
            info.base_full = self.full_hash.clone();
            state::save(&dir, &self.params, &self.adam, &info)?;
            self.saving = Saving {
                base: Some(self.window),
                base_state: info.state.clone(),
                base_full: info.base_full.clone(),
                ..Saving::default()
            };
            return Ok(());
        }
        let mut journal = self.saving.journal.clone();
        journal.extend(pending.as_ref().map(|e| e.window));
        info.base = self.saving.base;
        info.journal = journal.clone();
        info.base_state = self.saving.base_state.clone();
        info.base_full = self.saving.base_full.clone();
        let written = match &pending {
            Some(e) => state::append_journal(&dir, e, &info),
            None => state::write_info(&dir, &info),
        };
        match written {
            Ok(()) => self.saving.journal = journal,
            // The journal on disk may now miss an update: the next save is a full one.
            Err(_) => self.saving.full_due = true,
        }
        written
    }

    /// Windows between two full saves of this node's state ([`state::full_save_period`]).
    pub fn full_save_period(&self) -> u64 {
        let coordinates: usize = self
            .params
            .specs()
            .iter()
            .map(|s| crate::slices::slice_len(s.shape.iter().product(), self.cfg.hparams.compression))
            .sum();
        state::full_save_period(self.model_config.num_params(), coordinates)
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

    /// Wait for the held window's accepted set and apply it: the lead's aggregate once a
    /// stake majority of the recently publishing validators attests it; else (the lead's
    /// missing at its cut-off, or rejected) the first fallback validator's that is attested
    /// in time; else no update. Before counting attestations a node makes its own cheap
    /// checks ([`check_bounded`]). A lead whose aggregate a stake majority disputes is
    /// skipped for the next [`attestation::DISPUTED_LEAD_SKIP`] windows. A parent mismatch
    /// is a fork: the node rebuilds its state from the publisher's history (checkpoint
    /// attested the same way), then applies. State is saved; validators publish their
    /// history.
    pub async fn follow(&mut self, pace: Pace, stop: &AtomicBool) -> Result<Followed, NodeError> {
        let w = self.window;
        crate::telemetry::phase("follow");
        let started = std::time::Instant::now();
        let indices = self.ctx.indices(&self.params, w).await?;
        let deadline = self.ctx.deadline_ms(w).await?;
        let (lead_cutoff, final_cutoff) = self.cutoffs_after(deadline);
        if pace == Pace::Live {
            sleep_until_ms(deadline, stop).await;
        }
        // After the deadline the seed block exists: every node reads the same publishers.
        self.review_disputes(w).await?;
        let publishers = self.publishers(w, false).await?;
        let lead = self.lead_among(&publishers, w).map(|p| p.hotkey.clone());
        // The lead first, then the others in stake order.
        let mut order: Vec<&Publisher> = publishers.iter().filter(|p| Some(&p.hotkey) == lead.as_ref()).collect();
        order.extend(publishers.iter().filter(|p| Some(&p.hotkey) != lead.as_ref()));
        // Live, every fetch runs under the cut-off it serves: a publisher that stalls instead
        // of answering costs at most that wait, and is not asked again in this window (red
        // team 3, F3: one stalling lead held every node for two 15 s attempts per poll).
        let mut stalled: HashSet<String> = HashSet::new();
        let mut rejected: HashSet<String> = HashSet::new();
        let mut out_of_reach: HashSet<String> = HashSet::new();
        let mut logged: HashSet<String> = HashSet::new();
        let mut found: Vec<Found> = Vec::new();
        let mut recent: HashMap<String, bool> = HashMap::new();
        let mut last_tally = String::new();
        let mut accepted: Option<Found> = None;
        loop {
            let lead_open = pace == Pace::Lockstep || now_ms() < lead_cutoff;
            let lead_settled = order.first().is_none_or(|l| {
                stalled.contains(&l.hotkey)
                    || rejected.contains(&l.hotkey)
                    || out_of_reach.contains(&l.hotkey)
                    || (!lead_open && !Self::has(&found, l))
            });
            for (i, p) in order.iter().enumerate() {
                if Self::has(&found, p) || stalled.contains(&p.hotkey) || self.skipped_among(&publishers, &p.hotkey, w)
                {
                    continue;
                }
                // Fallbacks only once the lead is settled (in lockstep everything is published already).
                if i > 0 && !lead_settled && pace == Pace::Live {
                    continue;
                }
                let cutoff = if i == 0 { lead_cutoff } else { final_cutoff };
                if pace == Pace::Live && now_ms() >= cutoff && p.hotkey != self.cfg.hotkey {
                    continue;
                }
                if let Some(f) = self.try_publisher_until(p, &indices, w, pace, cutoff, &mut stalled).await {
                    // On another state than the aggregate's, the check waits for the repair.
                    let checked = if f.obj.set.parent == self.state_hash {
                        check_bounded(&f.obj, &self.cfg.hparams.aggregation)
                    } else {
                        Ok(())
                    };
                    match checked {
                        Ok(()) => found.push(f),
                        Err(e) => {
                            tracing::warn!(window = w, validator = %p.hotkey, error = %e, "aggregate fails the cheap checks");
                            rejected.insert(p.hotkey.clone());
                        }
                    }
                }
            }
            if !found.is_empty() {
                let wait = self.wait_ms(pace, final_cutoff);
                let voices = self.voices(&publishers, w, now_ms() + wait, &mut recent).await;
                // A bucket that did not answer while others did is skipped for the next
                // windows (when none answered, the trouble is likely this node's own). Only
                // when it had a collection budget's time to answer: a read cut short by the
                // final cut-off proves nothing.
                if wait >= self.cfg.hparams.collect_budget_ms && voices.iter().any(|v| v.answered) {
                    let silent: Vec<String> = voices
                        .iter()
                        .filter(|v| !v.answered && !self.is_skipped(&v.hotkey, w))
                        .map(|v| v.hotkey.clone())
                        .collect();
                    for hk in silent {
                        self.skip(&hk, w, attestation::STALLED_SKIP, "its bucket did not answer by the cut-off");
                    }
                }
                // Out of reach is judged again at every poll: a validator publishing its first
                // attestation joins the base, and may carry an aggregate to a majority.
                out_of_reach.clear();
                for f in order.iter().filter_map(|p| found.iter().find(|f| f.from == p.hotkey)) {
                    if rejected.contains(&f.from) {
                        continue;
                    }
                    let t = Tally::count(&voices, &f.digest);
                    last_tally = format!("{}: {}", f.from, t.describe());
                    if t.accepted() {
                        accepted = Some(f.clone());
                        break;
                    }
                    if t.rejected() {
                        if logged.insert(f.from.clone()) {
                            tracing::warn!(window = w, validator = %f.from, tally = %t.describe(), "aggregate rejected by the validators");
                        }
                        let is_lead = Some(&f.from) == lead.as_ref();
                        if t.majority_disputed() {
                            rejected.insert(f.from.clone());
                            if is_lead {
                                let why = "its aggregate was disputed by a stake majority";
                                self.skip(&f.from.clone(), w, attestation::DISPUTED_LEAD_SKIP, why);
                            }
                        } else {
                            out_of_reach.insert(f.from.clone());
                            if is_lead {
                                self.pending_dispute = Some((w, f.from.clone(), f.digest.clone()));
                            }
                        }
                    }
                }
            }
            if accepted.is_some()
                || publishers.is_empty()
                || pace == Pace::Lockstep
                || now_ms() >= final_cutoff
                || stop.load(Ordering::Relaxed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // A lead that stalled while another validator answered is skipped for a while (when
        // none answered, the trouble may be this node's own network).
        if let Some(l) = &lead
            && stalled.contains(l)
            && !self.is_skipped(l, w)
            && found.iter().any(|f| &f.from != l)
        {
            self.skip(&l.clone(), w, attestation::STALLED_SKIP, "the lead's bucket did not answer by its cut-off");
        }
        let mut applied = None;
        let outcome = match accepted {
            None => {
                self.catch_up_to_attested(&found, &publishers, w).await?;
                let reason = if publishers.is_empty() {
                    "no validator on the network".to_string()
                } else if found.is_empty() {
                    format!("no aggregate from {} validator(s) by the cut-off", publishers.len())
                } else {
                    format!("no aggregate attested by a stake majority ({last_tally})")
                };
                self.window = w + 1;
                Followed::NoUpdate { window: w, reason }
            }
            Some(f) => {
                let bytes = f.bytes.clone();
                let outcome = self.apply(f.from, f.obj, &indices, &publishers).await?;
                // A validator republishes what it applied from another validator.
                if matches!(&outcome, Followed::Applied { from, .. } if from != &self.cfg.hotkey) {
                    applied = Some(bytes);
                }
                outcome
            }
        };
        // An aggregate this validator published (as lead or fallback) that was not applied
        // here must not stay in its history: the history lists applied updates only.
        if self.publishes_history
            && !matches!(outcome, Followed::Applied { .. })
            && self.bucket.head(&crate::protocol::aggregate_key(w)).await.is_ok()
            && let Err(e) = self.bucket.delete(&crate::protocol::aggregate_key(w)).await
        {
            tracing::warn!(window = w, error = %e, "cannot withdraw an unapplied aggregate from the history");
        }
        crate::telemetry::phase_seconds("follow", started.elapsed().as_secs_f64());
        crate::telemetry::aggregate(match &outcome {
            Followed::Applied { from, .. } if lead.as_ref() != Some(from) => "fallback",
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
                Some((self.window, &self.params, &self.adam, self.anchor.as_ref())),
                &self.cfg.hparams,
            )
            .await;
        } else {
            crate::history::cleanup(&self.bucket, &self.cfg.hotkey, self.window, &self.cfg.hparams).await;
        }
        Ok(outcome)
    }

    /// After a window without an accepted aggregate: when the aggregates found build on a
    /// state other than this node's, and a stake majority attested that state as the product
    /// of window `w - 1`, this node missed an accepted update (its reads of the other
    /// validators were cut short, say). It rebuilds that state from the publisher's history
    /// (each link checked) instead of staying off the network's state, where, as a
    /// validator, it could not attest anything again. Returns whether it caught up.
    async fn catch_up_to_attested(
        &mut self,
        found: &[Found],
        publishers: &[Publisher],
        w: u64,
    ) -> Result<bool, NodeError> {
        let Some(prev) = w.checked_sub(1) else { return Ok(false) };
        let mut tried = HashSet::new();
        let own = self.state_hash.clone();
        for f in found.iter().filter(|f| f.obj.set.parent != own) {
            let parent = f.obj.set.parent.clone();
            if !tried.insert(parent.clone()) {
                continue;
            }
            // One collection budget for the attestations: a stalling validator costs that
            // once and counts against, never a peer timeout per window.
            let cutoff = now_ms() + self.cfg.hparams.collect_budget_ms;
            if !self.state_attested_by(publishers, prev, parent.clone(), cutoff).await {
                continue;
            }
            if self.catch_up_with(&f.from, &parent, publishers, w).await? {
                return Ok(true);
            }
        }
        // No aggregate of this window builds on another state (a lead that missed an
        // acceptance keeps publishing on its own state, and the others only fall silent):
        // ask the previous window's attestations themselves which state a stake majority
        // attested, and catch up with it if it is not this node's.
        let cutoff = now_ms() + self.cfg.hparams.collect_budget_ms;
        let voices = self.voices(publishers, prev, cutoff, &mut HashMap::new()).await;
        let mut candidates: Vec<(String, String)> = Vec::new();
        for v in &voices {
            if let Some(s) = v.attestation.as_ref().and_then(|a| a.attested())
                && s.state != self.state_hash
                && !tried.contains(&s.state)
                && !candidates.iter().any(|(_, st)| *st == s.state)
            {
                candidates.push((s.publisher.clone(), s.state.clone()));
            }
        }
        for (from, state) in candidates {
            if !Tally::count_where(&voices, |s| s.state == state).accepted() {
                continue;
            }
            if self.catch_up_with(&from, &state, publishers, w).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Rebuild `state` (attested for the window before `w`) from `from`'s history, then
    /// other validators', and install it: `Ok(false)`, logged, when it cannot be rebuilt.
    async fn catch_up_with(
        &mut self,
        from: &str,
        state: &str,
        publishers: &[Publisher],
        w: u64,
    ) -> Result<bool, NodeError> {
        match self.rebuild_to(from, state, publishers, w).await {
            Ok(r) => {
                self.install_rebuilt(r, w)?;
                self.repairs += 1;
                tracing::info!(
                    window = w,
                    state = short(state),
                    %from,
                    "caught up with the state a stake majority attested for the window before, which this node had missed"
                );
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(window = w, %from, error = %e, "cannot catch up with the attested state");
                Ok(false)
            }
        }
    }

    /// Rebuild the state `parent` of window `w` from `who`'s history, then other validators'
    /// (a publisher may hold only the attested bytes it republished, not a history that
    /// links): at most [`crate::protocol::REPAIR_SOURCES`] of them under one deadline.
    async fn rebuild_to(
        &self,
        who: &str,
        parent: &str,
        publishers: &[Publisher],
        w: u64,
    ) -> Result<crate::history::Rebuilt, HistoryError> {
        let chain_window = self.chain_window().await.unwrap_or(w + 1);
        let mut sources: Vec<&Publisher> = publishers.iter().filter(|p| p.hotkey == who).collect();
        sources.extend(
            publishers
                .iter()
                .filter(|p| p.hotkey != who && p.hotkey != self.cfg.hotkey && !self.is_skipped(&p.hotkey, w)),
        );
        let budget = crate::protocol::REPAIR_BUDGET;
        let search = async {
            let mut last = HistoryError::Other(format!("{who} has no bucket"));
            for p in sources.into_iter().take(crate::protocol::REPAIR_SOURCES) {
                let attested = |aw, hash| self.state_attested(publishers, aw, hash);
                match self
                    .ctx
                    .rebuild_from(&p.bucket, &self.model_config, &self.cfg.device, Some(w), chain_window, attested)
                    .await
                {
                    Ok(r) if r.hash == parent => return Ok(r),
                    Ok(r) => {
                        tracing::warn!(window = w, source = %p.hotkey, state = short(&r.hash), "rebuilt another state");
                        last = HistoryError::Mismatch(format!(
                            "rebuilt state {} is not {}",
                            short(&r.hash),
                            short(parent)
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(window = w, source = %p.hotkey, error = %e, "cannot rebuild from this history");
                        last = e;
                    }
                }
            }
            Err(last)
        };
        tokio::time::timeout(budget, search).await.unwrap_or(Err(HistoryError::TimedOut { seconds: budget.as_secs() }))
    }

    /// How long a read of a peer's object may take now: until `cutoff_ms` when live; the
    /// collection budget in lockstep (a stalling peer must not hold a lockstep driver either).
    pub fn wait_ms(&self, pace: Pace, cutoff_ms: u64) -> u64 {
        match pace {
            Pace::Live => cutoff_ms.saturating_sub(now_ms()),
            Pace::Lockstep => self.cfg.hparams.collect_budget_ms,
        }
    }

    fn has(found: &[Found], p: &Publisher) -> bool {
        found.iter().any(|f| f.from == p.hotkey)
    }

    /// [`Self::fetch_from`] under `cutoff_ms` (Unix ms) when live, under the collection
    /// budget in lockstep; a publisher that has not answered by then goes into `stalled`. This node's own bucket is read without the
    /// cut-off: what it published itself it must apply, or its published history would no
    /// longer link (a slow own bucket is this node's problem, not a peer's attack).
    pub async fn try_publisher_until(
        &self,
        p: &Publisher,
        indices: &crate::slices::SliceIndices,
        w: u64,
        pace: Pace,
        cutoff_ms: u64,
        stalled: &mut HashSet<String>,
    ) -> Option<Found> {
        if p.hotkey == self.cfg.hotkey {
            return self.fetch_from(p, indices, w).await;
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(self.wait_ms(pace, cutoff_ms));
        match tokio::time::timeout_at(until, self.fetch_from(p, indices, w)).await {
            Ok(found) => found,
            Err(_) => {
                tracing::warn!(window = w, validator = %p.hotkey, "no answer by the cut-off: not asked again this window");
                stalled.insert(p.hotkey.clone());
                None
            }
        }
    }

    /// `p`'s aggregate of window `w`, decoded against this node's state, if it has a valid
    /// one. A valid one is read once per window (kept until the node moves on).
    pub async fn fetch_from(&self, p: &Publisher, indices: &crate::slices::SliceIndices, w: u64) -> Option<Found> {
        let kept = |f: &Found| f.obj.set.window == w && f.from == p.hotkey;
        if let Some(f) = self.fetched.lock().ok().and_then(|k| k.iter().find(|f| kept(f)).cloned()) {
            return Some(f);
        }
        match self.ctx.fetch_aggregate(&p.bucket, &self.params, indices, w).await {
            Ok(Some((obj, bytes))) => {
                let digest = bytes_sha256(&bytes);
                let found = Found { from: p.hotkey.clone(), obj, bytes, digest };
                if let Ok(mut k) = self.fetched.lock() {
                    k.retain(|f| f.obj.set.window == w);
                    k.push(found.clone());
                }
                Some(found)
            }
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
            let rebuilt = self.rebuild_to(&who, &obj.set.parent, publishers, w).await;
            match rebuilt {
                // `rebuild_to` returns only the state asked for.
                Ok(r) => {
                    let checkpoint = r.checkpoint;
                    self.install_rebuilt(r, w)?;
                    self.repairs += 1;
                    crate::telemetry::fork(true);
                    repaired = true;
                    tracing::info!(window = w, checkpoint, from = %who, "fork repaired");
                }
                Err(e) => {
                    crate::telemetry::fork(false);
                    self.window = w + 1;
                    return Ok(Followed::Forked { window: w, reason: e.to_string() });
                }
            }
        }
        if repaired && let Err(e) = check_bounded(&obj, &self.cfg.hparams.aggregation) {
            self.window = w + 1;
            return Ok(Followed::NoUpdate {
                window: w,
                reason: format!("the attested aggregate fails the cheap checks: {e}"),
            });
        }
        // The parent matches (checked above, or repaired to): apply, then compare.
        let produced = crate::history::apply_update(
            &self.params,
            &mut self.adam,
            indices,
            &obj,
            &self.state_hash,
            &self.cfg.hparams,
        );
        let produced = match produced {
            Ok(p) => p,
            Err(e) => {
                // Nothing is known of the state now: a full save, and the next aggregate's
                // parent check finds the fork and repairs it.
                self.saving.full_due = true;
                self.state_hash = format!("{:0>64}", "");
                self.anchor = None;
                self.full_hash = None;
                self.forks += 1;
                self.window = w + 1;
                return Ok(Followed::Forked { window: w, reason: e.to_string() });
            }
        };
        let checked = crate::history::check_produced(&obj, &produced);
        self.state_hash = produced.id;
        if let Some(link) = produced.link {
            self.full_hash = link.full.clone();
            if !obj.set.included.is_empty() || link.is_anchored() {
                self.saving.pending = Some(state::JournalEntry {
                    window: w,
                    indices: indices.clone(),
                    values: obj.values.clone(),
                    step: crate::public_adam::AdamStep::of(&self.cfg.hparams, w),
                    included: !obj.set.included.is_empty(),
                    full: link.full.clone(),
                });
            }
            self.anchor = link.is_anchored().then_some(link);
        }
        if let Err(e) = checked {
            // The values were written but do not produce the state the aggregate names:
            // this node now holds the state it computed itself, and the next aggregate's
            // parent check finds the fork and repairs it.
            self.saving.full_due = true;
            self.forks += 1;
            self.window = w + 1;
            return Ok(Followed::Forked { window: w, reason: e.to_string() });
        }
        self.window = w + 1;
        Ok(Followed::Applied { window: w, from: who, set: obj.set, repaired })
    }
}

/// A node's own checks of an aggregate before it counts attestations: its values are
/// finite (checked when decoded) and the combined gradient is no larger than the norms it
/// lists allow (`||values||` at most the mean of the included norms, each times its factor,
/// under the mean rule; their root sum of squares under the coordinate-wise rules; 0 with
/// nothing included).
pub fn check_bounded(obj: &AggregateObject, rule: &crate::hparams::Aggregation) -> Result<(), String> {
    let norm = crate::slices::update_norm(&obj.values);
    if obj.set.included.iter().any(|i| !i.norm.is_finite() || i.norm < 0.0)
        || !(obj.set.record_clip.is_finite() && obj.set.record_clip >= 0.0)
    {
        return Err("an included norm or the record clip is not a finite non-negative number".into());
    }
    // Each slice enters with its factor (1, or clipped and weighted when on record).
    let listed: Vec<f64> = obj.set.included.iter().map(|i| i.norm * obj.set.factor(i)).collect();
    let bound = match rule {
        _ if listed.is_empty() => 0.0,
        crate::hparams::Aggregation::Mean => listed.iter().sum::<f64>() / listed.len() as f64,
        _ => listed.iter().map(|n| n * n).sum::<f64>().sqrt(),
    };
    // The written values are f32: each coordinate is rounded by at most 2^-24 of its size.
    let slack = bound * 2f64.powi(-22);
    if norm.is_finite() && norm <= bound * (1.0 + 1e-9) + slack {
        Ok(())
    } else {
        Err(format!("update norm {norm:.4e} exceeds what the listed norms allow ({bound:.4e})"))
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
