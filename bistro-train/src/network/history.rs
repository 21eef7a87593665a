//! The validators' published history: every validator keeps, in its bucket, the aggregate
//! it applied for each recent window and a full checkpoint every `max_history / 2` windows.
//! From one validator's bucket a node can therefore rebuild any recent state and verify it
//! link by link (`parent` and `state` hashes): this is how joiners bootstrap and how a
//! forked node repairs itself.

use bistro_model::{ModelConfig, Params};
use bytes::Bytes;
use candle_core::Device;

use crate::accepted::{self, AggregateExpectation, AggregateObject, state_hash};
use crate::lineage::{self, Link, Produced};
use crate::public_adam::{AdamStep, PublicAdam};
use crate::slices::{Rejection, SliceIndices};
use crate::storage::{Bucket, StorageError};
use crate::sync::SyncContext;

/// Why a history could not be used (never fatal: the node logs it and tries elsewhere).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// An object is absent.
    #[error("{0} is not in the bucket")]
    Missing(String),
    /// An object could not be downloaded.
    #[error("cannot download {key}: {source}")]
    Download {
        /// The key.
        key: String,
        /// The storage error.
        #[source]
        source: StorageError,
    },
    /// An object is not valid.
    #[error("{key} rejected: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        reason: Rejection,
    },
    /// The hashes do not link up.
    #[error("hash mismatch: {0}")]
    Mismatch(String),
    /// A checkpoint claims a window the chain has not reached.
    #[error("checkpoint of window {window} is ahead of the chain (window {chain})")]
    FromFuture {
        /// The claimed window.
        window: u64,
        /// The chain's window.
        chain: u64,
    },
    /// The repair ran out of its budget ([`crate::protocol::REPAIR_BUDGET`]).
    #[error("the rebuild ran out of its {seconds} s budget")]
    TimedOut {
        /// The budget.
        seconds: u64,
    },
    /// The chain or the model failed.
    #[error("{0}")]
    Other(String),
}

impl From<bistro_model::ModelError> for HistoryError {
    fn from(e: bistro_model::ModelError) -> Self {
        HistoryError::Other(e.to_string())
    }
}

impl From<bistro_chain::ChainError> for HistoryError {
    fn from(e: bistro_chain::ChainError) -> Self {
        HistoryError::Other(e.to_string())
    }
}

/// The largest checkpoint of `model_config` accepted: parameters, two moments and a step
/// count (16 bytes per parameter), and the header.
fn checkpoint_limit(model_config: &ModelConfig) -> u64 {
    model_config.num_params() as u64 * 16 + (4 << 20)
}

/// A state rebuilt from a validator's history.
#[derive(Debug)]
pub struct Rebuilt {
    /// `theta_window`.
    pub params: Params,
    /// The public optimizer state of the window.
    pub adam: PublicAdam,
    /// The window the parameters belong to.
    pub window: u64,
    /// Their identity ([`crate::lineage`]).
    pub hash: String,
    /// The anchored link that named them, when the last link was an anchor (a checkpoint
    /// names its state this way).
    pub anchor: Option<Link>,
    /// Their full [`state_hash`], when it was computed (genesis, an anchor).
    pub full: Option<String>,
    /// The checkpoint the rebuild started from.
    pub checkpoint: u64,
}

impl SyncContext {
    /// The slice indices of `window` (needs the seed block).
    pub async fn indices(&self, params: &Params, window: u64) -> Result<SliceIndices, bistro_chain::ChainError> {
        let seed = self.seed(window).await?;
        Ok(SliceIndices::select(params.specs(), &seed, self.hparams.compression))
    }

    /// What a valid aggregate of `window` with `indices` looks like.
    pub fn aggregate_expectation(&self, params: &Params, indices: &SliceIndices, window: u64) -> AggregateExpectation {
        AggregateExpectation {
            window,
            names: params.specs().iter().map(|s| s.name.clone()).collect(),
            lengths: indices.all().iter().map(Vec::len).collect(),
            hparams_hash: self.hparams_hash.clone(),
            model_hash: self.model_hash.clone(),
        }
    }

    /// Download and decode `aggregate-{window}` from `bucket`: `Ok(None)` when absent.
    pub async fn fetch_aggregate(
        &self,
        bucket: &Bucket,
        params: &Params,
        indices: &SliceIndices,
        window: u64,
    ) -> Result<Option<(AggregateObject, Bytes)>, HistoryError> {
        let key = crate::protocol::aggregate_key(window);
        let expect = self.aggregate_expectation(params, indices, window);
        let fetched = match bucket.get(&key, expect.max_bytes()).await {
            Ok(f) => f,
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(HistoryError::Download { key, source }),
        };
        let bytes = fetched.bytes;
        let b = bytes.clone();
        let obj = tokio::task::spawn_blocking(move || accepted::decode(&b, &expect))
            .await
            .map_err(|e| HistoryError::Other(format!("decoder task failed: {e}")))?
            .map_err(|reason| HistoryError::Invalid { key, reason })?;
        Ok(Some((obj, bytes)))
    }

