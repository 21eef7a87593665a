//! Peers choose the URLs, endpoints and checkpoints a node reads. Each hostile choice here
//! goes through the real code path (the collector, the peer bucket, the joiner's
//! bootstrap) and ends in a clear, typed rejection: no crash, no request where it must not
//! go, no credential sent, nothing lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_model::{ModelConfig, Params};
use bistro_train::accepted::{self, AcceptedSet, AggregateObject, state_hash};
use bistro_train::hparams::HParams;
use bistro_train::network::attestation::{Attestation, Statement, Verdict, attestation_key};
use bistro_train::node::{Node, NodeConfig};
use bistro_train::public_adam::PublicAdam;
use bistro_train::slices::Rejection;
use bistro_train::storage::{Bucket, BucketOptions, Secret, TransferConfig};
use bistro_train::sync::SyncContext;
use bytes::Bytes;
use candle_core::Device;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quick() -> TransferConfig {
    TransferConfig { attempts: 1, timeout: Duration::from_secs(3), ..Default::default() }
}

fn context(chain: Arc<Devnet>, h: &HParams, model: &ModelConfig, local: bool, private: bool) -> SyncContext {
    SyncContext {
        chain,
        netuid: 1,
        hparams: h.clone(),
        hparams_hash: h.hash().unwrap(),
        model_hash: model.hash().unwrap(),
        bucket_options: BucketOptions {
            access_key_id: Some("OWN-KEY-ID".into()),
            secret_access_key: Some(Secret::new("own-secret-never-sent")),
            transfer: quick(),
        },
        allow_local_buckets: local,
        allow_private_endpoints: private,
        rosters: Default::default(),
    }
}

/// A loopback HTTP server that records every request head and answers each with `answer`.
async fn recording_server(answer: String) -> (String, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, c) = (heads.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (h, answer) = (h.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                h.lock().unwrap().push(String::from_utf8_lossy(&got).into_owned());
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, heads, conns)
}

/// A loopback endpoint that accepts connections and never answers; its `http://` URL.
async fn stalling_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    url
}

const NOT_FOUND: &str = "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: 58\r\n\r\n<Error><Code>NoSuchKey</Code><Message>no</Message></Error>";

fn network(dir: &std::path::Path) -> (Arc<Devnet>, HParams, ModelConfig) {
    let (h, model) = bistro_train::hparams::write_test_network(dir, |_| {}).unwrap();
    let chain = Arc::new(Devnet::open(&dir.join("devnet"), Duration::from_millis(20)).unwrap());
    (chain, h, model)
}

/// A devnet node `name` with a local bucket and state under `dir`, registered with `stake`.
fn node_config(dir: &std::path::Path, h: &HParams, name: &str, stake: u64) -> NodeConfig {
    NodeConfig {
        hparams: h.clone(),
        netuid: 1,
        hotkey: name.to_string(),
        bucket_url: format!("file://{}", dir.join(name).display()),
        bucket_options: BucketOptions::default(),
        state_dir: dir.join(format!("state-{name}")),
        device: Device::Cpu,
        micro_batch_rows: 8,
        auto_register: Some(stake),
        allow_local_buckets: true,
        allow_private_endpoints: true,
    }
}

#[test]
fn file_scheme_case() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    let ctx = context(chain, &h, &model, false, false);
    for url in ["FILE:///etc", "File:///tmp/x", "file:///tmp/x", "MEMORY://x", "/tmp/plain", "relative/dir"] {
        match ctx.peer_bucket(url) {
            Err(Rejection::Download(reason)) => assert!(reason.contains("is local"), "{url}: {reason}"),
            Err(other) => panic!("{url}: unexpected rejection {other}"),
            Ok(_) => panic!("{url} was opened"),
        }
    }
}

