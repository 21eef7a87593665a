//! # bistro-chain
//!
//! Everything that talks to a chain goes through the [`Chain`] trait, so miners and
//! validators run unchanged on the embedded [`devnet`] and on Bittensor. This crate knows
//! no tensors.
//!
//! * [`Chain`]: blocks and block hashes, the metagraph, commitments (bucket URLs), weights;
//! * [`devnet::Devnet`]: a local chain in a directory, safe for several processes at once;
//! * [`wallet`]: Bittensor wallet paths and hotkey files;
//! * [`commit_reveal`]: timelocked weight commits (subtensor's commit-reveal), and
//!   [`submit_weights`], which sets weights the way a subnet takes them;
//! * `cli::ChainArgs` (feature `cli`, on by default): the Bittensor-style command-line
//!   options shared by every binary.

#[cfg(feature = "cli")]
pub mod cli;
pub mod commit_reveal;
pub mod devnet;
pub mod keys;
pub mod subtensor;
pub mod wallet;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

/// A 32-byte block hash.
pub type BlockHash = [u8; 32];

/// Errors of chain access.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The requested block does not exist yet.
    #[error("block {0} has not been produced yet")]
    FutureBlock(u64),
    /// The hotkey is not registered on the subnet.
    #[error("hotkey {hotkey} is not registered on netuid {netuid}{hint}")]
    NotRegistered {
        /// The hotkey.
        hotkey: String,
        /// The subnet.
        netuid: u16,
        /// What to do about it.
        hint: String,
    },
    /// The subnet does not exist or is full.
    #[error("netuid {netuid}: {reason}")]
    Subnet {
        /// The subnet.
        netuid: u16,
        /// Why.
        reason: String,
    },
    /// Weights were rejected.
    #[error("set_weights rejected: {0}")]
    Weights(String),
    /// The chain state is corrupt or unreadable.
    #[error("chain state {path}: {reason}")]
    State {
        /// The state file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A wallet file problem.
    #[error("wallet: {0}")]
    Wallet(String),
    /// The endpoint could not be reached or answered badly.
    #[error("chain endpoint {endpoint}: {what}: {source}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A configuration value is invalid.
    #[error("chain config: {0}")]
    Config(String),
    /// The operation timed out.
    #[error("chain operation `{0}` timed out")]
    Timeout(String),
}

/// The longest commitment (bucket URL) a node publishes: subtensor's `Data::BigRaw` bound
/// (`pallet_commitments`, 512 bytes). Shorter URLs of at most 128 bytes go out as `Raw<N>`.
/// The devnet enforces the same bound, so a URL that works there works on a real network.
pub const MAX_COMMITMENT_BYTES: usize = 512;

/// Refuse a commitment longer than [`MAX_COMMITMENT_BYTES`], with what to do about it.
pub fn check_commitment_len(len: usize) -> Result<()> {
    if len > MAX_COMMITMENT_BYTES {
        return Err(ChainError::Config(format!(
            "the bucket URL is {len} bytes, over the {MAX_COMMITMENT_BYTES}-byte commitment limit: \
             shorten the bucket name or prefix, or leave out query parameters peers do not need"
        )));
    }
    Ok(())
}

/// Result alias for chain operations.
pub type Result<T, E = ChainError> = std::result::Result<T, E>;

/// One registered neuron of a subnet.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Neuron {
    /// Position in the subnet.
    pub uid: u16,
    /// The hotkey (ss58 address, or a devnet name).
    pub hotkey: String,
    /// Stake (alpha, in the chain's smallest unit).
    pub stake: u64,
    /// Whether this neuron may set weights.
    pub validator_permit: bool,
    /// Incentive as a fraction in `[0, 1]`, where the chain provides it.
    pub incentive: f64,
}

/// The registry of one subnet at one block.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metagraph {
    /// The subnet.
    pub netuid: u16,
    /// The block it was read at.
    pub block: u64,
    /// Neurons sorted by uid.
    pub neurons: Vec<Neuron>,
}

impl Metagraph {
    /// The uid of `hotkey`, if registered.
    pub fn uid_of(&self, hotkey: &str) -> Option<u16> {
        self.neurons.iter().find(|n| n.hotkey == hotkey).map(|n| n.uid)
    }

    /// The neuron with `uid`.
    pub fn neuron(&self, uid: u16) -> Option<&Neuron> {
        self.neurons.iter().find(|n| n.uid == uid)
    }
}

