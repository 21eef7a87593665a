//! A late joiner's checkpoint download: a `small` checkpoint (539 MB of parameters and
//! optimizer state) from a real S3 server (`s3s-fs`) behind a slow link that also breaks
//! once mid-body. A download bound to one 15 s attempt, twice (what peers' reads get), could
//! not finish; the bootstrap path downloads it under a size-scaled limit, resumes from the
//! byte it reached, reports progress, and rebuilds the exact state.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bistro_model::{ModelConfig, Params};
use bistro_train::hparams::HParams;
use bistro_train::public_adam::PublicAdam;
use bistro_train::storage::{BucketOptions, DownloadProgress};
use bistro_train::sync::SyncContext;
use candle_core::Device;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_checkpoint_arrives_through_a_slow_link_that_breaks_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    std::fs::create_dir_all(root.join("ckpt")).unwrap();
    let model = ModelConfig::preset("small").unwrap();
    let h = HParams { model: "small".into(), ..HParams::default() };
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let adam = PublicAdam::zeros(params.specs());
    let want = bistro_train::accepted::state_hash(&params, &adam).unwrap();
    let bytes = bistro_train::state::checkpoint_bytes(&params, &adam, 0, None).unwrap();
    let size = bytes.len() as u64;
    assert!(size > 500_000_000, "{size}");
    std::fs::write(root.join("ckpt").join(bistro_train::protocol::checkpoint_key(0)), &bytes).unwrap();
    drop((bytes, params, adam));

    // 14 MB/s: about 38 s for the whole object, over twice the 15 s a peer read gets per
    // attempt; the link breaks once 40% of it has been sent.
    let s3 = support::start_s3s_fs(&root).await;
    let (proxy, cuts, sent) = support::throttled_proxy(s3, 14_000_000, Some(size * 2 / 5)).await;
    let dir = tempfile::tempdir().unwrap();
    let chain = bistro_chain::devnet::Devnet::open(dir.path(), Duration::from_millis(200)).unwrap();
    let ctx = SyncContext {
        chain: Arc::new(chain),
        netuid: 1,
        hparams_hash: h.hash().unwrap(),
        model_hash: model.hash().unwrap(),
        hparams: h,
        bucket_options: BucketOptions::default(),
        allow_local_buckets: false,
        allow_private_endpoints: true,
        rosters: Default::default(),
    };
    let url = format!("s3://ckpt?endpoint=http://{proxy}&region=us-east-1{}", support::read_params());
    let bucket = ctx.peer_bucket(&url).unwrap();

    let seen: Arc<Mutex<Vec<DownloadProgress>>> = Arc::default();
    let sink = seen.clone();
    bistro_train::storage::set_progress_hook(Some(Arc::new(move |p: &DownloadProgress| {
        sink.lock().unwrap().push(p.clone());
    })));
    let start = Instant::now();
    let rebuilt = ctx.rebuild_from(&bucket, &model, &Device::Cpu, None, 0, |_, _| async { false }).await.unwrap();
    let took = start.elapsed();
    assert_eq!(rebuilt.hash, want, "the state arrived bit for bit");
    assert_eq!((rebuilt.window, rebuilt.checkpoint), (0, 0));
    assert!(took > Duration::from_secs(30), "the link was not slow enough to matter: {took:?}");
    assert_eq!(cuts.load(std::sync::atomic::Ordering::Relaxed), 1, "the link broke once");
    // A resume asks for the rest only (a restart would send the first 40% again).
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < size + size / 20, "{sent} bytes sent for a {size}-byte object");

    let seen = seen.lock().unwrap();
    assert!(seen.len() > 20, "progress was reported as it went: {} reports", seen.len());
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "progress never goes back: a resume continues");
    let last = seen.last().unwrap();
    assert!(last.finished && last.done == size && last.total == size);
    assert_eq!(last.resumes, 1, "one interruption, one resume from the byte reached");
}