#[tokio::test]
async fn endpoint_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    let (url, _, conns) = recording_server(NOT_FOUND.to_string()).await;
    let port = url.rsplit(':').next().unwrap().to_string();
    let ctx = context(chain.clone(), &h, &model, false, false);
    for ep in [
        url.clone(),
        format!("http://localhost:{port}"),
        format!("http://[::1]:{port}"),
        "http://169.254.169.254".into(),
    ] {
        match ctx.peer_bucket(&format!("s3://bkt?endpoint={ep}")) {
            Err(Rejection::Download(reason)) => assert!(reason.contains("internal address"), "{ep}: {reason}"),
            Err(other) => panic!("{ep}: unexpected rejection {other}"),
            Ok(_) => panic!("{ep} was opened"),
        }
    }
    // Through the collector: a peer committing a loopback endpoint is rejected with that
    // reason, and no connection is ever made to it.
    chain.ensure_registered(1, "ssrf-peer", 0).await.unwrap();
    chain.set_commitment(1, "ssrf-peer", &format!("s3://bkt?endpoint={url}")).await.unwrap();
    let w = h.window_of(chain.block_number().await.unwrap());
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let ws = ctx.collect(&params, "parent", w, "me").await.unwrap();
    let peer = ws.peers.iter().find(|p| p.hotkey == "ssrf-peer").expect("listed");
    assert!(
        matches!(&peer.outcome, Err(Rejection::Download(r)) if r.contains("internal address")),
        "{:?}",
        peer.outcome
    );
    assert_eq!(conns.load(Ordering::SeqCst), 0, "a connection reached the internal endpoint");
    // A name is checked by the client's own resolver when it connects.
    let name: reqwest::dns::Name = "localhost".parse().unwrap();
    let r = reqwest::dns::Resolve::resolve(&bistro_train::endpoint::GuardedResolver, name).await;
    assert!(r.is_err_and(|e| e.to_string().contains("internal address")));
}

/// Red team 3, F12: `region=` carried an IP-literal host through the URL's userinfo into
/// the host object_store builds (`https://b.s3.x@127.0.0.1:PORT/...`), past the endpoint
/// check. Every component of a peer's URL is now validated before a client exists.
#[tokio::test]
async fn f12_no_url_component_reaches_an_internal_host() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    let (url, _, conns) = recording_server(NOT_FOUND.to_string()).await;
    let port = url.rsplit(':').next().unwrap().to_string();
    let ctx = context(chain, &h, &model, false, false);
    for bad in [
        format!("s3://bkt?region=x%40127.0.0.1%3A{port}%2F"),
        format!("s3://bkt?region=x&endpoint=http://u:p@127.0.0.1:{port}"),
        format!("s3://bkt?endpoint=http://8.8.8.8&proxy=http://127.0.0.1:{port}"),
        format!("s3://u@bkt?endpoint=http://127.0.0.1:{port}"),
    ] {
        match ctx.peer_bucket(&bad) {
            Err(Rejection::Download(reason)) => assert!(reason.contains("refused"), "{bad}: {reason}"),
            Err(other) => panic!("{bad}: unexpected rejection {other}"),
            Ok(_) => panic!("{bad} was opened"),
        }
    }
    assert_eq!(conns.load(Ordering::SeqCst), 0, "a connection reached the internal endpoint");
}

/// Red team 3, F4: with 8 downloads at a time, 8 stalling endpoints at the lowest uids held
/// every slot for the whole budget and every peer after them timed out. Every download now
/// starts at once: the stallers cost only their own downloads.
#[tokio::test]
async fn f4_stalling_peers_at_low_uids_do_not_starve_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    let url = stalling_endpoint().await;
    for i in 0..8 {
        let hk = format!("stall-{i}");
        chain.ensure_registered(1, &hk, 0).await.unwrap();
        chain.set_commitment(1, &hk, &format!("s3://stall{i}?endpoint={url}")).await.unwrap();
    }
    chain.ensure_registered(1, "after-them", 0).await.unwrap();
    chain.set_commitment(1, "after-them", "memory://f4-after-them").await.unwrap();
    let ctx = context(chain.clone(), &h, &model, true, true);
    let w = h.window_of(chain.block_number().await.unwrap());
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let b = Bucket::open("memory://f4-after-them", &BucketOptions::default()).unwrap();
    b.put(&bistro_train::protocol::slice_key(w, "after-them"), Bytes::from_static(b"not a slice")).await.unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let started = Instant::now();
    let ws = ctx.collect(&params, "parent", w, "me").await.unwrap();
    let took = started.elapsed();
    let outcome = |hk: &str| ws.peers.iter().find(|p| p.hotkey == hk).map(|p| p.outcome.clone());
    let last = outcome("after-them");
    assert!(matches!(last, Some(Err(Rejection::Malformed(_)))), "the peer after the stallers: {last:?}");
    for i in 0..8 {
        let o = outcome(&format!("stall-{i}"));
        assert!(matches!(o, Some(Err(Rejection::Timeout { .. }))), "stall-{i}: {o:?}");
    }
    assert!(took < Duration::from_millis(h.collect_budget_ms) + Duration::from_secs(2), "collection took {took:?}");
}

