//! Shared verification, read side: what the assigned verifiers' signed verdicts say of
//! each slice this validator holds, and which verifiers its own recomputations contradict.
//!
//! A verdict counts only when its signer was assigned the miner ([`Assignment`]), it names
//! the same assignment randomness and the sha256 of the very bytes this validator fetched
//! (a miner serving different bytes to different validators gets no verdict on the bytes it
//! did not show the verifier), and the signer has not been caught lying.

use std::collections::{BTreeMap, HashSet};

use bistro_train::sync::WindowSlices;
use bistro_train::verdicts::{MinerVerdict, VerdictSheet};

use crate::assignment::Assignment;
use crate::recompute::MinerResult;

/// Windows during which a validator ignores the verdicts of a verifier one of its own
/// recomputations contradicted.
pub const CONTRADICTED_SKIP: u64 = 64;

/// What the counted verdicts say of one miner's slice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verified {
    /// Verifiers that recomputed it and found it honest, with their `e`.
    pub honest_by: Vec<(String, f64)>,
    /// Verifiers that recomputed it and found it dishonest, with their `e`.
    pub dishonest_by: Vec<(String, f64)>,
    /// Assigned verifiers (but the reader) with no counted verdict on it: no sheet read, no
    /// verdict on it, one on other bytes, or one from an ignored verifier (a verifier that
    /// lost its voice loses its assignments: they fall to the deciding validator).
    pub missing: Vec<String>,
}

impl Verified {
    /// Verifiers disagree.
    pub fn disputed(&self) -> bool {
        !self.honest_by.is_empty() && !self.dishonest_by.is_empty()
    }

    /// Every required verifier delivered a counted verdict, and at least one did.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && !(self.honest_by.is_empty() && self.dishonest_by.is_empty())
    }

    /// Included on verdicts: complete, and every verdict honest.
    pub fn vouched(&self) -> bool {
        self.complete() && self.dishonest_by.is_empty()
    }

    /// Excluded on verdicts: complete, and every verdict dishonest.
    pub fn condemned(&self) -> bool {
        self.complete() && self.honest_by.is_empty()
    }

    /// Neither: verifiers disagree or some did not deliver.
    pub fn unsettled(&self) -> bool {
        !self.vouched() && !self.condemned()
    }
}

/// The counted verdicts of a window, by miner.
pub type VerdictBook = BTreeMap<String, Verified>;

/// The sha256 of every slice this validator downloaded, by miner.
pub fn fetched_digests(ws: &WindowSlices) -> BTreeMap<String, String> {
    ws.peers.iter().filter_map(|p| p.sha256.clone().map(|s| (p.hotkey.clone(), s))).collect()
}

/// Count `sheets` (one per verifier, already signature-checked) against the slices this
/// validator (`me`) fetched (`fetched`, [`fetched_digests`]) under `assignment`, leaving out
/// verifiers in `ignored`. Every fetched miner gets an entry.
pub fn tally(
    fetched: &BTreeMap<String, String>,
    assignment: &Assignment,
    sheets: &[VerdictSheet],
    ignored: &HashSet<String>,
    me: &str,
    tolerance: f64,
) -> VerdictBook {
    let mut book = VerdictBook::new();
    for sheet in sheets {
        if ignored.contains(&sheet.validator) || sheet.assignment != assignment.randomness {
            continue;
        }
        for v in &sheet.verdicts {
            if !counts(v, &sheet.validator, assignment, fetched) {
                continue;
            }
            let entry = book.entry(v.hotkey.clone()).or_default();
            let e = v.e.unwrap_or(f64::NAN);
            if v.honest(tolerance) {
                entry.honest_by.push((sheet.validator.clone(), e));
            } else if v.dishonest(tolerance) {
                entry.dishonest_by.push((sheet.validator.clone(), e));
            }
        }
    }
    for miner in fetched.keys() {
        let entry = book.entry(miner.clone()).or_default();
        let delivered = |v: &String| entry.honest_by.iter().chain(&entry.dishonest_by).any(|(w, _)| w == v);
        entry.missing = assignment.verifiers_of(miner).iter().filter(|v| *v != me && !delivered(v)).cloned().collect();
    }
    book
}

