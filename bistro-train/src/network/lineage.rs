//! The shared state's identity as a hash chain (protocol v6): what a node names its state
//! by costs what changed, not what the state weighs.
//!
//! Up to protocol v5 every node hashed the whole state (parameters and public AdamW moments,
//! 16 bytes per parameter) after every window: about 7.4 s on two cores at `1b`, on the
//! lead's critical path. Now a state is named by its **lineage**: the identity produced by
//! the aggregate of window `w` is
//!
//! `sha256("bistro/link/v1" || parent || w (u64 LE) || update || flag || full)`
//!
//! where `parent` is the identity the aggregate applies to (64 hex ASCII bytes), `update`
//! is [`update_digest`] of its values (64 hex bytes), and `flag` is `1` followed by the
//! 64-hex [`crate::accepted::state_hash`] of the produced state at an **anchor** window
//! ([`is_anchor`]: the window before each checkpoint), `0` and nothing elsewhere. Between
//! anchors a node hashes only the update; at an anchor it also hashes the full state, so
//! a node whose values drifted from the network's (a corrupt disk, a non-deterministic
//! device) finds out there, repairs from an attested checkpoint, and every checkpoint is
//! tied to the identity the validators attested.
//!
//! An aggregate that includes nothing leaves the state unchanged, so outside anchors its
//! identity is its parent's; at an anchor it still links (with the unchanged state's full
//! hash), so that every checkpoint window has an anchored identity.
//! Genesis is named by its full hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hparams::HParams;
use crate::protocol::tags;

/// How often validators publish a checkpoint of their state: every `max_history / 2`
/// windows (at least 1).
pub fn checkpoint_every(h: &HParams) -> u64 {
    h.max_history.div_ceil(2).max(1)
}

/// Whether the aggregate of `window` anchors the lineage with a full-state hash: it
/// produces the state of a checkpoint window (`window + 1` a multiple of
/// [`checkpoint_every`]).
pub fn is_anchor(h: &HParams, window: u64) -> bool {
    (window + 1).is_multiple_of(checkpoint_every(h))
}

/// Hex sha256 of an aggregate's values, one leaf per tensor computed in parallel:
/// `sha256("bistro/update/v1" || tensor count (u64 LE) || for every tensor in canonical
/// order: element count (u64 LE) || sha256(values f32 LE))`.
pub fn update_digest(values: &[Vec<f32>]) -> String {
    use rayon::prelude::*;
    let leaves: Vec<_> = values
        .par_iter()
        .map(|v| {
            let mut h = Sha256::new();
            // Hash in pieces: no second copy of a large tensor.
            let mut buf = Vec::with_capacity(4 * v.len().min(1 << 16));
            for chunk in v.chunks(1 << 16) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                h.update(&buf);
            }
            (v.len(), h.finalize())
        })
        .collect();
    let mut h = Sha256::new();
    h.update(tags::UPDATE);
    h.update((values.len() as u64).to_le_bytes());
    for (n, leaf) in leaves {
        h.update((n as u64).to_le_bytes());
        h.update(leaf);
    }
    hex::encode(h.finalize())
}

/// One link of the lineage: what an identity is the hash of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The identity of the state the update applied to.
    pub parent: String,
    /// The window whose aggregate it was.
    pub window: u64,
    /// [`update_digest`] of the aggregate's values.
    pub update: String,
    /// At an anchor, the full [`crate::accepted::state_hash`] of the produced state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<String>,
}

impl Link {
    /// The identity this link names (see the module documentation).
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(tags::LINK);
        h.update(self.parent.as_bytes());
        h.update(self.window.to_le_bytes());
        h.update(self.update.as_bytes());
        match &self.full {
            Some(f) => {
                h.update([1u8]);
                h.update(f.as_bytes());
            }
            None => h.update([0u8]),
        }
        hex::encode(h.finalize())
    }

    /// Whether it carries a full-state hash.
    pub fn is_anchored(&self) -> bool {
        self.full.is_some()
    }
}

/// The identity a window's aggregate produces, and the link that names it (`None` when
/// the aggregate changes nothing and is not an anchor: the identity stays `parent`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    /// The produced identity.
    pub id: String,
    /// Its link, if the identity changed.
    pub link: Option<Link>,
}

/// What the aggregate of `window` (including anything or not, with `values`) produces from
/// `parent`; `full` is the produced state's full hash, which the caller computes exactly at
/// anchors ([`is_anchor`]).
pub fn produce(parent: &str, window: u64, included_any: bool, values: &[Vec<f32>], full: Option<String>) -> Produced {
    if !included_any && full.is_none() {
        return Produced { id: parent.to_string(), link: None };
    }
    let link = Link { parent: parent.to_string(), window, update: update_digest(values), full };
    Produced { id: link.id(), link: Some(link) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(max_history: u64) -> HParams {
        HParams { max_history, ..HParams::default() }
    }

    #[test]
    fn anchors_are_the_windows_before_checkpoints() {
        let anchors: Vec<u64> = (0..12).filter(|&w| is_anchor(&h(10), w)).collect();
        assert_eq!(anchors, vec![4, 9]);
        assert!((0..5).all(|w| is_anchor(&h(1), w)));
    }

    #[test]
    fn every_part_of_a_link_moves_the_identity() {
        let base = Link { parent: "a".repeat(64), window: 3, update: update_digest(&[vec![1.0, 2.0]]), full: None };
        let id = base.id();
        assert_eq!(id.len(), 64);
        let variants = [
            Link { parent: "b".repeat(64), ..base.clone() },
            Link { window: 4, ..base.clone() },
            Link { update: update_digest(&[vec![1.0, 2.5]]), ..base.clone() },
            Link { full: Some("c".repeat(64)), ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.id(), id, "{v:?}");
        }
        assert_eq!(base.clone().id(), id);
    }

    #[test]
    fn update_digest_separates_tensor_boundaries() {
        assert_ne!(update_digest(&[vec![1.0, 2.0], vec![]]), update_digest(&[vec![1.0], vec![2.0]]));
        assert_ne!(update_digest(&[vec![0.0]]), update_digest(&[vec![-0.0]]));
    }

    #[test]
    fn an_empty_aggregate_keeps_the_identity_except_at_an_anchor() {
        let p = "d".repeat(64);
        assert_eq!(produce(&p, 2, false, &[vec![0.0]], None), Produced { id: p.clone(), link: None });
        let anchored = produce(&p, 4, false, &[vec![0.0]], Some("e".repeat(64)));
        assert_ne!(anchored.id, p);
        assert_eq!(anchored.link.as_ref().map(Link::id), Some(anchored.id.clone()));
        let moved = produce(&p, 2, true, &[vec![0.5]], None);
        assert_ne!(moved.id, p);
    }
}
