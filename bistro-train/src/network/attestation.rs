//! Validators' signed verdicts on aggregates, and the stake quorum a node needs before it
//! applies one.
//!
//! After a window's deadline every validator that collected the window checks the
//! aggregate it would follow (the lead's; a fallback's when the lead's is missing or
//! disputed) against its own collection: the included slices by digest, their norms, the
//! arithmetic, and the inclusion rules as far as its own recomputations tell. It then
//! publishes one [`Attestation`] for the window in its bucket ([`attestation_key`]):
//! statements about one or more aggregates, each `attest` or `dispute` with a reason,
//! signed with its hotkey (sr25519, [`bistro_chain::keys`]). An honest validator attests
//! at most one aggregate per window.
//!
//! A node applies an aggregate only when validators holding more than half of the stake of
//! the *recently publishing* validators (those with an attestation for this window or one
//! of the [`RECENT_WINDOWS`] before it) attest its digest ([`Tally::accepted`]); a lone
//! validator attests for itself. An aggregate disputed by such a majority is rejected and
//! its publisher is skipped as lead for [`DISPUTED_LEAD_SKIP`] windows; a validator whose
//! bucket stalls is skipped for [`STALLED_SKIP`].

use bistro_chain::keys;
use serde::{Deserialize, Serialize};

use crate::protocol::{PROTOCOL_VERSION, tags};

/// Windows before the current one in which a validator's attestation makes it count in
/// the quorum's base ("recently publishing").
pub const RECENT_WINDOWS: u64 = 4;

/// Windows for which a node skips, as lead, a validator whose aggregate a stake majority
/// disputed (a proven liar).
pub const DISPUTED_LEAD_SKIP: u64 = 64;

/// Windows for which a node skips a validator whose bucket did not answer by a cut-off
/// (it may come back: a stall is not a proof of lying).
pub const STALLED_SKIP: u64 = 16;

/// The largest attestation object a node reads.
pub const MAX_ATTESTATION_BYTES: u64 = 64 * 1024;

/// Most statements in one attestation (the lead's, and fallbacks').
pub const MAX_STATEMENTS: usize = 8;

/// Longest reason text in a statement.
const MAX_REASON_CHARS: usize = 512;

/// Object key of a validator's attestation of `window`.
pub fn attestation_key(window: u64) -> String {
    format!("attestation-{window}.json")
}

/// The window of an attestation key.
pub fn parse_attestation_key(key: &str) -> Option<u64> {
    key.strip_prefix("attestation-")?.strip_suffix(".json")?.parse().ok()
}

/// What a validator says of an aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Checked and consistent: apply it.
    Attest,
    /// Checked and wrong (the reason says how): do not apply it.
    Dispute,
}

/// One verdict on one aggregate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Hotkey of the validator whose bucket the aggregate came from.
    pub publisher: String,
    /// Hex sha256 of the aggregate object's bytes.
    pub aggregate: String,
    /// The state it applies to (its `parent`).
    pub parent: String,
    /// The state it produces.
    pub state: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why (a stable code, then details), empty for `attest`.
    pub reason: String,
}

/// A validator's signed statements about one window's aggregates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The window.
    pub window: u64,
    /// The signing validator's hotkey.
    pub validator: String,
    /// The statements.
    pub statements: Vec<Statement>,
    /// Hex sr25519 signature of [`Attestation::signing_bytes`] by `validator`.
    pub signature: String,
}