fn counts(v: &MinerVerdict, signer: &str, assignment: &Assignment, fetched: &BTreeMap<String, String>) -> bool {
    assignment.assigned(&v.hotkey, signer) && fetched.get(&v.hotkey).is_some_and(|s| *s == v.sha256)
}

/// Miners the verdicts do not settle (verifiers disagree, or some did not deliver) and that
/// this validator has not recomputed: the deciding validator settles them with its own
/// recomputation.
pub fn to_settle(book: &VerdictBook, results: &[MinerResult]) -> Vec<String> {
    let own: HashSet<&str> = results.iter().filter(|r| r.recomputed).map(|r| r.hotkey.as_str()).collect();
    book.iter().filter(|(m, v)| v.unsettled() && !own.contains(m.as_str())).map(|(m, _)| m.clone()).collect()
}

/// `(verifier, miner)` pairs where this validator's own recomputation of the same bytes
/// says the opposite of a counted verdict: the verifier lied (or computed wrong), and
/// loses its voice here for [`CONTRADICTED_SKIP`] windows.
pub fn contradictions(book: &VerdictBook, results: &[MinerResult], tolerance: f64) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in results.iter().filter(|r| r.recomputed) {
        let Some(v) = book.get(&r.hotkey) else { continue };
        let wrong = if r.e <= tolerance { &v.dishonest_by } else { &v.honest_by };
        out.extend(wrong.iter().map(|(who, _)| (who.clone(), r.hotkey.clone())));
    }
    out
}

/// What [`settle`] ends with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settled {
    /// The verdicts counted again without every verifier caught (the ones `ignored` held
    /// and the ones caught here).
    pub book: VerdictBook,
    /// `(verifier, miner)` pairs this settling contradicted, in the order found (a verifier
    /// named once, by the first miner that caught it).
    pub caught: Vec<(String, String)>,
}

/// What a validator counts a window's verdicts from (the inputs of [`tally`] but the
/// ignored verifiers).
#[derive(Clone, Debug)]
pub struct Ledger {
    /// The sha256 of every slice this validator fetched ([`fetched_digests`]).
    pub fetched: BTreeMap<String, String>,
    /// The window's assignment.
    pub assignment: Assignment,
    /// The verdict sheets read.
    pub sheets: Vec<VerdictSheet>,
    /// This validator's hotkey.
    pub me: String,
    /// `honest_tolerance`.
    pub tolerance: f64,
}

impl Ledger {
    /// The verdicts counted without the verifiers in `ignored` ([`tally`]).
    pub fn tally(&self, ignored: &HashSet<String>) -> VerdictBook {
        tally(&self.fetched, &self.assignment, &self.sheets, ignored, &self.me, self.tolerance)
    }
}

