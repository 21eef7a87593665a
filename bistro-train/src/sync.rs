//! Window synchronisation shared by miners and validators: find the window's slice seed
//! and deadline, download every peer's slice, validate it, and merge the accepted ones.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bistro_model::ModelConfig;
use candle_core::Device;

use bistro_chain::{BlockHash, Chain, ChainError};
use bistro_model::Params;
use futures::StreamExt;

use crate::hparams::HParams;
use crate::slices::{self, Aggregate, Contribution, Rejection, SliceIndices, SliceMeta};
use crate::storage::{Bucket, BucketOptions, StorageError};

/// Errors of window synchronisation (a peer's bad slice is never one: see [`Rejection`]).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The chain failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// Local state cannot be used.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// What a node needs to find and check peers' slices.
#[derive(Clone)]
pub struct SyncContext {
    /// The chain.
    pub chain: Arc<dyn Chain>,
    /// The subnet.
    pub netuid: u16,
    /// The network's hyper-parameters.
    pub hparams: HParams,
    /// Hash of `hparams`.
    pub hparams_hash: String,
    /// Hash of the model config.
    pub model_hash: String,
    /// Credentials and transfer settings for peers' buckets.
    pub bucket_options: BucketOptions,
    /// Whether peers may commit `file://` and `memory://` buckets (devnet only: on a real
    /// network a hostile peer must not make nodes read local files).
    pub allow_local_buckets: bool,
    /// Downloads in flight at once.
    pub concurrency: usize,
}

/// One peer's slice for a window, accepted or rejected.
#[derive(Clone, Debug)]
pub struct PeerSlice {
    /// The peer's uid.
    pub uid: u16,
    /// The peer's hotkey.
    pub hotkey: String,
    /// The decoded values, or why they were rejected.
    pub outcome: Result<Vec<Vec<f32>>, Rejection>,
}

/// Every peer's slice of one window, with the indices and `theta_w` at them.
#[derive(Clone, Debug)]
pub struct WindowSlices {
    /// The window.
    pub window: u64,
    /// The window's slice seed (hash of the first block of the next window).
    pub seed: BlockHash,
    /// The slice indices.
    pub indices: SliceIndices,
    /// `theta_w[I]`.
    pub theta_at_i: Vec<Vec<f32>>,
    /// Miners (no validator permit) that committed a bucket, sorted by uid.
    pub peers: Vec<PeerSlice>,
    /// Valid slices the merge left out as norm outliers: (hotkey, rejection). Their
    /// values stay in `peers` so validators still score what was sent.
    pub outliers: Vec<(String, Rejection)>,
}

impl WindowSlices {
    /// The accepted slices as aggregation inputs.
    pub fn contributions(&self) -> Vec<Contribution> {
        self.peers
            .iter()
            .filter_map(|p| {
                p.outcome.as_ref().ok().map(|v| Contribution { hotkey: p.hotkey.clone(), values: v.clone() })
            })
            .collect()
    }
}

impl SyncContext {
    /// The slice seed of `window`: the hash of the first block of `window + 1`.
    pub async fn seed(&self, window: u64) -> Result<BlockHash, ChainError> {
        self.chain.block_hash(self.hparams.first_block(window + 1)).await
    }

    /// The upload deadline of `window` in Unix ms: the first block of `window + 1` plus the grace period.
    pub async fn deadline_ms(&self, window: u64) -> Result<u64, ChainError> {
        let t = self.chain.block_time_unix_ms(self.hparams.first_block(window + 1)).await?;
        Ok(t + self.hparams.upload_grace_secs * 1000)
    }

    /// The metadata a slice of `window` by `hotkey` must carry.
    pub fn meta(&self, window: u64, hotkey: &str) -> SliceMeta {
        SliceMeta::new(window, hotkey, self.hparams.compression, &self.hparams_hash, &self.model_hash)
    }

