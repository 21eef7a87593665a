//! Window synchronisation: find the window's slice seed and deadline, download and validate
//! every miner's slice under one time budget (validators), bootstrap a joining node.

use std::sync::Arc;

use bistro_chain::{BlockHash, Chain, ChainError};
use bistro_model::Params;

use crate::hparams::HParams;
use crate::network::roster::{Roster, Rosters};
use crate::slices::{self, Contribution, Rejection, SliceIndices, SliceMeta};
use crate::storage::{Bucket, BucketOptions, StorageError};

/// Errors of window synchronisation (a peer's bad slice is never one: see [`Rejection`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// Whether peers' endpoints may be internal addresses (loopback, private, link-local):
    /// the local devnet and tests only (see [`crate::endpoint`]).
    pub allow_private_endpoints: bool,
    /// The newest window's roster, read once ([`SyncContext::roster`]).
    pub rosters: Rosters,
}

impl std::fmt::Debug for SyncContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncContext")
            .field("chain", &self.chain.describe())
            .field("netuid", &self.netuid)
            .field("hparams_hash", &self.hparams_hash)
            .field("model_hash", &self.model_hash)
            .field("bucket_options", &self.bucket_options)
            .field("allow_local_buckets", &self.allow_local_buckets)
            .field("allow_private_endpoints", &self.allow_private_endpoints)
            .finish()
    }
}

/// One peer's slice for a window, valid or rejected.
#[derive(Clone, Debug)]
pub struct PeerSlice {
    /// The peer's uid.
    pub uid: u16,
    /// The peer's hotkey.
    pub hotkey: String,
    /// The codes and decoded values, or why they were rejected.
    pub outcome: Result<slices::SliceUpdate, Rejection>,
    /// Hex sha256 of the object's bytes, when it was downloaded.
    pub sha256: Option<String>,
}

/// Every miner's slice of one window, with the indices and `theta_w` at them.
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
    /// Miners that committed a bucket, sorted by uid. A neuron with a validator permit that
    /// uploaded nothing is a validator, not a miner, and is not listed.
    pub peers: Vec<PeerSlice>,
}

impl WindowSlices {
    /// The valid slices as aggregation inputs.
    pub fn contributions(&self) -> Vec<Contribution> {
        self.peers
            .iter()
            .filter_map(|p| {
                p.outcome.as_ref().ok().map(|v| Contribution { hotkey: p.hotkey.clone(), values: v.values.clone() })
            })
            .collect()
    }

    /// The miners of this window: `(uid, hotkey)` of every listed peer.
    pub fn miners(&self) -> Vec<(u16, String)> {
        self.peers.iter().map(|p| (p.uid, p.hotkey.clone())).collect()
    }
}

