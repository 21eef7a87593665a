//! Smoke test of the scale harness (`examples/scale.rs`): a handful of miners on the S3 test
//! server behind a slow link, two windows. The lead publishes, includes honest replay
//! slices (it recomputes some and finds them honest), leaves the cheaters out, and the
//! follower applies its aggregate. Under shared verification every miner is checked.

#[path = "../scale/harness.rs"]
mod harness;
#[path = "../../bistro-train/tests/support/mod.rs"]
mod support;

use std::time::Duration;

/// Run the harness for two windows on the shared one-layer test network (S3 test server
/// behind a 5 ms, 400 Mbit/s link, 1 s blocks); also returns the model's config.
async fn run_small(
    miners: usize,
    validators: usize,
    verifiers_per_miner: u32,
    cheaters: usize,
) -> (harness::ScaleReport, bistro_model::ModelConfig) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("s3")).unwrap();
    let s3 = support::start_s3s_fs(&tmp.path().join("s3")).await;
    let (link, _, _) = support::slow_link(s3, Duration::from_millis(5), 50_000_000, None).await;
    let (_, model) = bistro_train::hparams::write_test_network(tmp.path(), |_| {}).unwrap();
    let opts = harness::ScaleOptions {
        miners,
        windows: 2,
        model: tmp.path().join("model.toml").display().to_string(),
        block: Duration::from_millis(1000),
        dir: tmp.path().join("run"),
        hparams: bistro_train::hparams::HParams { seq_len: 64, verifiers_per_miner, ..Default::default() },
        validators,
        cheaters,
    };
    (harness::run(&opts, s3, link).await.unwrap(), model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_a_small_network() {
    let (r, model) = run_small(6, 1, 0, 2).await;
    eprintln!("{}\n{}", harness::TABLE_HEADER, r.row());
    assert_eq!(r.windows.len(), 2);
    assert!(r.slice_bytes > 0 && r.aggregate_bytes > 0, "{r:?}");
    assert!(model.num_params() > 0);
    for w in &r.windows {
        assert!(w.applied, "the follower applied the lead's aggregate: {w:?}");
        assert!(w.recomputed >= 1, "the lead recomputed a replay miner and found it honest: {w:?}");
        assert_eq!(w.other_excluded, 0, "nothing honest was excluded for a reason other than time: {w:?}");
        // A cheater is never included: caught if recomputed, else left out unverified (it
        // has no honest record).
        assert_eq!(w.cheaters_included, 0, "{w:?}");
        assert_eq!(w.cheaters_caught + w.cheaters_unchecked, 2, "{w:?}");
        assert_eq!(w.included + w.timeouts, 4, "{w:?}");
        assert!(w.lead_publish_ms > 0.0 && w.follow_ms > 0.0);
    }
    assert!(r.peak_rss_mib > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_verification_checks_every_miner_and_catches_every_cheater() {
    let (r, _) = run_small(8, 4, 2, 2).await;
    eprintln!("{}\n{}", harness::SHARED_TABLE_HEADER, r.row());
    assert_eq!(r.windows.len(), 2);
    for w in &r.windows {
        assert!(w.applied, "the follower applied the lead's aggregate: {w:?}");
        // Every miner checked: each honest one included on verdicts or the lead's own
        // recomputation, each cheater caught as dishonest, from the first window on.
        assert_eq!((w.cheaters_caught, w.cheaters_unchecked, w.cheaters_included), (2, 0, 0), "{w:?}");
        assert_eq!(w.vouched + w.recomputed, 6, "{w:?}");
        assert_eq!((w.other_excluded, w.timeouts), (0, 0), "{w:?}");
        // Four validators, r = 2: about 8 * 2 / 4 = 4 miners each (the lead is dealt fewer
        // and audits), never all 8.
        assert_eq!(w.recomputed_by.len(), 4, "{w:?}");
        for n in &w.recomputed_by[..3] {
            assert!(*n <= 6, "a validator that does not decide recomputed {n} of 8: {w:?}");
        }
    }
}