    /// Download and verify a validator's newest usable checkpoint at or before `target`
    /// (never one ahead of `chain_window`): its state hash must be `attested` as the state
    /// produced by window `c - 1` (a stake quorum of validators' attestations, checked by
    /// the caller: red team 3, F2: a checkpoint vouched for only by its own publisher's
    /// aggregates could replace the whole model). Then
    /// replay the bucket's aggregates up to `target` (exclusive), each link verified; with
    /// no `target`, the checkpoint's own window. Candidates that fail are skipped with a
    /// logged reason and the next older one is tried, at most
    /// [`crate::protocol::REPAIR_CHECKPOINTS`] of them; genesis is replayed only while the
    /// history can still reach back to it (`target <= max_history`: owners delete older
    /// aggregates). The whole rebuild runs under [`crate::protocol::REPAIR_BUDGET`] (red team
    /// 3, F8: a publisher listing thousands of checkpoints kept a node repairing for hours),
    /// plus the time the checkpoints' downloads may take at [`crate::storage::MIN_LARGE_RATE`].
    pub async fn rebuild_from<F, Fut>(
        &self,
        bucket: &Bucket,
        model_config: &ModelConfig,
        device: &Device,
        target: Option<u64>,
        chain_window: u64,
        attested: F,
    ) -> Result<Rebuilt, HistoryError>
    where
        F: Fn(u64, String) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        // The fixed budget covers listing and replaying; each checkpoint tried may add its
        // download at the slowest rate a large download may have.
        let checkpoint_bytes = checkpoint_limit(model_config);
        let budget = crate::protocol::REPAIR_BUDGET
            + std::time::Duration::from_secs(
                crate::protocol::REPAIR_CHECKPOINTS as u64 * checkpoint_bytes / crate::storage::MIN_LARGE_RATE,
            );
        let rebuild = async {
            let list = bucket
                .list("checkpoint-")
                .await
                .map_err(|source| HistoryError::Download { key: "checkpoint-*".into(), source })?;
            let mut windows: Vec<u64> =
                list.iter().filter_map(|o| crate::protocol::parse_checkpoint_key(&o.key)).collect();
            windows.sort_unstable_by(|a, b| b.cmp(a));
            windows.dedup();
            let mut last_err = HistoryError::Missing("a usable checkpoint".into());
            let mut tried = 0;
            for c in windows {
                if tried == crate::protocol::REPAIR_CHECKPOINTS {
                    break;
                }
                if c > chain_window {
                    let e = HistoryError::FromFuture { window: c, chain: chain_window };
                    tracing::warn!(bucket = bucket.url(), error = %e, "skipping checkpoint");
                    last_err = e;
                    continue;
                }
                if target.is_some_and(|t| c > t) {
                    continue;
                }
                tried += 1;
                match self
                    .rebuild_from_checkpoint(bucket, model_config, device, c, target.unwrap_or(c), &attested)
                    .await
                {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        tracing::warn!(bucket = bucket.url(), checkpoint = c, error = %e, "cannot rebuild from checkpoint");
                        last_err = e;
                    }
                }
            }
            // Genesis is a checkpoint everyone can make: replay from it while the history reaches back.
            if let Some(t) = target.filter(|&t| t <= self.hparams.max_history) {
                let params = Params::genesis(model_config, self.hparams.genesis_seed, device)?;
                let adam = PublicAdam::zeros(params.specs());
                let hash = state_hash(&params, &adam)?;
                let start =
                    Rebuilt { params, adam, window: 0, full: Some(hash.clone()), hash, anchor: None, checkpoint: 0 };
                match self.replay(bucket, start, t).await {
                    Ok(r) => return Ok(r),
                    Err(e) => last_err = e,
                }
            }
            Err(last_err)
        };
        tokio::time::timeout(budget, rebuild).await.unwrap_or(Err(HistoryError::TimedOut { seconds: budget.as_secs() }))
    }

    /// Apply `bucket`'s aggregates of windows `start.window..to` to the state `start`, each
    /// link checked.
    async fn replay(&self, bucket: &Bucket, start: Rebuilt, to: u64) -> Result<Rebuilt, HistoryError> {
        let Rebuilt { params, mut adam, window: from, mut hash, mut anchor, mut full, checkpoint } = start;
        for w in from..to {
            let Some(obj) = self.aggregate_at(bucket, &params, w).await? else { continue };
            let idx = self.indices(&params, w).await?;
            let produced = apply_checked(&params, &mut adam, &idx, &obj, &hash, &self.hparams)?;
            if let Some(link) = produced.link {
                full = link.full.clone();
                anchor = link.is_anchored().then_some(link);
            }
            hash = produced.id;
        }
        Ok(Rebuilt { params, adam, window: to, hash, anchor, full, checkpoint })
    }

    async fn rebuild_from_checkpoint<F, Fut>(
        &self,
        bucket: &Bucket,
        model_config: &ModelConfig,
        device: &Device,
        c: u64,
        target: u64,
        attested: &F,
    ) -> Result<Rebuilt, HistoryError>
    where
        F: Fn(u64, String) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let key = crate::protocol::checkpoint_key(c);
        let limit = checkpoint_limit(model_config);
        // Resumable, with a time limit scaled to the size and progress shown: a late joiner
        // of a `small` network fetches half a gigabyte here.
        let f = bucket.get_large(&key, limit).await.map_err(|source| match source {
            StorageError::NotFound { .. } => HistoryError::Missing(key.clone()),
            source => HistoryError::Download { key: key.clone(), source },
        })?;
        let (params, adam) = crate::state::params_from_checkpoint(&f.bytes, model_config, device)
            .map_err(|e| HistoryError::Invalid { key: key.clone(), reason: Rejection::Malformed(e.to_string()) })?;
        let full = state_hash(&params, &adam)?;
        // The checkpoint's state must be the attested product of window c - 1: its identity
        // is its anchored link, whose full hash must be the checkpoint's own (genesis needs
        // no attestation: every node computes it, and its identity is its full hash).
        let genesis = c == 0 && {
            let g = Params::genesis(model_config, self.hparams.genesis_seed, device)?;
            full == state_hash(&g, &PublicAdam::zeros(g.specs()))?
        };
        let link = crate::state::checkpoint_link(&f.bytes);
        let (hash, anchor) = match (&link, c.checked_sub(1)) {
            _ if genesis => (full.clone(), None),
            (Some(l), Some(prev)) if l.window == prev && l.full.as_deref() == Some(full.as_str()) => (l.id(), link),
            (Some(l), _) => {
                return Err(HistoryError::Mismatch(format!(
                    "{key} names window {} and full state {}; its contents are window {} with full state {}",
                    l.window + 1,
                    short(l.full.as_deref().unwrap_or("none")),
                    c,
                    short(&full)
                )));
            }
            (None, _) => return Err(HistoryError::Mismatch(format!("{key} carries no link to the attested lineage"))),
        };
        let vouched = genesis
            || match c.checked_sub(1) {
                Some(prev) => attested(prev, hash.clone()).await,
                None => false,
            };
        if !vouched {
            return Err(HistoryError::Mismatch(format!(
                "{key} (state {}) is not attested by a stake majority of validators as the state after window {}",
                short(&hash),
                c.saturating_sub(1)
            )));
        }
        let start = Rebuilt { params, adam, window: c, hash, anchor, full: Some(full), checkpoint: c };
        self.replay(bucket, start, target).await
    }

    async fn aggregate_at(
        &self,
        bucket: &Bucket,
        params: &Params,
        w: u64,
    ) -> Result<Option<AggregateObject>, HistoryError> {
        let idx = self.indices(params, w).await?;
        Ok(self.fetch_aggregate(bucket, params, &idx, w).await?.map(|(o, _)| o))
    }
}

