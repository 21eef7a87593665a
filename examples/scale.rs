//! The scale harness: N miners per window on one machine (one real, the rest replaying its
//! honest gradient under their own hotkeys), the real lead pipeline against a real S3
//! server behind an emulated link, and a table of what each phase costs as N grows.
//!
//! ```bash
//! cargo run --release --example scale -- --miners 16,64,128,255 --windows 2 \
//!     --latency-ms 20 --mbps 200
//! # shared verification: 16 validators, every miner recomputed by 2 of them
//! cargo run --release --example scale -- --miners 64,128,240 --validators 16 --verifiers-per-miner 2
//! # an eighth of the miners cheat (they upload the honest gradient negated)
//! cargo run --release --example scale -- --miners 64,240 --validators 16 --cheaters 0.125
//! ```

#[path = "scale/harness.rs"]
mod harness;
#[path = "../bistro-train/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use clap::Parser;

/// Measure the lead's pipeline and a follower as the miners per window grow.
#[derive(Parser, Debug)]
struct Args {
    /// Miners per window, one run each (comma-separated; at most 255: a subnet holds 256
    /// uids and the lead takes one).
    #[arg(long, value_delimiter = ',', default_value = "16,64,128,255")]
    miners: Vec<usize>,
    /// Windows measured per run.
    #[arg(long, default_value_t = 2)]
    windows: u64,
    /// Latency added to every new connection to the S3 server.
    #[arg(long = "latency-ms", default_value_t = 20)]
    latency_ms: u64,
    /// Bandwidth of each connection's responses, in megabits per second.
    #[arg(long, default_value_t = 200)]
    mbps: u64,
    /// Devnet block time in milliseconds (the devnet's default: 3-block windows of 12 s).
    #[arg(long = "block-ms", default_value_t = 4000)]
    block_ms: u64,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Validators. 1: the lead alone at live pace. More: shared verification with
    /// `--verifiers-per-miner` (each validator's work timed alone, in lockstep).
    #[arg(long, default_value_t = 1)]
    validators: usize,
    /// Verifiers per miner under shared verification (with `--validators` above 1).
    #[arg(long = "verifiers-per-miner", default_value_t = 2)]
    verifiers_per_miner: u32,
    /// Cheating miners per run, as a fraction of N (rounded down; each uploads the honest
    /// gradient negated): the table counts them caught, left out unchecked, or included.
    #[arg(long, default_value_t = 0.0)]
    cheaters: f64,
    /// Append the table to this Markdown file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    bistro_train::cli::init_logging(bistro_train::cli::LogFormat::Pretty);
    let args = Args::parse();
    let mut table = format!(
        "{} windows per N, model {}, {} ms blocks, link {} ms + {} Mbit/s per connection, {} cores\n\n{}\n",
        args.windows,
        args.model,
        args.block_ms,
        args.latency_ms,
        args.mbps,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if args.validators > 1 { harness::SHARED_TABLE_HEADER } else { harness::TABLE_HEADER }
    );
    for n in &args.miners {
        let tmp = tempfile::tempdir()?;
        std::fs::create_dir_all(tmp.path().join("s3"))?;
        let s3 = support::start_s3s_fs(&tmp.path().join("s3")).await;
        let (link, _, _) =
            support::slow_link(s3, Duration::from_millis(args.latency_ms), args.mbps * 1_000_000 / 8, None).await;
        let opts = harness::ScaleOptions {
            miners: *n,
            windows: args.windows,
            model: args.model.clone(),
            block: Duration::from_millis(args.block_ms),
            dir: tmp.path().join("run"),
            hparams: bistro_train::hparams::HParams {
                verifiers_per_miner: if args.validators > 1 { args.verifiers_per_miner } else { 0 },
                ..Default::default()
            },
            validators: args.validators,
            cheaters: ((*n as f64 * args.cheaters.clamp(0.0, 1.0)) as usize).min(n.saturating_sub(1)),
        };
        let r = harness::run(&opts, s3, link).await?;
        println!("{}", r.row());
        table.push_str(&r.row());
        table.push('\n');
    }
    println!("\n{table}");
    if let Some(path) = &args.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{table}")?;
    }
    Ok(())
}
