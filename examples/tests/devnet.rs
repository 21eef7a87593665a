//! The devnet end to end (small model, few windows): honest miners earn the weight,
//! cheaters earn nothing, poison never moves the model, held-out loss falls, every node
//! holds the same parameters, and the shared model is the centralised reference.

use bistro_examples::devnet::{DevnetOptions, Strategy, run_in_process};

fn options(dir: &std::path::Path) -> DevnetOptions {
    std::fs::create_dir_all(dir).unwrap();
    // The shared test network (a one-layer model), learning fast.
    let (h, _) = bistro_train::hparams::write_test_network(dir, |h| {
        h.pages_per_window = 2;
        h.warmup_windows = 1;
        h.learning_rate = 0.05;
        h.min_learning_rate = 0.05;
    })
    .unwrap();
    let mut o = DevnetOptions::new(&dir.join("run"));
    o.model = h.model.clone();
    o.hparams = h;
    o.compression = 2;
    o.heldout_pages = 4;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_network_learns_and_matches_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 3;
    o.validators = 2;
    o.windows = 6;
    o.late_joiner = true;
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    assert!(r.all_nodes_identical, "nodes diverged");
    for w in &r.windows {
        assert!(
            w.max_abs_diff_vs_reference <= 1e-6,
            "window {}: shared model differs from the reference by {}",
            w.window,
            w.max_abs_diff_vs_reference
        );
        assert_eq!(w.accepted.len(), 3, "window {}: {:?}", w.window, w.rejected);
    }
    let first = r.windows[0].heldout_loss;
    assert!(r.final_heldout_loss < first - 0.05, "held-out loss did not fall: {first} -> {}", r.final_heldout_loss);
    // Six windows cross a checkpoint (every max_history / 2 = 5 windows): a node joining
    // afterwards starts from it, verified through its anchored link and the attestations.
    assert!(r.joiner_origin.starts_with("verified checkpoint"), "the late joiner started from {}", r.joiner_origin);
    assert!(r.joiner_on_lead_chain, "the late joiner's state is not the lead's: {}", r.joiner_origin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_adversary_at_once_no_fork_no_harm_no_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    // Three hostile validators outrank every honest one: four honest ones hold the stake
    // majority the trust model needs (8000 against 6600).
    o.validators = 4;
    o.windows = 4;
    o.adversaries = Strategy::CHEATS.to_vec();
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    every_adversary_property_holds(&r);
    let svg = r.svg();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_honest_and_one_poisoner_the_poison_never_moves_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 1;
    o.validators = 1;
    o.windows = 4;
    o.adversaries = vec![Strategy::BoundedPoison, Strategy::Poison];
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    for w in &r.windows {
        assert!(
            w.max_abs_diff_vs_reference <= 1e-6,
            "window {}: the shared model left the honest-only reference by {}",
            w.window,
            w.max_abs_diff_vs_reference
        );
        assert!(!w.accepted.iter().any(|h| h.contains("poison")), "window {}: {:?}", w.window, w.accepted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forked_on_purpose_repairs_itself_within_two_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    o.validators = 2;
    o.windows = 5;
    o.fork_at = Some((1, 1));
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    let first = r.windows[0].window;
    let forked: Vec<usize> = r.windows.iter().map(|w| w.forks).collect();
    assert_eq!(forked[1], 1, "the fork did not happen: {forked:?}");
    assert!(forked[3..].iter().all(|&f| f == 0), "not repaired within two windows: {forked:?} from window {first}");
    assert!(r.forks_detected >= 1 && r.forks_repaired >= 1, "{} / {}", r.forks_detected, r.forks_repaired);
    assert!(r.all_nodes_identical);
}

/// Red team 3, F1 and F2: every node applied whatever the lead published, and any permit
/// holder that pre-published an aggregate won the fallback. A lead publishing a
/// well-formed wrong aggregate (and attesting it) and a thief pre-publishing one now move
/// nothing: the honest validators dispute both, attest the first honest fallback, and every
/// window still gets the honest update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_f2_a_lying_lead_and_a_fallback_thief_move_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    o.validators = 3;
    o.windows = 4;
    o.adversaries = vec![Strategy::LyingLead, Strategy::FallbackThief];
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    assert!(r.all_nodes_identical, "honest nodes diverged");
    for w in &r.windows {
        assert_eq!(w.rogue_applied, 0, "window {}: a hostile aggregate was applied", w.window);
        assert!(w.updated, "window {}: no update (the lie stopped the network)", w.window);
        assert!(
            w.max_abs_diff_vs_reference <= 1e-6,
            "window {}: the shared model left the honest-only reference by {}",
            w.window,
            w.max_abs_diff_vs_reference
        );
    }
}

/// A lead whose aggregate names a parent no honest node holds made every honest validator
/// fall silent (each took itself for the one off the state), so no window had an update.
/// They now offer fallbacks, and the honest one is applied in the same window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_a_lead_naming_a_bogus_parent_stops_no_window() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    o.validators = 3;
    o.windows = 3;
    o.adversaries = vec![Strategy::ForkingLead];
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    assert!(r.all_nodes_identical, "honest nodes diverged");
    for w in &r.windows {
        assert_eq!(w.rogue_applied, 0, "window {}: a hostile aggregate was applied", w.window);
        assert!(w.updated, "window {}: no update", w.window);
        assert_eq!(w.forks, 0, "window {}: {} honest nodes forked", w.window, w.forks);
    }
}

/// Red team 3, F5: an honest miner that missed one aggregate trained on the wrong state
/// and was scored as a cheater by every validator. Its slice now names its parent state,
/// is rejected as `stale-state` without penalty, and the miner repairs and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_a_miner_that_missed_an_aggregate_is_never_penalised() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    o.validators = 1;
    o.windows = 6;
    o.adversaries = vec![Strategy::ForkVictim];
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    let victim = |w: &bistro_examples::devnet::WindowReport| {
        w.miners.iter().find(|m| m.strategy == Strategy::ForkVictim).cloned()
    };
    let statuses: Vec<String> = r.windows.iter().filter_map(victim).map(|m| m.status).collect();
    assert!(statuses.iter().any(|s| s == "stale-state"), "the victim never uploaded on a stale state: {statuses:?}");
    for m in r.windows.iter().filter_map(victim) {
        assert!(
            m.status == "stale-state" || (m.status == "ok" && m.e <= o.hparams.honest_tolerance),
            "the victim was judged {} (e = {})",
            m.status,
            m.e
        );
    }
    assert_eq!(r.windows.last().and_then(victim).map(|m| m.status).as_deref(), Some("ok"), "it did not recover");
    let honest: Vec<f64> =
        r.shares.iter().filter(|(h, _)| r.strategies[*h] == Strategy::Honest).map(|(_, s)| *s).collect();
    let victim_share = r.shares.iter().find(|(h, _)| r.strategies[*h] == Strategy::ForkVictim).map(|(_, s)| *s);
    let mean = honest.iter().sum::<f64>() / honest.len() as f64;
    assert!(victim_share.is_some_and(|v| v > 0.5 * mean), "victim share {victim_share:?}, honest mean {mean}");
}

