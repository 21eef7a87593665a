//! The whole BISTRO network on one machine, with cheaters, and proof that it learns.
//!
//! ```bash
//! cargo run --release --example devnet -- --miners 4 --windows 20 --adversaries noise,copycat,poison
//! ```
//!
//! Starts a fresh local devnet in `--dir`, runs the miners and validators window by window
//! in lockstep (honest miners are the library's `Miner`, unchanged), prints a summary
//! table, and writes a JSON report and an SVG plot of held-out loss and weight shares.

use std::path::PathBuf;

use bistro_examples::devnet::{DevnetOptions, Strategy, WindowHook, WindowReport, run_in_process};
use bistro_train::status::{ScoreEntry, StatusBoard};
use clap::Parser;

/// Run a local BISTRO network with honest and cheating miners.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Honest miners.
    #[arg(long, default_value_t = 4)]
    miners: usize,
    /// Honest validators (raised, with a log line, until they hold a stake majority
    /// against any hostile validators among the adversaries).
    #[arg(long, default_value_t = 1)]
    validators: usize,
    /// Windows to run.
    #[arg(long, default_value_t = 10)]
    windows: u64,
    /// Model preset (tiny, small, 125m, 1b) or config file.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Slice compression [default: the hparams']
    #[arg(long)]
    compression: Option<usize>,
    /// Protocol constants from a TOML file (`HParams`; the devnet's defaults otherwise).
    /// `--model` and `--compression` still override theirs.
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// Pages in the held-out set the loss is measured on.
    #[arg(long, default_value_t = 8)]
    heldout_pages: usize,
    /// Adversaries to add, comma separated. Miners: idle, zeros, noise, copycat, stale,
    /// wrong-pages, lazy, poison, early, split-view, stall, bounded-poison, backdoor, bias,
    /// sybil-zero, sample-aware, patient, stall-flood (8 hotkeys at the lowest uids),
    /// fork-victim (an honest miner that misses one aggregate). Validators (each outranks
    /// the honest ones by stake): lying-lead, stalling-lead, fallback-thief, and (not in
    /// `all`) forking-lead and lying-verifier (signs its dishonest assigned miners honest
    /// under shared verification). Or `all`.
    #[arg(long, value_delimiter = ',')]
    adversaries: Vec<String>,
    /// Shared verification: validators that recompute each miner per window (`r`; 0, the
    /// default, leaves the hparams' value: every validator recomputes what its budget allows).
    #[arg(long, default_value_t = 0)]
    verifiers_per_miner: u32,
    /// Most miners each validator recomputes per window: fewer than the miners gives the
    /// live protocol's p < 1 (each miner checked with probability about K / miners).
    #[arg(long, default_value_t = 1024)]
    max_miners: usize,
    /// Working directory (wiped at start).
    #[arg(long, default_value = ".bistro/devnet-run")]
    dir: PathBuf,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the SVG plot here [default: <dir>/report.svg].
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Serve the simulated network's live page (/), /status.json and /metrics here while it
    /// runs (e.g. 127.0.0.1:9616).
    #[arg(long)]
    serve: Option<std::net::SocketAddr>,
}

bistro_train::node_main!(run);

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    bistro_train::cli::init_logging(bistro_train::cli::LogFormat::Pretty);
    let mut adversaries = Vec::new();
    for a in &cli.adversaries {
        if a == "all" {
            adversaries.extend(Strategy::CHEATS);
        } else {
            adversaries.push(a.parse::<Strategy>().map_err(anyhow::Error::msg)?);
        }
    }
    if cli.dir.exists() {
        std::fs::remove_dir_all(&cli.dir)?;
    }
    let mut opts = DevnetOptions::new(&cli.dir);
    opts.miners = cli.miners;
    opts.validators = cli.validators;
    opts.windows = cli.windows;
    opts.model = cli.model.clone();
    if let Some(path) = &cli.hparams {
        opts.hparams = bistro_train::HParams::from_file(path)?;
    }
    opts.compression = cli.compression.unwrap_or(opts.hparams.compression);
    if cli.verifiers_per_miner > 0 {
        opts.hparams.verifiers_per_miner = cli.verifiers_per_miner;
    }
    opts.heldout_pages = cli.heldout_pages.max(1);
    opts.adversaries = adversaries;
    opts.max_miners = cli.max_miners.max(1);
    if let Some(addr) = cli.serve {
        let board = StatusBoard::new("devnet", "whole network (lead's view)", opts.hparams.blocks_per_window);
        let render = bistro_train::status::install_prometheus(std::time::Duration::from_secs(3600))
            .map_err(anyhow::Error::msg)?;
        let bound = bistro_train::status::serve(addr, board.clone(), render).await?;
        println!("live page: http://{bound}/");
        let (b, tolerance) = (board.clone(), opts.hparams.honest_tolerance);
        opts.on_window = Some(WindowHook(std::sync::Arc::new(move |r: &WindowReport| {
            b.window(r.window, |w| {
                w.heldout_loss = Some(r.heldout_loss);
                w.reference_loss = Some(r.reference_loss);
                w.outcome = Some(if r.forks == 0 { "applied".into() } else { format!("{} forked", r.forks) });
                w.from = Some("validator-0".into());
                w.included = Some(r.accepted.len());
                w.excluded = Some(r.rejected.len());
            });
            b.update(|s| {
                s.window = r.window + 1;
                s.chain_window = r.window + 1;
                s.phase = "lockstep".into();
                s.scores = r
                    .miners
                    .iter()
                    .map(|m| ScoreEntry {
                        uid: m.uid,
                        hotkey: m.hotkey.clone(),
                        status: format!("{} ({})", m.status, m.strategy.name()),
                        e: m.e,
                        score: bistro_validate::honesty_score(m.e, tolerance),
                        // The report keeps the weight, not the EMA: shown as "–".
                        ema: f64::NAN,
                        weight: m.weight,
                    })
                    .collect();
            });
            for (_, reason) in &r.rejected {
                b.count(&format!("excluded: {reason}"), 1);
            }
            b.count("included slices", r.accepted.len() as u64);
        })));
    }
    let report = run_in_process(&opts).await?;
    println!("{}", report.summary());
    if let Some(p) = &cli.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        println!("report: {}", p.display());
    }
    let plot = cli.plot.clone().unwrap_or_else(|| cli.dir.join("report.svg"));
    std::fs::write(&plot, report.svg())?;
    println!("plot: {}", plot.display());
    Ok(())
}
