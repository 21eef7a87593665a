//! The miner survives faults: its bucket is unreachable for a while (it logs, retries and
//! carries on), the chain state becomes unreadable for a while (it retries), and a peer
//! uploads corrupt slices (never read: miners follow the validators' accepted set). None
//! of it stops the miner.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_train::miner::{Miner, MinerConfig, MinerEvent};
use bistro_train::node::Followed;
use bistro_train::storage::{BucketOptions, TransferConfig};
use candle_core::Device;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miner_carries_on_through_bucket_chain_and_peer_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (h, _) = bistro_train::hparams::write_test_network(&dir, |_| {}).unwrap();
    let chain = Arc::new(Devnet::open(&dir.join("devnet"), Duration::from_millis(1000)).unwrap());

    // A peer that uploads garbage for the next windows.
    chain.ensure_registered(1, "evil", 0).await.unwrap();
    let evil_dir = dir.join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    chain.set_commitment(1, "evil", &format!("file://{}", evil_dir.display())).await.unwrap();
    let now_w = h.window_of(chain.block_number().await.unwrap());
    for w in now_w..now_w + 40 {
        std::fs::write(evil_dir.join(format!("slice-{w}-evil.safetensors")), b"\x08\0\0\0\0\0\0\0{garbage").unwrap();
    }

    // Own bucket: an S3 endpoint that is down at first.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s3_root = dir.join("s3");
    std::fs::create_dir_all(s3_root.join("miner")).unwrap();
    let cfg = MinerConfig {
        hparams: h.clone(),
        netuid: 1,
        hotkey: "fault-miner".into(),
        bucket_url: format!("s3://miner?endpoint=http://127.0.0.1:{port}"),
        bucket_options: BucketOptions {
            access_key_id: Some(support::ACCESS_KEY.into()),
            secret_access_key: Some(support::SECRET_KEY.into()),
            transfer: TransferConfig {
                attempts: 2,
                backoff: Duration::from_millis(50),
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
        },
        state_dir: dir.join("state"),
        device: Device::Cpu,
        micro_batch_rows: 8,
        auto_register: Some(0),
        allow_local_buckets: true,
        allow_private_endpoints: true,
    };
    let mut miner = Miner::new(cfg, chain.clone()).await.unwrap();
    let events = Arc::new(Mutex::new(Vec::<MinerEvent>::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let log = events.clone();
    miner.on_event(move |e| {
        log.lock().unwrap().push(e.clone());
        let _ = tx.send(e.clone());
    });
    // The fault script: bring S3 up after the first failed upload; after the first
    // successful upload, make the chain state unreadable for 2.5 s.
    let state_file = dir.join("devnet/state.json");
    let script = tokio::spawn(async move {
        let mut s3_up = false;
        let mut outage_done = false;
        while let Some(e) = rx.recv().await {
            match e {
                MinerEvent::UploadFailed { .. } if !s3_up => {
                    support::start_s3s_fs_at(&s3_root, format!("127.0.0.1:{port}").parse().unwrap()).await;
                    s3_up = true;
                }
                MinerEvent::SliceUploaded { .. } if s3_up && !outage_done => {
                    let good = std::fs::read(&state_file).unwrap();
                    std::fs::write(&state_file, b"{ torn").unwrap();
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    std::fs::write(&state_file, good).unwrap();
                    outage_done = true;
                }
                _ => {}
            }
        }
        (s3_up, outage_done)
    });
    let summary = tokio::time::timeout(Duration::from_secs(120), miner.run(Some(5), Arc::new(AtomicBool::new(false))))
        .await
        .expect("miner hung")
        .expect("miner stopped with an error");
    drop(miner);
    let (s3_up, outage_done) = script.await.unwrap();
    let ev = events.lock().unwrap().clone();
    let text: Vec<String> = ev.iter().map(|e| format!("{e:?}")).collect();
    let text = text.join("\n");
    assert_eq!(summary.windows_trained, 5, "{text}");
    assert!(s3_up, "the first upload should have failed:\n{text}");
    assert!(outage_done, "no upload succeeded after the bucket came back:\n{text}");
    let first_fail = ev.iter().position(|e| matches!(e, MinerEvent::UploadFailed { .. })).unwrap();
    assert!(ev[first_fail..].iter().any(|e| matches!(e, MinerEvent::SliceUploaded { .. })), "{text}");
    // No validator runs here: every window is followed as "no update", and the peer's
    // garbage never reaches the miner (under protocol v2 miners read no peer slices).
    let followed = ev
        .iter()
        .filter(
            |e| matches!(e, MinerEvent::Followed(Followed::NoUpdate { reason, .. }) if reason.contains("no validator")),
        )
        .count();
    assert!(followed >= 5, "windows not followed:\n{text}");
    assert!(summary.windows_merged >= 5, "{text}");
}
