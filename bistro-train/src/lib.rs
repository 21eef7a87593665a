//! # bistro-train
//!
//! The miner side of BISTRO as a library:
//!
//! * [`data`]: pages, corpus, tokenizer and batches — `(network, hotkey, window)` to token rows;
//! * [`hparams`]: the protocol's shared hyper-parameters;
//! * [`protocol`]: what every node must agree on besides those (version, hash tags, object
//!   keys, limits on peers' objects);
//! * [`slices`]: index selection, the slice wire format, validation and aggregation;
//! * [`storage`]: buckets (local directory, S3-compatible, memory) behind one API;
//! * [`network`]: everything between nodes — the accepted set of a window ([`accepted`]),
//!   validators' signed attestations of it ([`network::attestation`]), their published
//!   history ([`history`]), how every node follows, verifies and repairs ([`node`]), window
//!   collection ([`sync`]) and the rules for peers' endpoints ([`endpoint`]).
//!
//! A miner never needs validator code; `bistro-validate` builds on this crate.

/// The git commit this crate was built from (`BISTRO_GIT_HASH` at build time, else `git
/// rev-parse`, else `unknown`).
pub const GIT_HASH: &str = env!("BISTRO_GIT_HASH");

#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
#[cfg(feature = "cli")]
pub mod doctor;
pub mod hparams;
pub mod miner;
pub mod network;
#[cfg(feature = "cli")]
pub mod process;
pub mod protocol;
pub mod public_adam;
pub mod slices;
pub mod state;
#[cfg(feature = "cli")]
pub mod status;
pub mod step;
pub mod storage;
pub mod telemetry;

pub use network::{accepted, endpoint, history, lineage, node, sync, verdicts};

pub use hparams::{Aggregation, HParams, PROTOCOL_VERSION};

/// Re-export of the Candle core crate used in this crate's API.
pub use candle_core;