/// Settle a window by recomputation until nothing the verdicts leave open is left untried:
/// recompute (with `recompute`, which may stop short at a budget) every miner
/// [`to_settle`] names that was not tried yet, note the verifiers these recomputations
/// contradict, count the verdicts again without them, and go on while that leaves new
/// miners open. A caught verifier's verdicts stop counting on *every* miner, so a miner it
/// vouched for together with an honest verifier is open again and is recomputed in the
/// next round: one round alone would leave it out as unverified. Ends when a round catches
/// no new verifier (each round ignores at least one more, so there are at most as many
/// rounds as verifiers, plus one) or `recompute` returns nothing for miners still open.
/// `results` gains every recomputation; `ignored` is extended by the verifiers caught.
/// With a `recompute` that returns nothing, this only notes the contradictions the results
/// already hold and counts the verdicts without those verifiers.
pub fn settle<E>(
    ledger: &Ledger,
    ignored: &mut HashSet<String>,
    results: &mut Vec<MinerResult>,
    mut recompute: impl FnMut(&[String]) -> Result<Vec<MinerResult>, E>,
) -> Result<Settled, E> {
    let mut book = ledger.tally(ignored);
    let mut tried: HashSet<String> = HashSet::new();
    let mut caught = Vec::new();
    loop {
        let open: Vec<String> = to_settle(&book, results).into_iter().filter(|m| !tried.contains(m)).collect();
        if !open.is_empty() {
            tried.extend(open.iter().cloned());
            results.extend(recompute(&open)?);
        }
        let fresh: Vec<(String, String)> = contradictions(&book, results, ledger.tolerance)
            .into_iter()
            .filter(|(v, _)| *v != ledger.me && !ignored.contains(v))
            .collect();
        if fresh.is_empty() {
            return Ok(Settled { book, caught });
        }
        for (v, m) in fresh {
            if ignored.insert(v.clone()) {
                caught.push((v, m));
            }
        }
        book = ledger.tally(ignored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sheet(validator: &str, assignment: &str, verdicts: Vec<MinerVerdict>) -> VerdictSheet {
        VerdictSheet::new(3, validator, assignment, verdicts)
    }

    fn v(hotkey: &str, sha: &str, e: f64) -> MinerVerdict {
        MinerVerdict { hotkey: hotkey.into(), sha256: sha.into(), status: "ok".into(), e: Some(e) }
    }

    fn result(hotkey: &str, e: f64) -> MinerResult {
        MinerResult { uid: 0, hotkey: hotkey.into(), status: "ok".into(), r: 0.0, e, recomputed: true }
    }

    /// `n` miners `m0..`, 3 verifiers `v0..v2` drawn two per miner from `seed`, and every
    /// miner's slice fetched with digest `"{m}-sha"`.
    fn window(n: usize, seed: u8) -> (Vec<String>, Vec<String>, Assignment, BTreeMap<String, String>) {
        let miners: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let verifiers: Vec<String> = (0..3).map(|i| format!("v{i}")).collect();
        let a = Assignment::draw(&[seed; 32], &miners, &verifiers, 2);
        let fetched = miners.iter().map(|m| (m.clone(), format!("{m}-sha"))).collect();
        (miners, verifiers, a, fetched)
    }

    #[test]
    fn only_assigned_verdicts_on_the_same_bytes_count_and_liars_are_contradicted() {
        let (miners, verifiers, a, ws) = window(6, 5);
        let (m0, m1) = ("m0", "m1");
        let (x, y) = (&a.verifiers_of(m0)[0], &a.verifiers_of(m0)[1]);
        let outsider = verifiers.iter().find(|w| !a.assigned(m0, w)).unwrap();
        let sheets = vec![
            // x finds m0 honest, y finds it dishonest: disputed.
            sheet(x, &a.randomness, vec![v(m0, "m0-sha", 0.0)]),
            sheet(y, &a.randomness, vec![v(m0, "m0-sha", 0.9)]),
            // An unassigned verifier, other bytes, another draw: none of it counts.
            sheet(outsider, &a.randomness, vec![v(m0, "m0-sha", 0.9)]),
            sheet(&a.verifiers_of(m1)[0], &a.randomness, vec![v(m1, "other-sha", 0.9)]),
            sheet(&a.verifiers_of(m1)[1], &"00".repeat(32), vec![v(m1, "m1-sha", 0.9)]),
        ];
        let book = tally(&ws, &a, &sheets, &HashSet::new(), "reader", 1e-3);
        assert_eq!(book[m0].honest_by, vec![(x.clone(), 0.0)]);
        assert_eq!(book[m0].dishonest_by, vec![(y.clone(), 0.9)]);
        assert!(book[m0].disputed() && book[m0].unsettled());
        assert!(book[m1].honest_by.is_empty() && book[m1].dishonest_by.is_empty());
        assert_eq!(book[m1].missing, a.verifiers_of(m1).to_vec());
        // Every miner without a complete verdict is left to settle (none were recomputed here).
        assert_eq!(to_settle(&book, &[]), miners);
        // Recomputed here and honest: y lied; m0 is no longer to settle.
        let own = [result(m0, 0.0)];
        assert_eq!(contradictions(&book, &own, 1e-3), vec![(y.clone(), m0.to_string())]);
        assert!(!to_settle(&book, &own).contains(&m0.to_string()));
        // Once y is ignored its verdict does not count, and its assignment is not waived:
        // x's verdict alone does not vouch for m0, the deciding validator settles it.
        let book = tally(&ws, &a, &sheets, &HashSet::from([y.clone()]), "reader", 1e-3);
        assert!(!book[m0].vouched() && book[m0].dishonest_by.is_empty() && book[m0].missing == vec![y.clone()]);
        // The reader is never waited for: as y, x's verdict is all there is.
        let book = tally(&ws, &a, &sheets[..1], &HashSet::new(), y, 1e-3);
        assert!(book[m0].vouched());
        // One honest verdict with the other verifier silent: not enough.
        let book = tally(&ws, &a, &sheets[..1], &HashSet::new(), "reader", 1e-3);
        assert!(!book[m0].vouched() && book[m0].missing == vec![y.clone()]);
    }

    #[test]
    fn settling_goes_on_until_a_caught_liars_other_vouchers_are_recomputed() {
        let (miners, verifiers, a, fetched) = window(8, 9);
        // The liar verifies at least two miners (8 miners x 2 / 3 verifiers): the first of
        // them cheats, the others are honest.
        let liar = verifiers[0].clone();
        let theirs: Vec<String> = miners.iter().filter(|m| a.assigned(m, &liar)).cloned().collect();
        assert!(theirs.len() >= 2, "{theirs:?}");
        let cheater = theirs[0].clone();
        let truth = |m: &str| if m == cheater { 0.9 } else { 0.0 };
        // Every verifier tells the truth but the liar, which signs the cheater honest.
        let sheets: Vec<VerdictSheet> = verifiers
            .iter()
            .map(|v| {
                let said = miners
                    .iter()
                    .filter(|m| a.assigned(m, v))
                    .map(|m| self::v(m, &format!("{m}-sha"), if *v == liar { 0.0 } else { truth(m) }))
                    .collect();
                sheet(v, &a.randomness, said)
            })
            .collect();
        let ledger = Ledger {
            fetched: fetched.clone(),
            assignment: a.clone(),
            sheets: sheets.clone(),
            me: "reader".into(),
            tolerance: 1e-3,
        };
        // Before settling: the cheater is disputed, every other miner vouched for.
        let first = tally(&fetched, &a, &sheets, &HashSet::new(), "reader", 1e-3);
        assert_eq!(to_settle(&first, &[]), vec![cheater.clone()]);
        let mut rounds: Vec<Vec<String>> = Vec::new();
        let (mut ignored, mut results) = (HashSet::new(), Vec::new());
        let out = settle(&ledger, &mut ignored, &mut results, |open| {
            rounds.push(open.to_vec());
            Ok::<_, ()>(open.iter().map(|m| result(m, truth(m))).collect())
        })
        .unwrap();
        // Round 1 settles the dispute and catches the liar; its vouching no longer counts,
        // so round 2 recomputes the honest miners it co-verified (one round would have
        // left them unverified: excluded on probation in a first window).
        assert_eq!(out.caught, vec![(liar.clone(), cheater.clone())]);
        assert!(ignored.contains(&liar));
        assert_eq!(rounds.len(), 2, "{rounds:?}");
        assert_eq!(rounds[0], vec![cheater.clone()]);
        assert_eq!(rounds[1], theirs[1..].to_vec());
        for m in &miners {
            let own = results.iter().any(|r| &r.hotkey == m);
            assert!(own || out.book[m].vouched(), "{m}: neither recomputed nor vouched for");
            assert!(!out.book[m].honest_by.iter().any(|(w, _)| *w == liar));
        }
        // A budget that ends before round 2: nothing is recomputed twice, and it ends.
        let (mut ignored, mut results, mut calls) = (HashSet::new(), Vec::new(), 0);
        let out = settle(&ledger, &mut ignored, &mut results, |open| {
            calls += 1;
            Ok::<_, ()>(if calls == 1 { open.iter().map(|m| result(m, truth(m))).collect() } else { Vec::new() })
        })
        .unwrap();
        assert_eq!((calls, results.len(), out.caught.len()), (2, 1, 1));
    }
}
