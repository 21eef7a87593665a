//! Crashes and outages against the real binaries in separate processes, on a real S3
//! server (`s3s-fs`): a validator and two miners are killed with SIGKILL at 20 random
//! moments (mid-step, mid-upload, mid-save, mid-merge: wherever the clock lands) and
//! restarted; the S3 server goes away for a window; the chain becomes unreadable for a
//! window. Every node must keep a loadable state, resume, and end on the lead's chain of
//! accepted sets, with no window's update lost or applied twice.

mod nodes;
#[path = "../../bistro-train/tests/support/mod.rs"]
mod support;

use nodes::{accepted_set, binary, saved_state};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bistro_model::ModelConfig;

struct Proc {
    bin: &'static str,
    hotkey: &'static str,
    extra: Vec<String>,
    child: Option<Child>,
    starts: usize,
}

struct Net {
    dir: PathBuf,
    s3: String,
}

impl Net {
    fn start(&self, p: &mut Proc) {
        let bucket = format!("bucket-{}", p.hotkey);
        std::fs::create_dir_all(self.dir.join("s3").join(&bucket)).expect("bucket dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", p.hotkey)))
            .expect("log");
        let child = Command::new(binary(p.bin))
            .current_dir(&self.dir)
            .args(["--devnet.dir", "devnet", "--devnet.block-ms", "1000", "--hparams", "hparams.toml"])
            .args(["--device", "cpu", "--wallet.hotkey", p.hotkey])
            .args(["--bucket", &format!("s3://{bucket}?endpoint={}{}", self.s3, support::read_params())])
            .args(&p.extra)
            .env("RUST_LOG", "info")
            .env("BISTRO_S3_ACCESS_KEY_ID", support::ACCESS_KEY)
            .env("BISTRO_S3_SECRET_ACCESS_KEY", support::SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        p.child = Some(child);
        p.starts += 1;
    }

    fn kill(&self, p: &mut Proc) {
        if let Some(mut c) = p.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn log(&self, hotkey: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{hotkey}.log"))).unwrap_or_default()
    }
}

/// The lead's published history, checked link by link: each aggregate applies to the state
/// the previous one produced (windows without one leave the state unchanged). Returns the
/// state at the start of each window from the first aggregate on.
fn lead_chain(s3_root: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut state: Option<String> = None;
    for w in 0..200 {
        if let Some(set) = accepted_set(s3_root, "bucket-v0", w) {
            let parent = set["parent"].as_str().unwrap().to_string();
            if let Some(s) = &state {
                assert_eq!(
                    &parent, s,
                    "aggregate of window {w} does not apply to the state before it: the lead's history broke"
                );
            }
            out.push((w, parent));
            state = Some(set["state"].as_str().unwrap().to_string());
            out.push((w + 1, state.clone().unwrap()));
        } else if let Some(s) = &state {
            out.push((w + 1, s.clone()));
        }
    }
    out
}

/// Tiny deterministic PRNG (xorshift) for the chaos schedule.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn setup(dir: &Path) -> ModelConfig {
    let (_, model) = bistro_train::hparams::write_test_network(dir, |h| {
        h.windows_per_weights = 1;
        h.max_history = 4;
    })
    .unwrap();
    std::fs::create_dir_all(dir.join("s3")).unwrap();
    model
}

fn nodes() -> Vec<Proc> {
    let p = |bin, hotkey, extra: &[&str]| Proc {
        bin,
        hotkey,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        child: None,
        starts: 0,
    };
    vec![p("validator", "v0", &["--devnet.stake", "2000"]), p("miner", "m1", &[]), p("miner", "m2", &[])]
}