/// Red team 3, F3: a lead whose endpoint stalls instead of answering 404 held every
/// follower for two 15 s attempts per poll, so the network stopped while it lasted. Every
/// fetch now runs under the window's cut-off: the stall costs this window's wait, no more.
#[tokio::test]
async fn f3_a_stalling_lead_costs_at_most_the_window_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (chain, h, _model) = network(dir);
    let mut node = Node::join(node_config(dir, &h, "follower", 0), chain.clone(), "").await.unwrap();
    // Then the lead's endpoint starts to stall.
    let url = stalling_endpoint().await;
    chain.ensure_registered(1, "stalling-lead", 5000).await.unwrap();
    chain.set_commitment(1, "stalling-lead", &format!("s3://lead?endpoint={url}")).await.unwrap();
    let w = node.window;
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let out = node.follow(bistro_train::node::Pace::Live, &stop).await.unwrap();
    let took = started.elapsed();
    assert!(matches!(out, bistro_train::node::Followed::NoUpdate { .. }), "{out:?}");
    let wait =
        Duration::from_millis(h.aggregate_wait_ms + h.fallback_wait_ms) + Duration::from_secs(h.upload_grace_secs);
    assert!(
        took < wait + Duration::from_secs(3),
        "following a stalling lead took {took:?} (the window's wait is {wait:?})"
    );
    assert_eq!(node.window, w + 1, "the node moved on to the next window");
}

/// Red team 3, F7: the validator decided it led by stake alone while followers skipped
/// validators without a committed bucket, so a top-stake permit holder that does not run
/// BISTRO left the network without a lead. One rule now: the first validator by stake
/// among those with a usable commitment.
#[tokio::test]
async fn f7_a_permit_holder_without_a_bucket_does_not_lead() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (chain, h, _model) = network(dir);
    let node = Node::join(node_config(dir, &h, "small-validator", 1000), chain.clone(), "").await.unwrap();
    chain.ensure_registered(1, "passive-delegate", 5000).await.unwrap();
    // Every role reads a window's lead at its seed block (F11).
    let seed_of = |w: u64| h.first_block(w + 1);
    let w1 = node.chain_window().await.unwrap();
    chain.wait_for_block(seed_of(w1), Duration::from_secs(30)).await.unwrap();
    assert_eq!(node.lead(w1).await.unwrap().as_deref(), Some("small-validator"));
    // Once the delegate commits a bucket it can serve, it leads the windows whose seed
    // block comes after; the windows before keep their lead.
    chain.set_commitment(1, "passive-delegate", "memory://passive-delegate").await.unwrap();
    let w2 = node.chain_window().await.unwrap() + 1;
    chain.wait_for_block(seed_of(w2), Duration::from_secs(30)).await.unwrap();
    assert_eq!(node.lead(w2).await.unwrap().as_deref(), Some("passive-delegate"));
    assert_eq!(node.lead(w1).await.unwrap().as_deref(), Some("small-validator"));
}

