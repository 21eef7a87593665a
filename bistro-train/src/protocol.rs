//! What every node of a network must agree on that is not a network setting: the protocol
//! version, the domain-separation tags of the consensus hashes, the object keys, the size
//! limits on what peers publish, the reward rule and the limits on reading a peer.
//!
//! Network settings (window length, compression, learning rate, budgets, ...) are
//! [`HParams`](crate::HParams), shared as one TOML file. Everything here is fixed by the
//! code and changes only with [`PROTOCOL_VERSION`]; `docs/PROTOCOL.md` states the same
//! values and `tests/protocol_doc.rs` checks that it does.

use std::time::Duration;

/// Version of the wire protocol implemented by this crate (slice format, seeds, update rule).
pub const PROTOCOL_VERSION: u32 = 6;

/// Domain-separation tags: the first bytes hashed by each consensus hash, so that no hash
/// of one kind can be replayed as another.
pub mod tags {
    /// [`crate::accepted::state_hash`]: the hash of a full model state.
    pub const STATE: &[u8] = b"bistro/state/v3";
    /// [`crate::lineage::Link::id`]: a state's identity, one link of the hash chain.
    pub const LINK: &[u8] = b"bistro/link/v1";
    /// [`crate::lineage::update_digest`]: the digest of an aggregate's values.
    pub const UPDATE: &[u8] = b"bistro/update/v1";
    /// [`crate::network::attestation::Attestation::signing_bytes`]: what a validator signs.
    pub const ATTESTATION: &[u8] = b"bistro/attestation/v1";
    /// [`crate::network::verdicts::VerdictSheet::signing_bytes`]: what a verifier signs.
    pub const VERDICTS: &[u8] = b"bistro/verdicts/v1";
    /// The seed of a window's verification assignment (`bistro_validate::assignment`).
    pub const ASSIGNMENT: &[u8] = b"bistro/assignment/v1";
    /// [`crate::data::pages::draw_pages`]: the key of a (network, hotkey, window)'s pages.
    pub const PAGES: &[u8] = b"bistro/pages/v1";
    /// [`crate::slices::SliceIndices::select`]: the seed of a window's slice coordinates.
    pub const SLICE_INDICES: &[u8] = b"bistro/slice-indices/v1";
    /// [`crate::HParams::hash`]: followed by [`super::PROTOCOL_VERSION`] (u32 LE).
    pub const HPARAMS: &[u8] = b"bistro/hparams/v";
    /// [`bistro_model::ModelConfig::hash`].
    pub const MODEL_CONFIG: &[u8] = bistro_model::config::CONFIG_HASH_TAG;
    /// [`bistro_model::params::genesis_values`]: the key of each parameter's genesis stream.
    pub const GENESIS: &[u8] = bistro_model::params::GENESIS_TAG;
}

/// Object key of `hotkey`'s slice for `window`.
pub fn slice_key(window: u64, hotkey: &str) -> String {
    format!("slice-{window}-{hotkey}.safetensors")
}

/// Object key of the aggregate (the accepted set's update) of `window`.
pub fn aggregate_key(window: u64) -> String {
    format!("aggregate-{window}.safetensors")
}

/// The window of an aggregate key.
pub fn parse_aggregate_key(key: &str) -> Option<u64> {
    key.strip_prefix("aggregate-")?.strip_suffix(".safetensors")?.parse().ok()
}

/// Object key of a published checkpoint of `theta_window`.
pub fn checkpoint_key(window: u64) -> String {
    format!("checkpoint-{window}.safetensors")
}

/// The window of a checkpoint key.
pub fn parse_checkpoint_key(key: &str) -> Option<u64> {
    key.strip_prefix("checkpoint-")?.strip_suffix(".safetensors")?.parse().ok()
}

/// Object key of the hyper-parameters a node runs with, as TOML, written to its bucket when
/// it starts: what `doctor` compares against the lead's (informative; slices and
/// aggregates carry the hash that counts).
pub const HPARAMS_KEY: &str = "hparams.toml";

/// Largest hparams object read from a peer.
pub const HPARAMS_MAX_BYTES: u64 = 64 * 1024;

/// Metadata key of the window inside a checkpoint file.
pub const CHECKPOINT_WINDOW_KEY: &str = "bistro_window";

/// Bytes of header JSON allowed per tensor entry beyond its name (dtype, shape, offsets).
pub const HEADER_BYTES_PER_TENSOR: u64 = 128;

/// Bytes of header JSON allowed for the metadata of a slice.
pub const SLICE_METADATA_BYTES: u64 = 4096;

/// Header bytes allowed for an aggregate's metadata (the included and excluded lists): room
/// for about 4,000 hotkeys.
pub const AGGREGATE_METADATA_BYTES: u64 = 1 << 20;

/// The weight of a slice included on its record (not recomputed this window) relative to a
/// recomputed one: its update enters the mean scaled by this factor, after clipping to the
/// aggregate's `record_clip` (red team 3, F6).
pub const RECORD_WEIGHT: f64 = 0.5;

/// The exponent of the honesty score `1 / (1 + (e / tol)^k)`: 1 at `e = 0`, 0.5 at the
/// tolerance, below 0.004 at twice the tolerance.
pub const HONESTY_EXPONENT: i32 = 8;

/// Longest a node waits for one object from a peer (a slow or hostile peer must not stall
/// the window); the node's own transfer timeout applies when it is shorter.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// Attempts at one object from a peer (the node's own setting applies when it is lower).
pub const PEER_ATTEMPTS: u32 = 2;

/// Checkpoints a repair or bootstrap tries per publisher, newest first.
pub const REPAIR_CHECKPOINTS: usize = 2;

/// Validators' histories a repair tries (the aggregate's publisher first).
pub const REPAIR_SOURCES: usize = 3;

/// The whole budget of one repair or bootstrap from one publisher, besides the checkpoint
/// downloads (each may add its size at [`crate::storage::MIN_LARGE_RATE`]).
pub const REPAIR_BUDGET: Duration = Duration::from_secs(120);

/// Longest a node waits to connect to any endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