/// What `--adversaries all` must show on any run: no fork, both honest miners trained, no
/// hostile validator's aggregate applied, nothing destructive included (but the honest
/// windows of sample-aware and patient), no harm to the held-out loss, no weight to the
/// destructive, and no backdoor.
fn every_adversary_property_holds(r: &bistro_examples::devnet::Report) {
    assert!(r.all_nodes_identical, "honest nodes diverged");
    for w in &r.windows {
        assert_eq!(w.forks, 0, "window {}: {} honest node(s) forked", w.window, w.forks);
        assert_eq!(w.honest_trained, 2, "window {}: an honest miner did not train", w.window);
        assert_eq!(w.rogue_applied, 0, "window {}: honest nodes applied a hostile validator's aggregate", w.window);
        for hk in &w.accepted {
            let s = r.strategies[hk];
            // A sample-aware miner is honest in even windows, a patient one until an accepted
            // set shows it recomputed: only then may they be included.
            let honest_now = w.honest_now.contains(hk);
            assert!(!s.destructive() || honest_now, "window {}: {hk} ({}) was included", w.window, s.name());
        }
    }
    // No harm: the shared model is no worse than 2 % above the honest-only reference (the
    // inclusions are checked one by one above; this catches harm that slips past them). It
    // differs either way: it also includes split-view's honest slice and the honest windows
    // of sample-aware and patient, which the reference (the two honest miners only) leaves
    // out, and under the public AdamW every drawn coordinate moves by about the learning
    // rate whatever the gradient's size, so other honest slices give another path: up to
    // 2 % lower, and a fresh-clone CI run (windows 533-536, nothing dishonest included)
    // ended 1.56 % above. A poisoned or biased update moves it far more.
    let (last, reference) = (r.final_heldout_loss, r.final_reference_loss);
    assert!(
        last <= 1.02 * reference,
        "held-out loss {last} is more than 2% above the honest-only reference {reference}"
    );
    for (h, s) in &r.shares {
        if r.strategies[h].destructive() {
            assert!(*s < 0.01, "{h} holds {s:.4} of the weight");
        }
    }
    let honest = r.honest_share();
    assert!(
        honest > 0.95 * (honest + r.destructive_share()),
        "honest miners hold {honest:.4}, destructive {:.4}",
        r.destructive_share()
    );
    // The backdoor never landed: it was never included (above), and its trigger loss is
    // nearer the honest-only model's than the counterfactual's that included the backdoor
    // every window (the run measures what an implanted backdoor looks like here). The
    // shared model legitimately learns faster than the two-miner reference (it also
    // includes split-view's, fork-victim's and the honest windows' slices), which lowers
    // the trigger loss too: a fresh-clone CI run (windows 525-528) ended 3.7 % below the
    // reference on the trigger and 1.9 % below on held-out text, with nothing destructive
    // included; a fixed ratio against the reference alone failed on that.
    let (b, br, bi) = (r.backdoor_loss.unwrap(), r.backdoor_reference_loss.unwrap(), r.backdoor_included_loss.unwrap());
    assert!(bi < br, "the counterfactual backdoor did not lower the trigger loss: {bi} vs {br}");
    assert!(
        br - b < 0.5 * (br - bi),
        "the backdoor's trigger loss fell: shared {b}, honest-only {br}, had it been included {bi}"
    );
}