    /// Open a peer's committed bucket, enforcing the local-bucket policy.
    pub fn peer_bucket(&self, url: &str) -> Result<Bucket, Rejection> {
        let local = url.starts_with("file://") || url.starts_with("memory://") || !url.contains("://");
        if local && !self.allow_local_buckets {
            return Err(Rejection::Download(format!(
                "bucket URL `{url}` is local; only s3:// buckets are read on this network"
            )));
        }
        // A slow or hostile peer must not stall the window: short, bounded downloads.
        let mut opts = self.bucket_options.clone();
        opts.transfer.attempts = opts.transfer.attempts.min(2);
        opts.transfer.timeout = opts.transfer.timeout.min(std::time::Duration::from_secs(15));
        Bucket::open(url, &opts).map_err(|e| Rejection::Download(e.to_string()))
    }

    /// Download and validate every committed peer's slice of `window` against `params` (= `theta_w`).
    pub async fn collect(&self, params: &Params, window: u64) -> Result<WindowSlices, SyncError> {
        let seed = self.seed(window).await?;
        let indices = SliceIndices::select(params.specs(), &seed, self.hparams.compression);
        let theta_at_i = slices::gather_params(params, &indices)?;
        let deadline_ms = self.deadline_ms(window).await?;
        let deadline = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(deadline_ms as i64).unwrap_or_default();
        let metagraph = self.chain.metagraph(self.netuid).await?;
        let mut urls = HashMap::new();
        for n in &metagraph.neurons {
            if let Some(url) = self.chain.commitment(self.netuid, &n.hotkey).await? {
                urls.insert(n.uid, url);
            }
        }
        let lengths: Vec<usize> = indices.all().iter().map(Vec::len).collect();
        let names: Vec<String> = params.specs().iter().map(|s| s.name.clone()).collect();
        // Validators (stake and a permit) publish checkpoints, not slices.
        let jobs = metagraph.neurons.iter().filter(|n| urls.contains_key(&n.uid) && !n.validator_permit).map(|n| {
            let url = urls[&n.uid].clone();
            let expect = slices::SliceExpectation {
                names: names.clone(),
                lengths: lengths.clone(),
                meta: self.meta(window, &n.hotkey),
                max_bytes: self.hparams.max_slice_bytes,
            };
            let (uid, hotkey) = (n.uid, n.hotkey.clone());
            async move {
                let outcome = async {
                    let bucket = self.peer_bucket(&url)?;
                    let key = slices::slice_key(window, &hotkey);
                    let fetched = bucket.get(&key, expect.max_bytes).await.map_err(|e| match e {
                        StorageError::NotFound { .. } => Rejection::Missing,
                        StorageError::TooLarge { size, limit, .. } => Rejection::TooLarge { size, limit },
                        other => Rejection::Download(other.to_string()),
                    })?;
                    slices::check_deadline(fetched.last_modified, deadline)?;
                    // Decoding a large slice is CPU work: keep it off the async threads.
                    tokio::task::spawn_blocking(move || slices::decode(&fetched.bytes, &expect))
                        .await
                        .map_err(|e| Rejection::Malformed(format!("decoder task failed: {e}")))?
                }
                .await;
                if let Err(r) = &outcome {
                    tracing::debug!(window, uid, hotkey = %hotkey, reason = %r, "slice not accepted");
                }
                PeerSlice { uid, hotkey, outcome }
            }
        });
        let mut peers: Vec<PeerSlice> =
            futures::stream::iter(jobs).buffer_unordered(self.concurrency.max(1)).collect().await;
        peers.sort_by_key(|p| p.uid);
        Ok(WindowSlices { window, seed, indices, theta_at_i, peers, outliers: Vec::new() })
    }

    /// Merge the accepted slices into `params` (`theta_w` becomes `theta_{w+1}`); norm
    /// outliers are listed in `ws.outliers`.
    pub fn merge(&self, params: &Params, ws: &mut WindowSlices) -> Result<Aggregate, SyncError> {
        let agg = slices::aggregate(
            &ws.theta_at_i,
            &ws.contributions(),
            &self.hparams.aggregation,
            self.hparams.outlier_norm_factor,
        );
        ws.outliers = agg
            .outliers
            .iter()
            .map(|(h, norm, median)| {
                (
                    h.clone(),
                    Rejection::Outlier { norm: *norm, median: *median, factor: self.hparams.outlier_norm_factor },
                )
            })
            .collect();
        slices::scatter_params(params, &ws.indices, &agg.values)?;
        Ok(agg)
    }
}

