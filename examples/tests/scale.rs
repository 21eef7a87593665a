//! Smoke test of the scale harness (`examples/scale.rs`): a handful of miners on the S3 test
//! server behind a slow link, two windows. The lead publishes, includes honest replay
//! slices (it recomputes some and finds them honest), and the follower applies its aggregate.

#[path = "../scale/harness.rs"]
mod harness;
#[path = "../../bistro-train/tests/support/mod.rs"]
mod support;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_a_small_network() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("s3")).unwrap();
    let s3 = support::start_s3s_fs(&tmp.path().join("s3")).await;
    let (link, _, _) = support::slow_link(s3, Duration::from_millis(5), 50_000_000, None).await;
    let (_, model) = bistro_train::hparams::write_test_network(tmp.path(), |_| {}).unwrap();
    let opts = harness::ScaleOptions {
        miners: 6,
        windows: 2,
        model: tmp.path().join("model.toml").display().to_string(),
        block: Duration::from_millis(1000),
        dir: tmp.path().join("run"),
        hparams: bistro_train::hparams::HParams { seq_len: 64, ..Default::default() },
        validators: 1,
    };
    let r = harness::run(&opts, s3, link).await.unwrap();
    eprintln!("{}\n{}", harness::TABLE_HEADER, r.row());
    assert_eq!(r.windows.len(), 2);
    assert!(r.slice_bytes > 0 && r.aggregate_bytes > 0, "{r:?}");
    assert!(model.num_params() > 0);
    for w in &r.windows {
        assert!(w.applied, "the follower applied the lead's aggregate: {w:?}");
        assert!(w.recomputed >= 1, "the lead recomputed a replay miner and found it honest: {w:?}");
        assert_eq!(w.other_excluded, 0, "nothing honest was excluded for a reason other than time: {w:?}");
        assert_eq!(w.included + w.timeouts, 6, "{w:?}");
        assert!(w.lead_publish_ms > 0.0 && w.follow_ms > 0.0);
    }
    assert!(r.peak_rss_mib > 0.0);
}