/// Why an attestation object is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// Not valid JSON of the expected shape, or over a bound.
    #[error("malformed attestation: {0}")]
    Malformed(String),
    /// About another window, protocol or validator than the bucket it was read from says.
    #[error("attestation names {field} `{found}`, expected `{expected}`")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// What the reader expected.
        expected: String,
        /// What the object says.
        found: String,
    },
    /// The signature is not the validator's.
    #[error("attestation signature is not {0}'s")]
    BadSignature(String),
    /// More than one aggregate attested in one window (equivocation).
    #[error("attestation attests {0} aggregates in one window")]
    Equivocation(usize),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Attestation {
    /// Statements about `window` by `validator`, not yet signed.
    pub fn new(window: u64, validator: &str, statements: Vec<Statement>) -> Self {
        Attestation {
            protocol: PROTOCOL_VERSION,
            window,
            validator: validator.to_string(),
            statements,
            signature: String::new(),
        }
    }

    /// The bytes that are signed: [`tags::ATTESTATION`], the protocol (u32 LE), the window
    /// (u64 LE), then every string length-prefixed (u64 LE) and every verdict as one byte
    /// (0 attest, 1 dispute), in field order.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = tags::ATTESTATION.to_vec();
        out.extend(self.protocol.to_le_bytes());
        out.extend(self.window.to_le_bytes());
        put_str(&mut out, &self.validator);
        out.extend((self.statements.len() as u64).to_le_bytes());
        for s in &self.statements {
            for f in [&s.publisher, &s.aggregate, &s.parent, &s.state] {
                put_str(&mut out, f);
            }
            out.push(match s.verdict {
                Verdict::Attest => 0,
                Verdict::Dispute => 1,
            });
            put_str(&mut out, &s.reason);
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
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The one aggregate this attestation attests, if any.
    pub fn attested(&self) -> Option<&Statement> {
        self.statements.iter().find(|s| s.verdict == Verdict::Attest)
    }

    /// Decode and check an attestation read from `validator`'s bucket for `window`:
    /// bounded, well-formed, about that window and validator under this protocol, signed by
    /// the validator, with at most one `attest`.
    pub fn decode(bytes: &[u8], window: u64, validator: &str) -> Result<Self, AttestationError> {
        if bytes.len() as u64 > MAX_ATTESTATION_BYTES {
            return Err(AttestationError::Malformed(format!("{} bytes > {MAX_ATTESTATION_BYTES}", bytes.len())));
        }
        let a: Attestation = serde_json::from_slice(bytes).map_err(|e| AttestationError::Malformed(e.to_string()))?;
        let mismatch = |field, expected: String, found: String| AttestationError::Mismatch { field, expected, found };
        if a.protocol != PROTOCOL_VERSION {
            return Err(mismatch("protocol", PROTOCOL_VERSION.to_string(), a.protocol.to_string()));
        }
        if a.window != window {
            return Err(mismatch("window", window.to_string(), a.window.to_string()));
        }
        if a.validator != validator {
            return Err(mismatch("validator", validator.to_string(), a.validator.clone()));
        }
        if a.statements.len() > MAX_STATEMENTS {
            return Err(AttestationError::Malformed(format!("{} statements > {MAX_STATEMENTS}", a.statements.len())));
        }
        let is_hash = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        for s in &a.statements {
            if !is_hash(&s.aggregate) || !is_hash(&s.parent) || !is_hash(&s.state) {
                return Err(AttestationError::Malformed("aggregate, parent and state must be hex sha256".into()));
            }
            if s.reason.chars().count() > MAX_REASON_CHARS || s.publisher.len() > 256 {
                return Err(AttestationError::Malformed("a reason or publisher is too long".into()));
            }
        }
        let attests = a.statements.iter().filter(|s| s.verdict == Verdict::Attest).count();
        if attests > 1 {
            return Err(AttestationError::Equivocation(attests));
        }
        let sig = hex::decode(&a.signature).map_err(|_| AttestationError::BadSignature(validator.to_string()))?;
        if !keys::verify(validator, &a.signing_bytes(), &sig) {
            return Err(AttestationError::BadSignature(validator.to_string()));
        }
        Ok(a)
    }
}

/// One validator's voice in a quorum: its stake and, when it published one for the window,
/// its attestation.
#[derive(Clone, Debug)]
pub struct Voice {
    /// The validator.
    pub hotkey: String,
    /// Its stake now.
    pub stake: u64,
    /// Its attestation of this window, if read.
    pub attestation: Option<Attestation>,
    /// Whether it counts in the base (attested this window or one of the recent ones).
    pub recent: bool,
    /// Whether its bucket answered by the cut-off.
    pub answered: bool,
}

/// Stake for and against one aggregate among the recently publishing validators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Stake of the recently publishing validators.
    pub base: u64,
    /// Stake attesting.
    pub attested: u64,
    /// Stake disputing.
    pub disputed: u64,
    /// Stake attesting another aggregate of the window (an honest validator attests one).
    pub elsewhere: u64,
    /// Hotkeys attesting.
    pub attesters: Vec<String>,
    /// Hotkeys disputing, with their reasons.
    pub disputes: Vec<(String, String)>,
}