impl SyncContext {
    /// Decide where `theta` comes from: local state in `state_dir`, else the newest
    /// checkpoint published by the highest-stake peer, else genesis at window 0 (the window
    /// loop then replays the windows since). Returns the parameters, their window and a
    /// description of the origin.
    pub async fn bootstrap(
        &self,
        own_hotkey: &str,
        state_dir: &Path,
        model_config: &ModelConfig,
        device: &Device,
    ) -> Result<(Params, u64, String), SyncError> {
        if let Some((info, params)) = crate::state::load(state_dir, model_config, &self.hparams_hash, device)? {
            return Ok((params, info.window, format!("local state ({})", state_dir.display())));
        }
        if let Some((params, w, who)) = self.newest_checkpoint(own_hotkey, model_config, device).await {
            return Ok((params, w, format!("checkpoint of window {w} from {who}")));
        }
        let params = Params::genesis(model_config, self.hparams.genesis_seed, device)?;
        Ok((params, 0, format!("genesis (seed {})", self.hparams.genesis_seed)))
    }

    async fn newest_checkpoint(
        &self,
        own_hotkey: &str,
        model_config: &ModelConfig,
        device: &Device,
    ) -> Option<(Params, u64, String)> {
        let mg = self.chain.metagraph(self.netuid).await.ok()?;
        let mut neurons = mg.neurons.clone();
        neurons.sort_by(|a, b| b.stake.cmp(&a.stake).then(a.uid.cmp(&b.uid)));
        for n in neurons.iter().filter(|n| n.hotkey != own_hotkey) {
            let Ok(Some(url)) = self.chain.commitment(self.netuid, &n.hotkey).await else { continue };
            let Ok(bucket) = self.peer_bucket(&url) else { continue };
            let Ok(list) = bucket.list("checkpoint-").await else { continue };
            let Some(w) = list.iter().filter_map(|o| crate::state::parse_checkpoint_key(&o.key)).max() else {
                continue;
            };
            let limit = (model_config.num_params() as u64) * 4 + 1024 * 1024;
            match bucket.get(&crate::state::checkpoint_key(w), limit).await {
                Ok(f) => match crate::state::params_from_checkpoint(&f.bytes, model_config, device) {
                    Ok(p) => return Some((p, w, n.hotkey.clone())),
                    Err(e) => tracing::warn!(peer = %n.hotkey, error = %e, "ignoring a bad checkpoint"),
                },
                Err(e) => tracing::warn!(peer = %n.hotkey, error = %e, "cannot download checkpoint"),
            }
        }
        None
    }
}

/// Every `max_history / 2` windows: publish `checkpoint-{window}.safetensors` of `params`
/// (= `theta_window`) to `bucket`, delete this hotkey's slices older than `max_history`
/// windows and checkpoints older than twice that. Failures are logged, never fatal.
pub async fn publish_checkpoint_and_cleanup(
    bucket: &Bucket,
    hotkey: &str,
    params: &Params,
    window: u64,
    hparams: &HParams,
) {
    let every = hparams.max_history.div_ceil(2).max(1);
    if !window.is_multiple_of(every) {
        return;
    }
    match crate::state::checkpoint_bytes(params, window) {
        Ok(bytes) => {
            if let Err(e) = bucket.put(&crate::state::checkpoint_key(window), bytes::Bytes::from(bytes)).await {
                tracing::warn!(error = %e, "cannot publish checkpoint");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot serialise checkpoint"),
    }
    if let Err(e) = bucket.cleanup(hotkey, window, hparams.max_history).await {
        tracing::warn!(error = %e, "cannot clean up old slices");
    }
    if let Ok(list) = bucket.list("checkpoint-").await {
        for o in list {
            if crate::state::parse_checkpoint_key(&o.key).is_some_and(|w| w + 2 * hparams.max_history < window) {
                let _ = bucket.delete(&o.key).await;
            }
        }
    }
}
