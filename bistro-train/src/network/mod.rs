//! The network: what nodes exchange and how they come to hold one model.
//!
//! * [`accepted`]: the accepted set of a window (one aggregate object, published by the lead);
//! * [`attestation`]: validators' signed verdicts on an aggregate, and the stake quorum a
//!   node needs before it applies one;
//! * [`history`]: validators' published aggregates and checkpoints, for repair and joiners;
//! * [`lineage`]: a state's identity, a hash chain over the applied updates with a
//!   full-state hash at checkpoint anchors;
//! * [`node`]: how every node joins, follows, checks and repairs;
//! * [`roster`]: a window's registry and commitments, read once at its seed block;
//! * [`sync`]: a window's seed, deadline and slice collection;
//! * [`endpoint`]: which peer URLs a node reads at all.

pub mod accepted;
pub mod attestation;
pub mod endpoint;
pub mod history;
pub mod lineage;
pub mod node;
pub mod roster;
pub mod sync;
pub mod verdicts;