/// Apply `obj` to `params` and `adam`, whatever state they hold: the public AdamW step with
/// the aggregate's gradient at the indices (no step at all when nothing was included), and
/// the full-state hash at an anchor window. Returns the identity produced from `parent`.
pub fn apply_update(
    params: &Params,
    adam: &mut PublicAdam,
    indices: &SliceIndices,
    obj: &AggregateObject,
    parent: &str,
    hparams: &crate::hparams::HParams,
) -> Result<Produced, HistoryError> {
    let w = obj.set.window;
    let included = !obj.set.included.is_empty();
    if included {
        adam.apply(params, indices, &obj.values, &AdamStep::of(hparams, w))?;
    }
    let full = if lineage::is_anchor(hparams, w) { Some(state_hash(params, adam)?) } else { None };
    Ok(lineage::produce(parent, w, included, &obj.values, full))
}

/// Apply `obj` to `params` and `adam` (holding the state named `hash`): the parent must
/// match (on a mismatch nothing is written), then [`apply_update`], and the produced
/// identity must be the aggregate's `state`. Returns what was produced.
pub fn apply_checked(
    params: &Params,
    adam: &mut PublicAdam,
    indices: &SliceIndices,
    obj: &AggregateObject,
    hash: &str,
    hparams: &crate::hparams::HParams,
) -> Result<Produced, HistoryError> {
    if obj.set.parent != hash {
        return Err(HistoryError::Mismatch(format!(
            "aggregate of window {} applies to state {}, this state is {}",
            obj.set.window,
            short(&obj.set.parent),
            short(hash)
        )));
    }
    let produced = apply_update(params, adam, indices, obj, hash, hparams)?;
    check_produced(obj, &produced)?;
    Ok(produced)
}