impl Tally {
    /// Count `voices` on the aggregate with digest `aggregate`.
    pub fn count(voices: &[Voice], aggregate: &str) -> Self {
        Self::count_where(voices, |s| s.aggregate == aggregate)
    }

    /// Count `voices` on the statements `pick` selects (for a checkpoint: the statements
    /// whose produced `state` is its hash).
    pub fn count_where(voices: &[Voice], pick: impl Fn(&Statement) -> bool) -> Self {
        let mut t = Tally::default();
        for v in voices.iter().filter(|v| v.recent) {
            t.base += v.stake;
            let Some(a) = &v.attestation else { continue };
            if a.statements.iter().any(|s| pick(s) && s.verdict == Verdict::Attest) {
                t.attested += v.stake;
                t.attesters.push(v.hotkey.clone());
            } else if let Some(s) = a.statements.iter().find(|s| pick(s) && s.verdict == Verdict::Dispute) {
                t.disputed += v.stake;
                t.disputes.push((v.hotkey.clone(), s.reason.clone()));
            } else if a.attested().is_some() {
                t.elsewhere += v.stake;
            }
        }
        t
    }

    /// Attested by more than half of the base's stake.
    pub fn accepted(&self) -> bool {
        self.base > 0 && 2 * u128::from(self.attested) > u128::from(self.base)
    }

    /// Disputed by more than half of the base's stake (what gets a lead skipped).
    pub fn majority_disputed(&self) -> bool {
        self.base > 0 && 2 * u128::from(self.disputed) > u128::from(self.base)
    }