fn async_stream<C: Chain + ?Sized>(
    chain: &C,
    poll: Duration,
) -> impl futures_core::Stream<Item = Result<u64>> + Send + '_ {
    futures_util::stream::unfold(None::<u64>, move |last| async move {
        loop {
            match chain.block_number().await {
                Ok(b) if last.is_none_or(|l| b > l) => {
                    let next = last.map(|l| l + 1).unwrap_or(b);
                    return Some((Ok(next), Some(next)));
                }
                Ok(_) => tokio::time::sleep(poll).await,
                Err(e) => {
                    tokio::time::sleep(poll).await;
                    return Some((Err(e), last));
                }
            }
        }
    })
}

/// How a subnet takes weights now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightsMode {
    /// `set_weights` directly.
    Direct,
    /// Commit-reveal is on: commit the weights timelocked to a beacon round.
    CommitReveal(CommitRevealParams),
}

/// What a timelocked commit needs, read from the chain at the time of committing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRevealParams {
    /// The beacon round to encrypt to (its signature is due when the chain reveals).
    pub reveal_round: u64,
    /// The block at (or after) which the chain reveals and applies the weights.
    pub reveal_block: u64,
    /// The beacon's public key (compressed G2): drand quicknet's on subtensor.
    pub beacon_public_key: Vec<u8>,
    /// The commit-reveal version the chain expects.
    pub version: u16,
}

/// What [`submit_weights`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightsSubmission {
    /// Set on chain now.
    Set,
    /// Committed; the chain applies them by itself at `reveal_block`.
    Committed {
        /// The beacon round the commit is encrypted to.
        reveal_round: u64,
        /// The block at which the chain reveals them.
        reveal_block: u64,
    },
}

/// Refuse a weight vector whose uids and values do not pair up one to one (every chain
/// refuses it; on commit-reveal subnets only at the reveal, where nobody sees the error).
pub(crate) fn check_weight_lengths(uids: &[u16], weights: &[u16]) -> Result<()> {
    if uids.len() != weights.len() {
        return Err(ChainError::Weights(format!("{} uids but {} weights", uids.len(), weights.len())));
    }
    Ok(())
}

/// Set `hotkey`'s weights the way `netuid` takes them: directly, or (commit-reveal on) as a
/// timelocked commit of the SCALE payload `{ hotkey, uids, values, version_key }` that the
/// chain decrypts and applies by itself once the reveal round's beacon signature is known.
pub async fn submit_weights(
    chain: &dyn Chain,
    netuid: u16,
    hotkey: &str,
    uids: &[u16],
    weights: &[u16],
    version_key: u64,
) -> Result<WeightsSubmission> {
    check_weight_lengths(uids, weights)?;
    match chain.weights_mode(netuid).await? {
        WeightsMode::Direct => {
            chain.set_weights(netuid, hotkey, uids, weights, version_key).await?;
            Ok(WeightsSubmission::Set)
        }
        WeightsMode::CommitReveal(p) => {
            let payload = commit_reveal::WeightsTlockPayload {
                hotkey: chain.account_bytes(hotkey)?,
                uids: uids.to_vec(),
                values: weights.to_vec(),
                version_key,
            };
            let commit = commit_reveal::commit_payload(&payload, p.reveal_round, &p.beacon_public_key)
                .map_err(|e| ChainError::Weights(e.to_string()))?;
            chain.commit_timelocked_weights(netuid, hotkey, &commit, p.reveal_round, p.version).await?;
            Ok(WeightsSubmission::Committed { reveal_round: p.reveal_round, reveal_block: p.reveal_block })
        }
    }
}

/// What the protocol needs from a chain.
#[async_trait]
pub trait Chain: Send + Sync {
    /// A short name for logs (`devnet at .bistro/devnet`, `finney`).
    fn describe(&self) -> String;

    /// The chain's nominal block time.
    fn block_time(&self) -> Duration;

    /// The newest block number.
    async fn block_number(&self) -> Result<u64>;

    /// The hash of block `number` ([`ChainError::FutureBlock`] when not produced yet).
    async fn block_hash(&self, number: u64) -> Result<BlockHash>;

    /// When block `number` is (or will be, at the nominal block time) produced, in Unix
    /// milliseconds. Upload deadlines are derived from it.
    async fn block_time_unix_ms(&self, number: u64) -> Result<u64>;

    /// The registry of `netuid`.
    async fn metagraph(&self, netuid: u16) -> Result<Metagraph>;

    /// The commitment (bucket URL) of `hotkey` on `netuid`, if any.
    async fn commitment(&self, netuid: u16, hotkey: &str) -> Result<Option<String>>;