/// Red team 3, F8: a publisher listing thousands of checkpoints kept a repairing or
/// bootstrapping node downloading each of them. A rebuild now tries the newest
/// `REPAIR_CHECKPOINTS` and never replays genesis across deleted aggregates.
#[tokio::test]
async fn f8_a_rebuild_tries_a_few_checkpoints_at_most() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    // A bucket listing 40 checkpoints; every object it serves is that listing (not a checkpoint).
    let contents: String = (0..40)
        .map(|i| {
            format!(
                "<Contents><Key>checkpoint-{i}.safetensors</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
                 <ETag>\"e{i}\"</ETag><Size>10</Size></Contents>"
            )
        })
        .collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>bkt</Name><Prefix>checkpoint-</Prefix>\
         <KeyCount>40</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
    );
    let answer =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let (url, heads, _) = recording_server(answer).await;
    let ctx = context(chain, &h, &model, false, true);
    let bucket = ctx.peer_bucket(&format!("s3://bkt?endpoint={url}")).unwrap();
    let r = ctx.rebuild_from(&bucket, &model, &Device::Cpu, Some(1000), 1000, |_, _| async { false }).await;
    assert!(r.is_err(), "nothing here is a usable checkpoint");
    let gets = heads
        .lock()
        .unwrap()
        .iter()
        .filter(|head| head.starts_with("GET /bkt/checkpoint-") || head.starts_with("GET /bkt/aggregate-"))
        .count();
    assert!(
        (1..=2 * bistro_train::protocol::REPAIR_CHECKPOINTS).contains(&gets) && gets < 10,
        "{gets} object downloads for a rebuild: {:?}",
        heads.lock().unwrap().iter().map(|h| h.lines().next().unwrap_or("").to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn redirects_are_never_followed() {
    // Internal endpoints allowed here (both servers are on loopback): the point is that the
    // redirect itself is refused, so the second server never sees a request.
    let (target, _, target_conns) = recording_server(NOT_FOUND.to_string()).await;
    let redirect = format!("HTTP/1.1 302 Found\r\nLocation: {target}/bkt/key\r\nContent-Length: 0\r\n\r\n");
    let (url, _, _) = recording_server(redirect).await;
    let bucket = Bucket::open_peer(&format!("s3://bkt?endpoint={url}"), &quick(), true).unwrap();
    let e = bucket.get("key", 1000).await.unwrap_err();
    assert!(!e.to_string().is_empty());
    assert_eq!(target_conns.load(Ordering::SeqCst), 0, "the redirect was followed");
}

#[tokio::test]
async fn no_foreign_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    let (url, heads, _) = recording_server(NOT_FOUND.to_string()).await;
    // One peer publishes no read key (public bucket), one publishes a read-only key.
    chain.ensure_registered(1, "public-peer", 0).await.unwrap();
    chain.set_commitment(1, "public-peer", &format!("s3://pub?endpoint={url}")).await.unwrap();
    chain.ensure_registered(1, "keyed-peer", 0).await.unwrap();
    chain
        .set_commitment(
            1,
            "keyed-peer",
            &format!("s3://keyed?endpoint={url}&read_key=READER-KEY&read_secret=public-read"),
        )
        .await
        .unwrap();
    let ctx = context(chain.clone(), &h, &model, false, true);
    let w = h.window_of(chain.block_number().await.unwrap());
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let ws = ctx.collect(&params, "parent", w, "me").await.unwrap();
    for p in &ws.peers {
        assert_eq!(p.outcome, Err(Rejection::Missing), "{}", p.hotkey);
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert!(!head.contains("OWN-KEY-ID"), "own key id sent to a peer:\n{head}");
        assert!(!head.contains("own-secret-never-sent"), "own secret sent to a peer:\n{head}");
        let auth = head.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:"));
        if head.contains("/pub/") {
            assert!(auth.is_none(), "a public bucket was read with a signature:\n{head}");
        } else {
            assert!(auth.is_some_and(|a| a.contains("Credential=READER-KEY/")), "published key not used:\n{head}");
        }
    }
    // Debug output never shows the secret.
    let shown = format!("{:?}", ctx.bucket_options);
    assert!(!shown.contains("own-secret-never-sent") && shown.contains("redacted"), "{shown}");
}

#[tokio::test]
async fn permit_holders_that_upload_are_miners() {
    let tmp = tempfile::tempdir().unwrap();
    let (chain, h, model) = network(tmp.path());
    // Someone staked to a competitor's hotkey: it holds a permit, yet it uploads slices.
    for (hk, stake) in [("staked-miner", 500u64), ("quiet-validator", 800)] {
        chain.ensure_registered(1, hk, stake).await.unwrap();
        chain.set_commitment(1, hk, &format!("memory://permits-{hk}")).await.unwrap();
    }
    let ctx = context(chain.clone(), &h, &model, true, true);
    let w = h.window_of(chain.block_number().await.unwrap());
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let params = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let b = Bucket::open("memory://permits-staked-miner", &BucketOptions::default()).unwrap();
    b.put(&bistro_train::protocol::slice_key(w, "staked-miner"), Bytes::from_static(b"not a slice")).await.unwrap();
    let ws = ctx.collect(&params, "parent", w, "me").await.unwrap();
    let listed: Vec<&str> = ws.peers.iter().map(|p| p.hotkey.as_str()).collect();
    assert_eq!(listed, vec!["staked-miner"], "a permit holder that uploads is a miner; one that does not is not");
}

#[tokio::test]
async fn f2_a_checkpoint_needs_a_stake_majority_of_attestations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (chain, h, model) = network(dir);
    // A validator whose bucket holds a checkpoint from the far future and an unvouched,
    // tampered one.
    chain.ensure_registered(1, "evil-validator", 5000).await.unwrap();
    let vdir = dir.join("evil-bucket");
    let vbucket = Bucket::open(&format!("file://{}", vdir.display()), &BucketOptions::default()).unwrap();
    chain.set_commitment(1, "evil-validator", vbucket.url()).await.unwrap();
    let genesis = Params::genesis(&model, h.genesis_seed, &Device::Cpu).unwrap();
    let adam = PublicAdam::zeros(genesis.specs());
    let future = bistro_train::state::checkpoint_bytes(&genesis, &adam, u64::MAX, None).unwrap();
    vbucket.put(&bistro_train::protocol::checkpoint_key(u64::MAX), Bytes::from(future)).await.unwrap();
    let tampered = genesis.deep_clone().unwrap();
    tampered.scatter(0, &[0, 1, 2], &[9.0, 9.0, 9.0]).unwrap();
    let bytes = bistro_train::state::checkpoint_bytes(&tampered, &adam, 1, None).unwrap();
    vbucket.put(&bistro_train::protocol::checkpoint_key(1), Bytes::from(bytes)).await.unwrap();

    let cfg = |name: &str| node_config(dir, &h, name, 0);
    let start = Instant::now();
    let node = Node::join(cfg("joiner"), chain.clone(), "").await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(20), "the joiner waited on a peer's window number");
    assert_eq!(node.window, 0);
    assert!(node.origin.starts_with("genesis"), "{}", node.origin);
    assert_eq!(node.state_hash, state_hash(&genesis, &adam).unwrap());

    // Red team 3, F2: a checkpoint its own publisher's history vouches for (aggregate-2
    // names it as parent) replaced the whole model of every joiner. It now needs the
    // attestations of a stake majority of the validators as the state after window 1.
    let w = 2;
    chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(10)).await.unwrap();
    let good = genesis.deep_clone().unwrap();
    good.scatter(0, &[5], &[0.25]).unwrap();
    let mut good_adam = adam.clone();
    good_adam.t[0][5] = 1;
    good_adam.v[0][5] = 1e-6;
    // The checkpoint names its state by the anchored link of window 1.
    let link = bistro_train::lineage::Link {
        parent: state_hash(&genesis, &adam).unwrap(),
        window: w - 1,
        update: "b".repeat(64),
        full: Some(state_hash(&good, &good_adam).unwrap()),
    };
    let hash = link.id();
    vbucket
        .put(
            &bistro_train::protocol::checkpoint_key(w),
            Bytes::from(bistro_train::state::checkpoint_bytes(&good, &good_adam, w, Some(&link)).unwrap()),
        )
        .await
        .unwrap();
    let idx = node.ctx.indices(&good, w).await.unwrap();
    let zeros: Vec<Vec<f32>> = idx.lengths().into_iter().map(|n| vec![0.0; n]).collect();
    let obj = AggregateObject {
        set: AcceptedSet {
            window: w,
            lead: "evil-validator".into(),
            parent: hash.clone(),
            state: hash.clone(),
            full: None,
            included: vec![],
            excluded: vec![],
            scored: 0,
            record_clip: 0.0,
        },
        values: zeros,
    };
    let expect = node.ctx.aggregate_expectation(&good, &idx, w);
    vbucket
        .put(&bistro_train::protocol::aggregate_key(w), Bytes::from(accepted::encode(&expect, &obj).unwrap()))
        .await
        .unwrap();
    // Its own signed attestation of that state, and an honest validator with more stake
    // that attested another state of window 1.
    let attest = |who: &str, state: &str| {
        let a = Attestation::new(
            1,
            who,
            vec![Statement {
                publisher: "evil-validator".into(),
                aggregate: "a".repeat(64),
                parent: state_hash(&genesis, &adam).unwrap(),
                state: state.to_string(),
                verdict: Verdict::Attest,
                reason: String::new(),
            }],
        );
        let sig = chain.sign(who, &a.signing_bytes()).unwrap();
        Bytes::from(a.with_signature(&sig).encode())
    };
    vbucket.put(&attestation_key(1), attest("evil-validator", &hash)).await.unwrap();
    chain.ensure_registered(1, "honest-validator", 6000).await.unwrap();
    let hbucket = Bucket::open("memory://f2-honest-validator", &BucketOptions::default()).unwrap();
    chain.set_commitment(1, "honest-validator", hbucket.url()).await.unwrap();
    hbucket.put(&attestation_key(1), attest("honest-validator", &"c".repeat(64))).await.unwrap();
    let node = Node::join(cfg("joiner-2"), chain.clone(), "").await.unwrap();
    assert_eq!(node.window, 0, "a checkpoint attested by 5000 of 11000 stake was used: {}", node.origin);
    assert!(node.origin.starts_with("genesis"), "{}", node.origin);
    // A forged attestation in the honest validator's bucket (signed by the evil key) does
    // not count either.
    let mut forged: Attestation = serde_json::from_slice(&attest("evil-validator", &hash)).unwrap();
    forged.validator = "honest-validator".into();
    hbucket.put(&attestation_key(1), Bytes::from(forged.encode())).await.unwrap();
    let node = Node::join(cfg("joiner-3"), chain.clone(), "").await.unwrap();
    assert_eq!(node.window, 0, "a forged attestation counted: {}", node.origin);
    // Once the honest validator attests the same state, the checkpoint is used.
    hbucket.put(&attestation_key(1), attest("honest-validator", &hash)).await.unwrap();
    let node = Node::join(cfg("joiner-4"), chain.clone(), "").await.unwrap();
    assert_eq!(node.window, w, "{}", node.origin);
    assert!(node.origin.contains("verified checkpoint of window 2"), "{}", node.origin);
    assert_eq!(node.state_hash, hash);
    assert_eq!(node.adam, good_adam, "the checkpoint's optimizer state is resumed exactly");
    assert_eq!(node.anchor.as_ref(), Some(&link));
    // Other contents under the same attested link: their full hash is not the link's.
    vbucket
        .put(
            &bistro_train::protocol::checkpoint_key(w),
            Bytes::from(bistro_train::state::checkpoint_bytes(&tampered, &adam, w, Some(&link)).unwrap()),
        )
        .await
        .unwrap();
    let node = Node::join(cfg("joiner-5"), chain.clone(), "").await.unwrap();
    assert_eq!(node.window, 0, "a checkpoint whose contents are not its link's was used: {}", node.origin);
}
