//! Verifiers' signed verdicts on miners (shared verification, protocol v5).
//!
//! When the network shares verification (`verifiers_per_miner > 0`), a public draw after
//! the upload deadline assigns every miner of a window to a few validators
//! (`bistro_validate::assignment`). Each recomputes only its share and publishes one
//! [`VerdictSheet`] for the window in its bucket ([`verdicts_key`]): per assigned miner, the
//! digest of the slice it fetched, the outcome (`ok` or a rejection code) and, when it
//! recomputed the gradient, `e`. The sheet is signed with its hotkey (sr25519,
//! [`bistro_chain::keys`]) like an attestation. The deciding validator includes slices on
//! these verdicts; one whose verdict a recomputation contradicts loses its voice.

use bistro_chain::keys;
use serde::{Deserialize, Serialize};

use crate::protocol::{PROTOCOL_VERSION, tags};
use crate::storage::{Bucket, StorageError};

/// The largest verdict sheet a node reads.
pub const MAX_VERDICT_BYTES: u64 = 1 << 20;

/// Most verdicts in one sheet.
pub const MAX_VERDICTS: usize = 4096;

/// Longest status code in a verdict.
const MAX_STATUS_CHARS: usize = 32;

/// Object key of a validator's verdict sheet of `window`.
pub fn verdicts_key(window: u64) -> String {
    format!("verdicts-{window}.json")
}

/// The window of a verdict-sheet key.
pub fn parse_verdicts_key(key: &str) -> Option<u64> {
    key.strip_prefix("verdicts-")?.strip_suffix(".json")?.parse().ok()
}

/// One verifier's verdict on one miner's slice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinerVerdict {
    /// The miner.
    pub hotkey: String,
    /// Hex sha256 of the slice bytes as the verifier fetched them (empty when it had none).
    pub sha256: String,
    /// `ok` when the slice was valid and its gradient recomputed, else the rejection code.
    pub status: String,
    /// `e` of the recomputation (with `ok`).
    pub e: Option<f64>,
}

impl MinerVerdict {
    /// Recomputed and found honest under `tolerance`.
    pub fn honest(&self, tolerance: f64) -> bool {
        self.status == "ok" && self.e.is_some_and(|e| e <= tolerance)
    }

    /// Recomputed and found dishonest under `tolerance`.
    pub fn dishonest(&self, tolerance: f64) -> bool {
        self.status == "ok" && self.e.is_some_and(|e| e > tolerance)
    }
}

/// A verifier's signed verdicts on its assigned miners of one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictSheet {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The window.
    pub window: u64,
    /// The signing validator's hotkey.
    pub validator: String,
    /// Hex of the public randomness the assignment was drawn from.
    pub assignment: String,
    /// The verdicts, one per miner at most.
    pub verdicts: Vec<MinerVerdict>,
    /// Hex sr25519 signature of [`VerdictSheet::signing_bytes`] by `validator`.
    pub signature: String,
}

