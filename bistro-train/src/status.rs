//! The operator's view of a running node, served on one address (`--metrics.addr`):
//!
//! * `/metrics`: Prometheus text format of everything [`crate::telemetry`] records;
//! * `/status.json`: the node's state, its last windows and (validators) the score table;
//! * `/`: one self-contained HTML page (no CDN) that polls `/status.json`.
//!
//! Only binaries (and the devnet example) start it: installing the Prometheus recorder is
//! a process-wide choice, like the allocator. The server answers plain `GET`s over
//! HTTP/1.1 with bounded request heads and timeouts; anything else gets a 4xx.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Windows of history kept for the page.
const HISTORY: usize = 200;

/// One window as the page shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WindowFigures {
    /// The window.
    pub window: u64,
    /// Mean training loss (miners).
    pub loss: Option<f64>,
    /// Held-out loss of the shared model.
    pub heldout_loss: Option<f64>,
    /// Held-out loss of a reference (the devnet's honest-only model).
    pub reference_loss: Option<f64>,
    /// Training throughput.
    pub tokens_per_sec: Option<f64>,
    /// `applied`, `no update`, `forked`.
    pub outcome: Option<String>,
    /// The validator whose aggregate was applied.
    pub from: Option<String>,
    /// Slices included in the accepted set.
    pub included: Option<usize>,
    /// Miners excluded from it.
    pub excluded: Option<usize>,
}

/// One scored miner.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoreEntry {
    /// uid.
    pub uid: u16,
    /// hotkey.
    pub hotkey: String,
    /// `ok` or a rejection code.
    pub status: String,
    /// Relative error.
    pub e: f64,
    /// Window score.
    pub score: f64,
    /// EMA.
    pub ema: f64,
    /// Weight share.
    pub weight: f64,
}

/// Everything `/status.json` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// `miner`, `validator` or `devnet`.
    pub role: String,
    /// The node's hotkey.
    pub hotkey: String,
    /// The window the node's state belongs to.
    pub window: u64,
    /// The chain's window.
    pub chain_window: u64,
    /// Newest block.
    pub block: u64,
    /// Blocks per window.
    pub blocks_per_window: u64,
    /// Current phase.
    pub phase: String,
    /// Hash of the node's state.
    pub state_hash: String,
    /// Forks detected / repaired.
    pub forks: u64,
    /// Forks repaired.
    pub repairs: u64,
    /// A warning for the operator (catching up, forked, aggregates missing), if any.
    pub banner: Option<String>,
    /// `warn` or `bad`.
    pub banner_level: Option<String>,
    /// The last windows.
    pub windows: VecDeque<WindowFigures>,
    /// The latest score table (validators).
    pub scores: Vec<ScoreEntry>,
    /// Named counters (accepted, excluded by reason, ...).
    pub counts: BTreeMap<String, u64>,
}

/// Shared, updatable status of a node.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<Status>>);

impl StatusBoard {
    /// A board for `role` and `hotkey`.
    pub fn new(role: &str, hotkey: &str, blocks_per_window: u64) -> Self {
        StatusBoard(Arc::new(Mutex::new(Status {
            role: role.into(),
            hotkey: hotkey.into(),
            blocks_per_window,
            phase: "starting".into(),
            ..Status::default()
        })))
    }

    /// Change the status.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// The figures of `window`, created when absent (the history stays bounded).
    pub fn window(&self, window: u64, f: impl FnOnce(&mut WindowFigures)) {
        self.update(|s| {
            if !s.windows.iter().any(|w| w.window == window) {
                s.windows.push_back(WindowFigures { window, ..Default::default() });
                let mut v: Vec<_> = s.windows.drain(..).collect();
                v.sort_by_key(|w| w.window);
                s.windows = v.into();
                while s.windows.len() > HISTORY {
                    s.windows.pop_front();
                }
            }
            if let Some(w) = s.windows.iter_mut().find(|w| w.window == window) {
                f(w);
            }
        });
    }

    /// Add to a named count.
    pub fn count(&self, name: &str, n: u64) {
        self.update(|s| *s.counts.entry(name.to_string()).or_default() += n);
    }

    /// A JSON snapshot.
    pub fn to_json(&self) -> Vec<u8> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_vec(&*s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes())
    }
}

/// What the server renders `/metrics` with.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Install the process-wide Prometheus recorder (series not updated for `idle` are dropped,
/// which bounds per-hotkey label sets) and return its renderer.
pub fn install_prometheus(idle: Duration) -> Result<Render, String> {
    let buckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(idle))
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(crate::telemetry::PHASE_SECONDS.to_string()),
            &buckets,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    crate::telemetry::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}

/// The page at `/`.
pub const PAGE: &str = include_str!("status.html");

/// Bind `addr` and serve `/metrics`, `/status.json` and `/` until the process ends.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, board: StatusBoard, render: Render) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let (board, render) = (board.clone(), render.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(sock, board, render)).await;
            });
        }
    });
    Ok(local)
}

async fn answer(mut sock: tokio::net::TcpStream, board: StatusBoard, render: Render) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return respond(&mut sock, "431 Request Header Fields Too Large", "text/plain", b"too large").await;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(&mut sock, "405 Method Not Allowed", "text/plain", b"GET only").await;
    }
    match target.split('?').next().unwrap_or("") {
        "/metrics" => respond(&mut sock, "200 OK", "text/plain; version=0.0.4", render().as_bytes()).await,
        "/status.json" => respond(&mut sock, "200 OK", "application/json", &board.to_json()).await,
        "/" | "/index.html" => respond(&mut sock, "200 OK", "text/html; charset=utf-8", PAGE.as_bytes()).await,
        _ => respond(&mut sock, "404 Not Found", "text/plain", b"not found").await,
    }
}

async fn respond(sock: &mut tokio::net::TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}
