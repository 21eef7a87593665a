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

use bistro_examples::devnet::{DevnetOptions, Strategy, run_in_process};
use clap::Parser;

/// Run a local BISTRO network with honest and cheating miners.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Honest miners.
    #[arg(long, default_value_t = 4)]
    miners: usize,
    /// Validators.
    #[arg(long, default_value_t = 1)]
    validators: usize,
    /// Windows to run.
    #[arg(long, default_value_t = 10)]
    windows: u64,
    /// Model preset (tiny, small, 125m, 1b) or config file.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Slice compression.
    #[arg(long, default_value_t = 8)]
    compression: usize,
    /// Cheating miners to add, comma separated: idle, zeros, noise, copycat, stale,
    /// wrong-pages, lazy, poison, early (or `all`).
    #[arg(long, value_delimiter = ',')]
    adversaries: Vec<String>,
    /// Working directory (wiped at start).
    #[arg(long, default_value = ".bistro/devnet-run")]
    dir: PathBuf,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the SVG plot here [default: <dir>/report.svg].
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[global_allocator]
static ALLOC: bistro_train::process::MiMalloc = bistro_train::process::MiMalloc;

fn main() -> anyhow::Result<()> {
    bistro_train::process::block_on(run())?
}

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
    opts.compression = cli.compression;
    opts.adversaries = adversaries;
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