/// Why a verdict sheet is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerdictError {
    /// Not valid JSON of the expected shape, or over a bound.
    #[error("malformed verdict sheet: {0}")]
    Malformed(String),
    /// About another window, protocol or validator than the bucket it was read from says.
    #[error("verdict sheet names {field} `{found}`, expected `{expected}`")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// What the reader expected.
        expected: String,
        /// What the object says.
        found: String,
    },
    /// The signature is not the validator's.
    #[error("verdict sheet signature is not {0}'s")]
    BadSignature(String),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl VerdictSheet {
    /// Verdicts on `window` by `validator` under the assignment drawn from `assignment`,
    /// not yet signed.
    pub fn new(window: u64, validator: &str, assignment: &str, verdicts: Vec<MinerVerdict>) -> Self {
        VerdictSheet {
            protocol: PROTOCOL_VERSION,
            window,
            validator: validator.to_string(),
            assignment: assignment.to_string(),
            verdicts,
            signature: String::new(),
        }
    }

    /// The bytes that are signed: [`tags::VERDICTS`], the protocol (u32 LE), the window
    /// (u64 LE), the validator and the assignment, the number of verdicts (u64 LE), then per
    /// verdict its hotkey, sha256 and status, and `e` as one presence byte followed (when
    /// present) by its f64 bits (LE); strings are u64-LE length-prefixed.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = tags::VERDICTS.to_vec();
        out.extend(self.protocol.to_le_bytes());
        out.extend(self.window.to_le_bytes());
        put_str(&mut out, &self.validator);
        put_str(&mut out, &self.assignment);
        out.extend((self.verdicts.len() as u64).to_le_bytes());
        for v in &self.verdicts {
            for f in [&v.hotkey, &v.sha256, &v.status] {
                put_str(&mut out, f);
            }
            match v.e {
                Some(e) => {
                    out.push(1);
                    out.extend(e.to_bits().to_le_bytes());
                }
                None => out.push(0),
            }
        }
        out
    }

    /// Set the signature from the signer's 64 bytes over [`Self::signing_bytes`].
    pub fn with_signature(mut self, signature: &[u8]) -> Self {
        self.signature = hex::encode(signature);
        self
    }

    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The verdict on `miner`, if any.
    pub fn on(&self, miner: &str) -> Option<&MinerVerdict> {
        self.verdicts.iter().find(|v| v.hotkey == miner)
    }

    /// Decode and check a sheet read from `validator`'s bucket for `window`: bounded,
    /// well-formed (hex digests, finite non-negative `e`, one verdict per miner), about that
    /// window and validator under this protocol, and signed by the validator.
    pub fn decode(bytes: &[u8], window: u64, validator: &str) -> Result<Self, VerdictError> {
        if bytes.len() as u64 > MAX_VERDICT_BYTES {
            return Err(VerdictError::Malformed(format!("{} bytes > {MAX_VERDICT_BYTES}", bytes.len())));
        }
        let s: VerdictSheet = serde_json::from_slice(bytes).map_err(|e| VerdictError::Malformed(e.to_string()))?;
        let mismatch = |field, expected: String, found: String| VerdictError::Mismatch { field, expected, found };
        if s.protocol != PROTOCOL_VERSION {
            return Err(mismatch("protocol", PROTOCOL_VERSION.to_string(), s.protocol.to_string()));
        }
        if s.window != window {
            return Err(mismatch("window", window.to_string(), s.window.to_string()));
        }
        if s.validator != validator {
            return Err(mismatch("validator", validator.to_string(), s.validator.clone()));
        }
        if s.verdicts.len() > MAX_VERDICTS {
            return Err(VerdictError::Malformed(format!("{} verdicts > {MAX_VERDICTS}", s.verdicts.len())));
        }
        let is_hash = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hash(&s.assignment) {
            return Err(VerdictError::Malformed("the assignment must be a hex block hash".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &s.verdicts {
            if !(v.sha256.is_empty() || is_hash(&v.sha256)) {
                return Err(VerdictError::Malformed(format!("the digest of {} is not hex sha256", v.hotkey)));
            }
            if v.hotkey.len() > 256 || v.status.is_empty() || v.status.chars().count() > MAX_STATUS_CHARS {
                return Err(VerdictError::Malformed("a hotkey or status is too long or empty".into()));
            }
            if v.e.is_some_and(|e| !(e.is_finite() && e >= 0.0)) {
                return Err(VerdictError::Malformed(format!("e of {} is not a finite non-negative number", v.hotkey)));
            }
            if (v.status == "ok") != v.e.is_some() {
                return Err(VerdictError::Malformed(format!("{}: e goes with status ok, and only with it", v.hotkey)));
            }
            if !seen.insert(v.hotkey.as_str()) {
                return Err(VerdictError::Malformed(format!("two verdicts on {}", v.hotkey)));
            }
        }
        let sig = hex::decode(&s.signature).map_err(|_| VerdictError::BadSignature(validator.to_string()))?;
        if !keys::verify(validator, &s.signing_bytes(), &sig) {
            return Err(VerdictError::BadSignature(validator.to_string()));
        }
        Ok(s)
    }
}

/// `validator`'s verdict sheet of `window` from its `bucket`: `Ok(Some)` when valid,
/// `Ok(None)` when not there (yet), `Err` with the reason when unusable or unreadable.
pub async fn fetch(bucket: &Bucket, validator: &str, window: u64) -> Result<Option<VerdictSheet>, String> {
    match bucket.get(&verdicts_key(window), MAX_VERDICT_BYTES).await {
        Ok(f) => VerdictSheet::decode(&f.bytes, window, validator).map(Some).map_err(|e| e.to_string()),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(name: &str, verdicts: Vec<MinerVerdict>) -> VerdictSheet {
        let s = VerdictSheet::new(9, name, &"ab".repeat(32), verdicts);
        let sig = keys::sign(&keys::devnet_keypair(name), &s.signing_bytes());
        s.with_signature(&sig)
    }

    fn ok(hotkey: &str, e: f64) -> MinerVerdict {
        MinerVerdict { hotkey: hotkey.into(), sha256: "cd".repeat(32), status: "ok".into(), e: Some(e) }
    }

    #[test]
    fn a_signed_sheet_round_trips_and_a_changed_one_does_not() {
        let s = signed("v1", vec![ok("m1", 0.0), ok("m2", 0.7)]);
        let back = VerdictSheet::decode(&s.encode(), 9, "v1").unwrap();
        assert_eq!(back, s);
        assert!(back.on("m1").unwrap().honest(1e-3) && back.on("m2").unwrap().dishonest(1e-3));
        // Another window, another signer, or one verdict flipped: refused.
        assert!(matches!(VerdictSheet::decode(&s.encode(), 10, "v1"), Err(VerdictError::Mismatch { .. })));
        assert!(matches!(VerdictSheet::decode(&s.encode(), 9, "v2"), Err(VerdictError::Mismatch { .. })));
        let mut lie = s.clone();
        lie.verdicts[1].e = Some(0.0);
        assert!(matches!(VerdictSheet::decode(&lie.encode(), 9, "v1"), Err(VerdictError::BadSignature(_))));
        // Signed by someone else under v1's name.
        let forged = VerdictSheet { validator: "v1".into(), ..signed("v2", vec![ok("m1", 0.0)]) };
        assert!(matches!(VerdictSheet::decode(&forged.encode(), 9, "v1"), Err(VerdictError::BadSignature(_))));
    }

    #[test]
    fn malformed_sheets_are_refused_with_a_reason() {
        let cases = [
            signed("v1", vec![ok("m1", 0.0), ok("m1", 0.0)]),
            signed("v1", vec![MinerVerdict { e: Some(f64::NAN), ..ok("m1", 0.0) }]),
            signed("v1", vec![MinerVerdict { e: Some(-1.0), ..ok("m1", 0.0) }]),
            signed("v1", vec![MinerVerdict { status: "missing".into(), ..ok("m1", 0.0) }]),
            signed("v1", vec![MinerVerdict { sha256: "zz".into(), ..ok("m1", 0.0) }]),
            signed("v1", vec![MinerVerdict { status: "x".repeat(40), e: None, ..ok("m1", 0.0) }]),
        ];
        for c in cases {
            assert!(matches!(VerdictSheet::decode(&c.encode(), 9, "v1"), Err(VerdictError::Malformed(_))), "{c:?}");
        }
        assert!(VerdictSheet::decode(b"{", 9, "v1").is_err());
        assert!(VerdictSheet::decode(&vec![b' '; MAX_VERDICT_BYTES as usize + 1], 9, "v1").is_err());
        assert_eq!(parse_verdicts_key(&verdicts_key(12)), Some(12));
        assert_eq!(parse_verdicts_key("verdicts-x.json"), None);
    }
}