/// Every node's saved state loads and lies on the lead's chain; returns the windows.
fn check_on_lead_chain(net: &Net, procs: &[Proc], model: &ModelConfig) -> Vec<u64> {
    let chain = lead_chain(&net.dir.join("s3"));
    assert!(chain.len() >= 4, "the lead published almost nothing:\n{}", net.log("v0"));
    // The network trained: several accepted sets included slices and moved the state.
    let moved = (0..200)
        .filter_map(|w| accepted_set(&net.dir.join("s3"), "bucket-v0", w))
        .filter(|s| s["included"].as_array().is_some_and(|a| !a.is_empty()) && s["parent"] != s["state"])
        .count();
    assert!(moved >= 3, "only {moved} accepted sets moved the model:\n{}\n--- m1:\n{}", net.log("v0"), net.log("m1"));
    let mut windows = Vec::new();
    for p in procs {
        let role = if p.bin == "validator" { "validators" } else { "miners" };
        let (w, hash) = saved_state(&net.dir.join(format!(".bistro/{role}/default-{}", p.hotkey)), model);
        let expected = chain.iter().rev().find(|(x, _)| *x == w).map(|(_, h)| h.clone());
        assert_eq!(
            Some(hash),
            expected,
            "{} at window {w} is not on the lead's chain\n{}",
            p.hotkey,
            net.log(p.hotkey)
        );
        windows.push(w);
    }
    windows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_chaos() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let model = setup(&dir);
    let addr = support::start_s3s_fs(&dir.join("s3")).await;
    let net = Net { dir: dir.clone(), s3: format!("http://{addr}") };
    let mut procs = nodes();
    for p in procs.iter_mut() {
        net.start(p);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut rng = Rng(0x5DEECE66D);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2500))).await;
        let i = rng.below(procs.len() as u64) as usize;
        net.kill(&mut procs[i]);
        tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
        net.start(&mut procs[i]);
    }
    // Undisturbed: every node must rejoin the accepted state within two windows.
    let windows_after = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    for p in procs.iter_mut() {
        net.kill(p);
    }
    assert!(windows_after.elapsed() >= Duration::from_secs(12));
    let windows = check_on_lead_chain(&net, &procs, &model);
    for p in &procs {
        let log = net.log(p.hotkey);
        assert!(!log.contains("panicked"), "{} panicked:\n{log}", p.hotkey);
        let resumed = log.matches("from local state").count();
        assert!(resumed + 1 >= p.starts, "{} started {} times but resumed {resumed} times:\n{log}", p.hotkey, p.starts);
    }
    let (lo, hi) = (windows.iter().min().unwrap(), windows.iter().max().unwrap());
    assert!(hi - lo <= 2, "a node did not catch up: windows {windows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_chain_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let model = setup(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let at: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_, server) = support::start_s3s_fs_stoppable(&dir.join("s3"), at).await;
    let net = Net { dir: dir.clone(), s3: format!("http://{at}") };
    let mut procs = nodes();
    for p in procs.iter_mut() {
        net.start(p);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The S3 server is gone for one window (3 s) and comes back on the same address.
    server.abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, server) = support::start_s3s_fs_stoppable(&dir.join("s3"), at).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // The chain's state is unreadable for one window.
    let state = dir.join("devnet/state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{ not json").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::write(&state, &good).unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    for p in procs.iter_mut() {
        let still_running = p.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none());
        assert!(still_running, "{} stopped during the outages:\n{}", p.hotkey, net.log(p.hotkey));
        net.kill(p);
    }
    let windows = check_on_lead_chain(&net, &procs, &model);
    let (lo, hi) = (windows.iter().min().unwrap(), windows.iter().max().unwrap());
    assert!(hi - lo <= 2, "a node did not catch up: windows {windows:?}");
    // The outages were seen and logged, and training went on after them.
    let all: String = procs.iter().map(|p| net.log(p.hotkey)).collect();
    assert!(all.contains("failed") || all.contains("cannot"), "no outage was logged");
    let m1 = net.log("m1");
    let last_applied = m1.rfind("applied the accepted set").unwrap_or(0);
    assert!(last_applied > m1.len() / 2, "m1 stopped applying accepted sets after the outages:\n{m1}");
    drop(server);
}
