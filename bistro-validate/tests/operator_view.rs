//! What an operator sees: the real `miner` and `validator` binaries started with
//! `--metrics.addr`, their `/metrics` scraped after a few windows (named series with the
//! values the run implies), `/status.json` read, and the page at `/` loaded in a real
//! browser (headless Chromium): the rendered DOM has the score table, a chart with data
//! points and the window number, and a screenshot is saved.

use std::io::{Read, Write};
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The address a node logged for its status server.
fn served_addr(dir: &Path, log: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(log)).ok()?;
    let i = text.find("metrics at http://")?;
    let rest = &text[i + "metrics at http://".len()..];
    Some(rest[..rest.find('/')?].to_string())
}

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body.to_string()
}

/// The value of the first sample of `series` whose labels contain `labels`.
fn sample(metrics: &str, series: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with(['{', ' ']))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists())
}

fn browser(url: &str, extra: &[String]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium().unwrap())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=6000", "--window-size=1280,1000"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

#[test]
fn metrics_status_and_page_of_real_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    bistro_train::hparams::write_test_network(dir, |h| h.windows_per_weights = 1).unwrap();
    let metrics = ["--metrics.addr", "127.0.0.1:0"];
    let mut v = common::spawn(
        &common::validator_binary(),
        dir,
        &[&metrics[..], &["--max-windows", "30", "--log-format", "json"]].concat(),
        "validator.log",
    );
    let mut m = common::spawn(
        &common::miner_binary(),
        dir,
        &[&metrics[..], &["--wallet.hotkey", "m1", "--max-windows", "30"]].concat(),
        "miner.log",
    );
    let start = Instant::now();
    let (vaddr, maddr) = loop {
        if let (Some(a), Some(b)) = (served_addr(dir, "validator.log"), served_addr(dir, "miner.log")) {
            break (a, b);
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no status server address logged");
        std::thread::sleep(Duration::from_millis(200));
    };
    // Wait until the validator has scored the miner in a couple of windows.
    let vm = loop {
        let vm = get(&vaddr, "/metrics");
        let scored = sample(&vm, "bistro_miner_e", "hotkey=\"default-m1\"").is_some();
        let applied = sample(&vm, "bistro_aggregates_total", "result=\"applied\"").unwrap_or(0.0);
        if scored && applied >= 2.0 {
            break vm;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the validator did not score:\n{vm}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let mm = get(&maddr, "/metrics");
    let logs = || {
        format!(
            "validator:\n{}\nminer:\n{}",
            std::fs::read_to_string(dir.join("validator.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("miner.log")).unwrap_or_default()
        )
    };
    // The window advances and accepted sets are applied, on both nodes.
    assert!(sample(&vm, "bistro_window", "").unwrap_or(0.0) >= 2.0, "{vm}");
    assert!(sample(&mm, "bistro_window", "").unwrap_or(0.0) >= 1.0, "{mm}\n{}", logs());
    assert!(sample(&mm, "bistro_aggregates_total", "result=\"applied\"").unwrap_or(0.0) >= 1.0, "{mm}");
    // The miner trained and uploaded.
    let loss = sample(&mm, "bistro_loss", "").expect("bistro_loss");
    assert!(loss.is_finite() && loss > 0.0, "{mm}");
    assert!(sample(&mm, "bistro_uploads_total", "result=\"ok\"").unwrap_or(0.0) >= 1.0, "{mm}");
    assert!(sample(&mm, "bistro_bytes_uploaded_total", "").unwrap_or(0.0) > 0.0, "{mm}");
    assert!(mm.contains("bistro_phase_seconds"), "{mm}");
    // The validator collected valid slices, included them, and shows the miner's e.
    assert!(sample(&vm, "bistro_slices_total", "outcome=\"valid\"").unwrap_or(0.0) >= 1.0, "{vm}");
    assert!(sample(&vm, "bistro_decisions_total", "decision=\"included-recomputed\"").unwrap_or(0.0) >= 1.0, "{vm}");
    let e = sample(&vm, "bistro_miner_e", "hotkey=\"default-m1\"").unwrap();
    assert!(e < 1e-3, "honest e {e}\n{vm}");
    assert!(sample(&vm, "bistro_miner_weight", "hotkey=\"default-m1\"").unwrap() > 0.5, "{vm}");
    assert!(sample(&vm, "bistro_heldout_loss", "").is_some_and(f64::is_finite), "{vm}");
    assert_eq!(sample(&vm, "bistro_forks_total", "").unwrap_or(0.0), 0.0, "{vm}");

    // Who is running what: the build and the network's settings as info metrics.
    let build = sample(&vm, "bistro_build_info", "role=\"validator\"");
    assert_eq!(build, Some(1.0), "{vm}");
    let protocol = format!("protocol=\"{}\"", bistro_train::PROTOCOL_VERSION);
    assert!(vm.contains(&protocol) && vm.contains("cuda=\"off\""), "{vm}");
    assert_eq!(sample(&mm, "bistro_hparams_info", "network=\"devnet\""), Some(1.0), "{mm}");
    // Under --log-format json every line the validator writes is a JSON object, the score
    // table included: one structured event per scored miner.
    let vlog = std::fs::read_to_string(dir.join("validator.log")).unwrap();
    let events: Vec<serde_json::Value> = vlog
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let scored = events.iter().find(|e| e["fields"]["message"] == "score" && e["fields"]["hotkey"] == "default-m1");
    let scored = scored.unwrap_or_else(|| panic!("no score event for default-m1:\n{vlog}"));
    assert!(scored["fields"]["e"].as_f64().is_some_and(|e| e < 1e-3), "{scored}");
    assert!(scored["fields"]["weight"].is_f64() && scored["fields"]["window"].is_u64(), "{scored}");

    // /status.json: the node's state and the score table.
    let status: serde_json::Value = serde_json::from_str(&get(&vaddr, "/status.json")).unwrap();
    assert_eq!(status["role"], "validator");
    assert!(status["window"].as_u64().unwrap() >= 2, "{status}");
    let rows = status["scores"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["hotkey"] == "default-m1"), "{status}");
    assert!(status["windows"].as_array().unwrap().iter().any(|w| w["heldout_loss"].is_f64()), "{status}");

    // The page, in a real browser.
    let page = get(&vaddr, "/");
    assert!(page.contains("<svg id=\"chart\"") && !page.contains("http://cdn"), "the page is not self-contained");
    if chromium().is_some() {
        let url = format!("http://{vaddr}/");
        let out = browser(&url, &["--dump-dom".into()]);
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(dom.contains("default-m1"), "score table not rendered:\n{dom}");
        assert!(dom.contains("<polyline") && dom.contains("data-series=\"heldout\""), "chart not rendered:\n{dom}");
        let window = status["window"].as_u64().unwrap();
        let shown = dom
            .split("id=\"window\">")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .and_then(|x| x.parse::<u64>().ok())
            .expect("window number shown");
        assert!(shown >= window, "page shows window {shown}, status said {window}");
        // The window bar: one segment per block, the blocks passed full, the block under
        // way striped, whatever block the chain is in (at "block 3 of 3" too).
        let bar = dom.split("id=\"progress\"").nth(1).and_then(|r| r.split("</div></div>").next()).unwrap_or("");
        let segments = bar.matches("<div").count();
        let (done, now) = (bar.matches("class=\"done\"").count(), bar.matches("class=\"now\"").count());
        assert_eq!(segments, 3, "one segment per block of a 3-block window: {bar}");
        assert_eq!(now, 1, "the block under way is marked: {bar}");
        let text = dom.split("id=\"progress-text\">").nth(1).and_then(|r| r.split('<').next()).unwrap_or("");
        assert!(text.contains(&format!("block {} of 3 under way", done + 1)), "{text} / {bar}");
        // The loss axis: a handful of labels with at most 3 decimals, however flat the loss.
        let chart = dom.split("<svg id=\"chart\"").nth(1).and_then(|r| r.split("</svg>").next()).unwrap_or("");
        let labels: Vec<&str> = chart
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split('>').nth(1)?.split('<').next())
            .filter(|t| t.parse::<f64>().is_ok())
            .collect();
        assert_eq!(labels.len(), 5, "{chart}");
        assert!(labels.iter().all(|l| l.split('.').nth(1).is_none_or(|d| d.len() <= 3)), "{labels:?}");
        let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
        let _ = std::fs::remove_file(&shot);
        let out = browser(&url, &[format!("--screenshot={}", shot.display())]);
        assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!("screenshot: {}", shot.display());
    } else if std::env::var_os("BISTRO_REQUIRE_BROWSER").is_some() {
        panic!("BISTRO_REQUIRE_BROWSER is set but Chromium is not installed (apt-get install chromium)");
    } else {
        eprintln!("SKIPPED the browser part: Chromium is not installed (apt-get install chromium)");
    }
    let _ = v.kill();
    let _ = m.kill();
    let _ = (v.wait(), m.wait());
}