/// Shared verification (issue 29): 8 validators (4 honest, the 3 hostile ones of `all`
/// and a lying verifier), r = 2. Every miner's slice goes to two verifiers drawn after the
/// deadline; each validator recomputes its share, the lead also its audits and whatever
/// the verdicts leave open (a verifier that disagrees, stalls or lost its voice). The
/// lying verifier, which signs its cheaters honest, is caught within the run; no honest
/// miner is left out; every property of `all` holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_verification_with_8_validators_and_r_2() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.hparams.verifiers_per_miner = 2;
    o.miners = 2;
    o.validators = 4;
    o.windows = 4;
    o.adversaries = Strategy::CHEATS.iter().copied().chain([Strategy::LyingVerifier]).collect();
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    let validators = 4 + o.adversaries.iter().filter(|s| s.is_validator()).count();
    assert_eq!(validators, 8);
    let first = r.windows[0].window;
    for w in &r.windows {
        eprintln!(
            "window {}: {} valid slices, assigned {:?}, recomputed per honest validator {:?} (lead: {:?}), caught {:?}",
            w.window, w.valid_slices, w.assigned, w.recomputed, w.deciding, w.contradicted
        );
        // A validator that does not decide recomputes its share only (about N r / V of the
        // N miners: `assignment.rs` tests the deal), against every valid slice without
        // sharing; the one that decides adds its audits and what the verdicts left open.
        let roster: usize = w.assigned.iter().sum::<usize>() * validators / (2 * w.assigned.len());
        for (i, (n, share)) in w.recomputed.iter().zip(&w.assigned).enumerate() {
            assert!(
                *share <= (roster * 2).div_ceil(validators) + 1,
                "window {}: validator {i} assigned {share}",
                w.window
            );
            if Some(i) != w.deciding {
                assert!(n <= share, "window {}: validator {i} recomputed {n} > its share {share}", w.window);
            }
        }
        // No honest miner is left out, in any window. (Until the settling went round by
        // round, a lead whose recomputation caught the liar stopped counting the liar's
        // verdicts but did not recompute the honest miners the liar had vouched for with
        // an honest verifier: about one run in six left one out as `probation` in the
        // window the liar was caught.)
        for (hk, s) in &r.strategies {
            if *s == Strategy::Honest {
                assert!(w.accepted.contains(hk), "window {}: honest {hk} excluded: {:?}", w.window, w.rejected);
            }
        }
    }
    // The lying verifier lies in every window; an honest validator catches it when one of
    // its recomputations, share or settled, covers a lie. In the first windows the lead is
    // hostile, so only co-verifiers' shares can, and the liar's partners may all be hostile
    // validators: usually within two windows, but one local run took longer, so the test
    // asks for it within the run.
    assert!(
        r.windows.iter().any(|w| w.contradicted.iter().any(|v| v.contains("lying-verifier"))),
        "windows {first}-{}: the lying verifier was not caught",
        first + r.windows.len() as u64 - 1
    );
    every_adversary_property_holds(&r);
}