/// Whether `url` names a bucket on this machine (`file://`, `memory://`, a bare path), in
/// any letter case.
pub fn is_local_bucket_url(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => u.scheme() != "s3",
        Err(_) => true,
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

    /// The network's slice codec ([`HParams::codec`]).
    pub fn codec(&self) -> slices::quant::Codec {
        self.hparams.codec()
    }

    /// The metadata a slice of `hotkey` for `window` built on state `parent` carries.
    pub fn meta(&self, window: u64, hotkey: &str, parent: &str) -> SliceMeta {
        SliceMeta::new(window, hotkey, parent, self.hparams.compression, &self.hparams_hash, &self.model_hash)
    }

    /// Open a peer's committed bucket, enforcing the local-bucket policy.
    pub fn peer_bucket(&self, url: &str) -> Result<Bucket, Rejection> {
        if is_local_bucket_url(url) && !self.allow_local_buckets {
            return Err(Rejection::Download(format!(
                "bucket URL `{url}` is local; only s3:// buckets are read on this network"
            )));
        }
        // Short, bounded downloads, with the peer's published read key (never this node's keys).
        Bucket::open_peer(url, &self.bucket_options.transfer.for_peers(), self.allow_private_endpoints)
            .map_err(|e| Rejection::Download(e.to_string()))
    }

    /// `window`'s roster: the registry and commitments at its seed block, read once per
    /// window (provisional, at the newest block, while the seed block does not exist).
    pub async fn roster(&self, window: u64) -> Result<Arc<Roster>, ChainError> {
        if let Some(r) = self.rosters.get(window) {
            return Ok(r);
        }
        let seed_block = self.hparams.first_block(window + 1);
        let r = Arc::new(Roster::read(self.chain.as_ref(), self.netuid, window, seed_block).await?);
        self.rosters.keep(&r);
        Ok(r)
    }

    /// Download and validate every committed peer's slice of `window` against `params`
    /// (= `theta_w`), all in parallel under one total time budget (`collect_budget_ms`): a
    /// peer whose endpoint has not delivered by then is rejected as `timeout`. Every download
    /// starts at once, so each peer's deadline is the budget's end whatever its place in the
    /// metagraph: a stalling endpoint costs only its own download, never another peer's
    /// (red team 3, F4: with 8 downloads at a time, 8 stalling peers at low uids starved
    /// every peer after them). Lateness is judged by this node's clock (it collects after
    /// the deadline), never by the peer server's `Last-Modified`.
    ///
    /// `parent` is the state hash of `params`: a slice built on another state is rejected
    /// as `stale-state` (red team 3, F5).
    pub async fn collect(
        &self,
        params: &Params,
        parent: &str,
        window: u64,
        skip_hotkey: &str,
    ) -> Result<WindowSlices, SyncError> {
        let seed = self.seed(window).await?;
        let indices = SliceIndices::select(params.specs(), &seed, self.hparams.compression);
        let theta_at_i = slices::gather_params(params, &indices)?;
        let roster = self.roster(window).await?;
        let (metagraph, urls) = (&roster.metagraph, &roster.commitments);
        let budget_ms = self.hparams.collect_budget_ms;
        let budget_end = tokio::time::Instant::now() + std::time::Duration::from_millis(budget_ms);
        let jobs = metagraph.neurons.iter().filter(|n| urls.contains_key(&n.uid) && n.hotkey != skip_hotkey).map(|n| {
            let url = urls[&n.uid].clone();
            let expect = slices::expectation(
                params,
                &indices,
                self.meta(window, &n.hotkey, parent),
                self.hparams.max_slice_bytes,
                self.codec(),
            );
            let (uid, hotkey, permit) = (n.uid, n.hotkey.clone(), n.validator_permit);
            async move {
                let fetch = async {
                    let bucket = self.peer_bucket(&url)?;
                    let key = crate::protocol::slice_key(window, &hotkey);
                    bucket.get(&key, expect.max_bytes).await.map_err(|e| match e {
                        StorageError::NotFound { .. } => Rejection::Missing,
                        StorageError::TooLarge { size, limit, .. } => Rejection::TooLarge { size, limit },
                        other => Rejection::Download(other.to_string()),
                    })
                };
                let fetched = match tokio::time::timeout_at(budget_end, fetch).await {
                    Ok(r) => r,
                    Err(_) => Err(Rejection::Timeout { budget_ms }),
                };
                let sha256 = fetched.as_ref().ok().map(|f| crate::accepted::bytes_sha256(&f.bytes));
                let size = fetched.as_ref().map(|f| f.bytes.len()).unwrap_or(0);
                let outcome = match fetched {
                    // Decoding a large slice is CPU work: keep it off the async threads.
                    Ok(f) => tokio::task::spawn_blocking(move || slices::decode(&f.bytes, &expect))
                        .await
                        .unwrap_or_else(|e| Err(Rejection::Malformed(format!("decoder task failed: {e}")))),
                    Err(r) => Err(r),
                };
                match &outcome {
                    Ok(_) => crate::telemetry::slice("valid", size),
                    Err(r) => {
                        crate::telemetry::slice(r.code(), size);
                        tracing::debug!(window, uid, hotkey = %hotkey, reason = %r, "slice not valid");
                    }
                }
                (permit, PeerSlice { uid, hotkey, outcome, sha256 })
            }
        });
        crate::telemetry::phase("collect");
        let started = std::time::Instant::now();
        let got: Vec<(bool, PeerSlice)> = futures::future::join_all(jobs).await;
        crate::telemetry::phase_seconds("collect", started.elapsed().as_secs_f64());
        // A permit holder that uploaded nothing is a validator this window, not a miner.
        let mut peers: Vec<PeerSlice> = got
            .into_iter()
            .filter(|(permit, p)| !(*permit && p.outcome == Err(Rejection::Missing)))
            .map(|(_, p)| p)
            .collect();
        peers.sort_by_key(|p| p.uid);
        Ok(WindowSlices { window, seed, indices, theta_at_i, peers })
    }
}