    /// The registry of `netuid` as of block `block` (which must exist): what every node
    /// reads for a window's lead and publishers, so that a stake move or a new commitment
    /// while the window is being decided gives every node the same answer. The default, for
    /// a chain that keeps no history, is the newest registry.
    async fn metagraph_at(&self, netuid: u16, block: u64) -> Result<Metagraph> {
        let _ = block;
        self.metagraph(netuid).await
    }

    /// [`Chain::commitment`] as of block `block` (see [`Chain::metagraph_at`]).
    async fn commitment_at(&self, netuid: u16, hotkey: &str, block: u64) -> Result<Option<String>> {
        let _ = block;
        self.commitment(netuid, hotkey).await
    }

    /// The commitments of every neuron of `metagraph` as of block `block`, by uid (those
    /// with none are absent). The default reads one neuron at a time; a chain that can
    /// read them together does.
    async fn commitments_at(&self, metagraph: &Metagraph, block: u64) -> Result<HashMap<u16, String>> {
        let mut out = HashMap::new();
        for n in &metagraph.neurons {
            if let Some(url) = self.commitment_at(metagraph.netuid, &n.hotkey, block).await? {
                out.insert(n.uid, url);
            }
        }
        Ok(out)
    }

    /// Publish `data` as `hotkey`'s commitment on `netuid` (at most [`MAX_COMMITMENT_BYTES`]).
    async fn set_commitment(&self, netuid: u16, hotkey: &str, data: &str) -> Result<()>;

    /// Set `hotkey`'s weights on `netuid` (u16 weights per uid).
    async fn set_weights(
        &self,
        netuid: u16,
        hotkey: &str,
        uids: &[u16],
        weights: &[u16],
        version_key: u64,
    ) -> Result<()>;

    /// How `netuid` takes weights now (direct, or commit-reveal with its parameters).
    async fn weights_mode(&self, _netuid: u16) -> Result<WeightsMode> {
        Ok(WeightsMode::Direct)
    }

    /// Commit `hotkey`'s weights as a timelocked `commit` to `reveal_round`
    /// (`SubtensorModule.commit_timelocked_weights`).
    async fn commit_timelocked_weights(
        &self,
        netuid: u16,
        _hotkey: &str,
        _commit: &[u8],
        _reveal_round: u64,
        _version: u16,
    ) -> Result<()> {
        Err(ChainError::Weights(format!("netuid {netuid}: this chain does not take timelocked commits")))
    }

    /// `hotkey`'s sr25519 signature of `message` ([`keys`]): the subtensor client signs
    /// with the hotkey secret it loaded (and only for that hotkey); the devnet with the key
    /// derived from the name. Check one with [`keys::verify`].
    fn sign(&self, hotkey: &str, _message: &[u8]) -> Result<[u8; keys::SIGNATURE_BYTES]> {
        Err(ChainError::Wallet(format!("this chain holds no key to sign for {hotkey}")))
    }

    /// The bytes that identify `hotkey` inside a commit payload (the 32-byte account id on
    /// subtensor; the name on the devnet).
    fn account_bytes(&self, hotkey: &str) -> Result<Vec<u8>> {
        Ok(hotkey.as_bytes().to_vec())
    }

    /// The weights each validator uid last set: `(validator uid, [(uid, weight)])`.
    async fn weights(&self, netuid: u16) -> Result<Vec<(u16, Vec<(u16, u16)>)>>;

    /// Make sure `hotkey` is registered; the devnet registers it (with `stake`), a real
    /// chain returns [`ChainError::NotRegistered`] with instructions.
    async fn ensure_registered(&self, netuid: u16, hotkey: &str, stake: u64) -> Result<u16>;

    /// A stream of new block numbers (every block once, in order, from the current one on),
    /// polling at a fraction of the block time. Errors are yielded and the stream goes on.
    fn new_blocks(&self) -> std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<u64>> + Send + '_>> {
        let poll = (self.block_time() / 4).clamp(Duration::from_millis(20), Duration::from_secs(3));
        Box::pin(async_stream(self, poll))
    }

    /// Wait until block `number` exists (polling at a fraction of the block time), at most `timeout`.
    async fn wait_for_block(&self, number: u64, timeout: Duration) -> Result<u64> {
        let start = tokio::time::Instant::now();
        let poll = (self.block_time() / 8).clamp(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            let b = self.block_number().await?;
            if b >= number {
                return Ok(b);
            }
            if start.elapsed() >= timeout {
                return Err(ChainError::Timeout(format!("waiting for block {number} (at {b})")));
            }
            tokio::time::sleep(poll).await;
        }
    }
}