    /// Disputed by more than half of the base's stake, or beyond reach: the stake not yet
    /// heard from cannot make it accepted any more.
    pub fn rejected(&self) -> bool {
        let undecided = self.base.saturating_sub(self.attested + self.disputed + self.elsewhere);
        self.base > 0
            && (self.majority_disputed() || 2 * u128::from(self.attested + undecided) <= u128::from(self.base))
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        let mut s = format!("attested by {} of {} stake", self.attested, self.base);
        if !self.disputes.is_empty() {
            let d: Vec<String> = self.disputes.iter().map(|(h, r)| format!("{h}: {r}")).collect();
            s.push_str(&format!("; disputed by {} stake ({})", self.disputed, d.join("; ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(agg: char, verdict: Verdict) -> Statement {
        Statement {
            publisher: "lead".into(),
            aggregate: agg.to_string().repeat(64),
            parent: "0".repeat(64),
            state: "1".repeat(64),
            verdict,
            reason: String::new(),
        }
    }

    fn signed(window: u64, validator: &str, statements: Vec<Statement>) -> Attestation {
        let a = Attestation::new(window, validator, statements);
        let sig = keys::sign(&keys::devnet_keypair(validator), &a.signing_bytes());
        a.with_signature(&sig)
    }

    #[test]
    fn round_trip_and_every_check() {
        let a = signed(7, "v1", vec![statement('a', Verdict::Attest)]);
        let bytes = a.encode();
        assert_eq!(Attestation::decode(&bytes, 7, "v1").unwrap(), a);
        assert!(matches!(
            Attestation::decode(&bytes, 8, "v1"),
            Err(AttestationError::Mismatch { field: "window", .. })
        ));
        // Read from another validator's bucket: a copy of someone else's attestation.
        assert!(matches!(
            Attestation::decode(&bytes, 7, "v2"),
            Err(AttestationError::Mismatch { field: "validator", .. })
        ));
        // Signed by another key.
        let mut forged = signed(7, "v2", vec![statement('a', Verdict::Attest)]);
        forged.validator = "v1".into();
        assert_eq!(Attestation::decode(&forged.encode(), 7, "v1"), Err(AttestationError::BadSignature("v1".into())));
        // A statement changed after signing.
        let mut changed = a.clone();
        changed.statements[0].aggregate = "b".repeat(64);
        assert!(matches!(Attestation::decode(&changed.encode(), 7, "v1"), Err(AttestationError::BadSignature(_))));
        let two = signed(7, "v1", vec![statement('a', Verdict::Attest), statement('b', Verdict::Attest)]);
        assert_eq!(Attestation::decode(&two.encode(), 7, "v1"), Err(AttestationError::Equivocation(2)));
        assert!(matches!(Attestation::decode(b"{not json", 7, "v1"), Err(AttestationError::Malformed(_))));
        let big = vec![b' '; MAX_ATTESTATION_BYTES as usize + 1];
        assert!(matches!(Attestation::decode(&big, 7, "v1"), Err(AttestationError::Malformed(_))));
        assert_eq!(parse_attestation_key(&attestation_key(12)), Some(12));
    }

    #[test]
    fn quorum_is_a_stake_majority_of_recent_publishers() {
        let voice = |h: &str, stake, a: Option<Attestation>, recent| Voice {
            hotkey: h.into(),
            stake,
            attestation: a,
            recent,
            answered: true,
        };
        let agg = "a".repeat(64);
        // A lying lead with the most stake, three honest validators disputing.
        let voices = vec![
            voice("liar", 1300, Some(signed(1, "liar", vec![statement('a', Verdict::Attest)])), true),
            voice("v1", 1000, Some(signed(1, "v1", vec![statement('a', Verdict::Dispute)])), true),
            voice("v2", 1000, Some(signed(1, "v2", vec![statement('a', Verdict::Dispute)])), true),
            voice("v3", 1000, None, true),
            // Not publishing recently: not in the base.
            voice("gone", 5000, None, false),
        ];
        let t = Tally::count(&voices, &agg);
        assert_eq!((t.base, t.attested, t.disputed), (4300, 1300, 2000));
        assert!(!t.accepted());
        assert!(!t.rejected(), "1300 + v3's 1000 could still be a majority of 4300");
        let mut all = voices.clone();
        all[3].attestation = Some(signed(1, "v3", vec![statement('a', Verdict::Dispute)]));
        let t = Tally::count(&all, &agg);
        assert!(!t.accepted() && t.rejected(), "{t:?}");
        // Beyond reach: v3 attests something else.
        all[3].attestation = Some(signed(1, "v3", vec![statement('b', Verdict::Attest)]));
        let t = Tally::count(&all, &agg);
        assert_eq!(t.disputed, 2000);
        assert!(t.rejected(), "1300 of 4300 with nobody left to hear from");
        // A lone validator attests for itself.
        let lone = vec![voice("v1", 10, Some(signed(1, "v1", vec![statement('a', Verdict::Attest)])), true)];
        assert!(Tally::count(&lone, &agg).accepted());
        // Exactly half is not a majority.
        let half = vec![
            voice("v1", 10, Some(signed(1, "v1", vec![statement('a', Verdict::Attest)])), true),
            voice("v2", 10, None, true),
        ];
        let t = Tally::count(&half, &agg);
        assert!(!t.accepted() && !t.rejected(), "undecided until v2 speaks");
        assert!(!Tally::count(&[], &agg).accepted(), "no base, no quorum");
    }
}
