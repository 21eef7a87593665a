//! The learning lab: held-out loss per byte of each candidate protocol against centralised
//! AdamW at equal tokens, and whether a validator can still check each honest miner.
//!
//! ```bash
//! # one arm, one page seed (JSON report on stdout's last line and in --out)
//! cargo run --release --example learning -- run --arm d2:h=32,bits=2 --verify --out d2.json
//! # the tables, the curves and the choice over every report in a folder
//! cargo run --release --example learning -- report docs/learning/runs --out docs/learning
//! ```
//!
//! `scripts/learning-lab.sh` runs every arm on two page seeds. Arms: `r0:lr=…` (centralised
//! AdamW), `r1` (SGD, compression 1), `r2` (today: random 1/300, f32), `d1:bits=2,lr=…`
//! (quantised random slices with a public AdamW), `d2:h=32,bits=2[,keep=1]` (replayable
//! DiLoCo; `bits=0` is f32), `d3:h=8,bits=2,e=8` (top-k with error feedback reset every `e`
//! rounds; `e=0` never resets). See `bistro_examples::learning`.

use std::path::PathBuf;

use anyhow::Context;
use bistro_examples::learning::{ArmReport, ArmSpec, Lab, LabOptions, LabTable, run_arm};
use clap::{Parser, Subcommand};

/// The learning lab.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train one arm and write its report.
    Run {
        /// The arm, e.g. `r0:lr=3e-3`, `r2`, `d1:bits=2,lr=1e-2`, `d2:h=32,bits=2`, `d3:h=8,e=8`.
        #[arg(long)]
        arm: String,
        /// Inner (and R0's default) AdamW learning rate where the arm names none.
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        /// Network name: the page seed (`devnet`, `devnet-b`).
        #[arg(long, default_value = "devnet")]
        network: String,
        /// Windows (equal windows are equal tokens).
        #[arg(long, default_value_t = 384)]
        windows: u64,
        /// Evaluate the held-out loss every this many windows.
        #[arg(long, default_value_t = 32)]
        eval_every: u64,
        /// Held-out pages (never drawn for training).
        #[arg(long, default_value_t = 32)]
        heldout_pages: usize,
        /// Replay miner 0 as a validator through another f32 path and check the cheaters.
        #[arg(long)]
        verify: bool,
        /// Write the JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build the tables, curves and choice from every `*.json` report in a folder.
    Report {
        /// Folder of arm reports.
        runs: PathBuf,
        /// Write `results.md` and `curves-<network>.svg` here.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { arm, lr, network, windows, eval_every, heldout_pages, verify, out } => {
            let spec = ArmSpec::parse(&arm, lr)?;
            let opts = LabOptions { network, windows, eval_every, heldout_pages, ..LabOptions::default() };
            let lab = Lab::new(opts)?;
            eprintln!(
                "{}: {} windows on `{}`, {:.0} tokens per window, {} training pages redrawn off the held-out set",
                spec.label(),
                lab.opts.windows,
                lab.opts.network,
                lab.tokens_per_window(),
                lab.redrawn
            );
            let start = std::time::Instant::now();
            let report = run_arm(&lab, &spec, verify, |w, loss| {
                eprintln!("  window {w:>4}: held-out loss {loss:.4} ({:.0} s)", start.elapsed().as_secs_f64());
            })?;
            let json = serde_json::to_string(&report)?;
            if let Some(path) = out {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
            }
            eprintln!(
                "{}: final held-out loss {:.4}, upload {:.1} KB/window (budget {:.1} KB)",
                report.label,
                report.final_loss(),
                report.upload_bytes_per_window / 1000.0,
                report.budget_bytes_per_window / 1000.0
            );
            println!("{json}");
        }
        Command::Report { runs, out } => {
            let mut reports = Vec::new();
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&runs)
                .with_context(|| format!("reading {}", runs.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            paths.sort();
            for p in paths {
                let text = std::fs::read_to_string(&p)?;
                let r: ArmReport = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
                reports.push(r);
            }
            let table = LabTable::new(reports);
            std::fs::create_dir_all(&out)?;
            let md = table.markdown();
            std::fs::write(out.join("results.md"), &md)?;
            for (net, svg) in table.svgs() {
                std::fs::write(out.join(format!("curves-{net}.svg")), svg)?;
            }
            print!("{md}");
        }
    }
    Ok(())
}