/// Whether `produced` (this node's own application of `obj`) is the state `obj` names; the
/// error says whether the full-state hashes differ (this node's values drifted from the
/// publisher's) or the link itself (the publisher named a state its values do not produce).
pub fn check_produced(obj: &AggregateObject, produced: &Produced) -> Result<(), HistoryError> {
    if produced.id == obj.set.state {
        return Ok(());
    }
    let own_full = produced.link.as_ref().and_then(|l| l.full.as_deref());
    let detail = match (own_full, obj.set.full.as_deref()) {
        (Some(own), Some(theirs)) if own != theirs => {
            format!(" (full state {} here, {} there)", short(own), short(theirs))
        }
        _ => String::new(),
    };
    Err(HistoryError::Mismatch(format!(
        "aggregate of window {} produced state {}, it names {}{detail}",
        obj.set.window,
        short(&produced.id),
        short(&obj.set.state)
    )))
}

/// The first 12 hex digits of a hash, for logs.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Publish what a validator keeps after following `window`: the applied aggregate's bytes
/// (when it came from another validator) and, every `max_history / 2` windows, a checkpoint
/// of the state it now holds (`theta`: window, parameters and optimizer state); delete own
/// objects older than the history. Failures are logged.
pub async fn publish_history(
    bucket: &Bucket,
    hotkey: &str,
    applied: Option<&Bytes>,
    window: u64,
    theta: Option<(u64, &Params, &PublicAdam, Option<&Link>)>,
    hparams: &crate::hparams::HParams,
) {
    if let Some(bytes) = applied
        && let Err(e) = bucket.put(&crate::protocol::aggregate_key(window), bytes.clone()).await
    {
        tracing::warn!(window, error = %e, "cannot publish the applied aggregate");
    }
    if let Some((cw, params, adam, anchor)) = theta
        && cw.is_multiple_of(lineage::checkpoint_every(hparams))
    {
        // A checkpoint names its state by the anchored link that produced it; a node that
        // did not apply the anchor aggregate (none was accepted in that window) has none.
        let Some(link) = anchor.filter(|l| l.window + 1 == cw && l.is_anchored()) else {
            tracing::info!(
                window = cw,
                "no checkpoint this time: the state was not produced by the anchor window's aggregate"
            );
            cleanup(bucket, hotkey, window, hparams).await;
            return;
        };
        match crate::state::checkpoint_bytes(params, adam, cw, Some(link)) {
            Ok(b) => {
                if let Err(e) = bucket.put(&crate::protocol::checkpoint_key(cw), Bytes::from(b)).await {
                    tracing::warn!(error = %e, "cannot publish checkpoint");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialise checkpoint"),
        }
    }
    cleanup(bucket, hotkey, window, hparams).await;
}

/// Delete own slices older than `max_history` windows, aggregates older than twice that
/// and checkpoints older than twice that (a checkpoint stays as long as the aggregates
/// that vouch for it).
pub async fn cleanup(bucket: &Bucket, hotkey: &str, window: u64, hparams: &crate::hparams::HParams) {
    if let Err(e) = bucket.cleanup(hotkey, window, hparams.max_history).await {
        tracing::warn!(error = %e, "cannot clean up old slices");
    }
    let keep = 2 * hparams.max_history;
    for prefix in ["checkpoint-", "aggregate-", "attestation-", "verdicts-"] {
        if let Ok(list) = bucket.list(prefix).await {
            for o in list {
                let w = crate::protocol::parse_checkpoint_key(&o.key)
                    .or_else(|| crate::protocol::parse_aggregate_key(&o.key))
                    .or_else(|| crate::network::attestation::parse_attestation_key(&o.key))
                    .or_else(|| crate::network::verdicts::parse_verdicts_key(&o.key));
                if w.is_some_and(|w| w + keep < window) {
                    let _ = bucket.delete(&o.key).await;
                }
            }
        }
    }
}
