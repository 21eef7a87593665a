//! `miner`: train the shared model on this hotkey's pages every window and upload slices.
//!
//! With no arguments it joins the embedded local devnet with a local-directory bucket,
//! the shipped corpus and tokenizer, and the `tiny` model.

use std::sync::Arc;

use anyhow::Context;
use bistro_train::cli::{NodeArgs, stop_on_ctrl_c};
use bistro_train::miner::{Miner, MinerConfig, MinerEvent};
use clap::Parser;

/// BISTRO miner: computes one gradient update of the shared transformer per block window on
/// its assigned data pages, and uploads a slice of the result to its bucket.
#[derive(Parser, Debug)]
#[command(
    version = bistro_train::cli::version(),
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  cargo run --release --bin miner                       # join the local devnet (no accounts)
  cargo run --release --bin miner -- --max-windows 3    # train three windows, then exit
  miner doctor --subtensor.network test --netuid N --wallet.name W --wallet.hotkey H \\
        --bucket 's3://B/prefix?endpoint=https://...'   # check the set-up first
  miner --subtensor.network test --netuid N --wallet.name W --wallet.hotkey H \\
        --bucket 's3://B/prefix?endpoint=https://...'   # testnet: shipped hparams
  miner hparams init --network test --out network.toml  # start another network's file

Every option also reads an environment variable (shown as [env: ...]); the wallet and
network ones are the Bittensor SDK's (BT_WALLET_NAME, BT_WALLET_HOTKEY, BT_WALLET_PATH,
BT_SUBTENSOR_NETWORK, BT_SUBTENSOR_CHAIN_ENDPOINT). Exit codes: 0 done, 78 configuration
error (do not restart), 1 other errors, 130/143 second Ctrl-C/SIGTERM."
)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,

    /// An operator tool instead of running the node.
    #[command(subcommand)]
    tool: Option<bistro_train::cli::Tool>,
}

fn print_event(e: &MinerEvent) {
    match e {
        MinerEvent::Started { uid, window, origin } => {
            tracing::info!("miner uid {uid} ready: model at window {window} from {origin}")
        }
        MinerEvent::WindowStarted { window } => tracing::info!("window {window}: training"),
        MinerEvent::PagesLoaded { window, pages, tokens } => {
            tracing::info!("window {window}: {pages} pages, {tokens} tokens")
        }
        MinerEvent::StepDone { window, loss, tokens_per_sec } => {
            tracing::info!("window {window}: loss {loss:.4}, {tokens_per_sec:.0} tokens/s")
        }
        MinerEvent::SliceUploaded { window, bytes, seconds } => {
            tracing::info!("window {window}: slice uploaded ({:.1} KiB in {seconds:.2}s)", *bytes as f64 / 1024.0)
        }
        MinerEvent::UploadFailed { window, reason } => tracing::warn!("window {window}: slice not uploaded: {reason}"),
        MinerEvent::Followed(f) => match f {
            bistro_train::node::Followed::Applied { .. } => tracing::info!("{}", f.describe()),
            _ => tracing::warn!("{}", f.describe()),
        },
        MinerEvent::Skipped { window, reason } => tracing::warn!("window {window}: skipped: {reason}"),
        _ => {}
    }
}

/// Feed the status page.
fn record(board: &bistro_train::status::StatusBoard, e: &MinerEvent) {
    match e {
        MinerEvent::Started { window, .. } => board.update(|s| s.window = *window),
        MinerEvent::WindowStarted { window } => board.update(|s| {
            s.phase = "train".into();
            s.window = *window;
        }),
        MinerEvent::StepDone { window, loss, tokens_per_sec } => {
            board.window(*window, |w| {
                w.loss = Some(*loss);
                w.tokens_per_sec = Some(*tokens_per_sec);
            });
            board.update(|s| s.phase = "upload".into());
        }
        MinerEvent::SliceUploaded { .. } => {
            board.count("slices uploaded", 1);
            board.update(|s| s.phase = "follow".into());
        }
        MinerEvent::UploadFailed { .. } => board.count("uploads failed", 1),
        MinerEvent::Followed(f) => bistro_train::cli::board_followed(board, f),
        MinerEvent::Skipped { .. } => board.count("windows skipped", 1),
        _ => {}
    }
}

bistro_train::node_main!(run);

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(tool) = &cli.tool {
        return bistro_train::cli::run_tool(tool, bistro_train::doctor::Role::Miner).await;
    }
    let node = cli.node;
    let (cfg, chain): (MinerConfig, _) = node.prepare("miner", 0).await?;
    let state_dir = cfg.state_dir.clone();
    let board =
        bistro_train::cli::start_status(node.metrics_addr, "miner", &cfg.hotkey, &cfg.hparams, chain.clone()).await?;
    let (countdown_chain, bpw) = (chain.clone(), cfg.hparams.blocks_per_window);
    let mut miner = Miner::new(cfg, chain).await.context("cannot start the miner")?;
    miner.on_event(print_event);
    let held = bistro_train::cli::spawn_countdown(node.log_format, countdown_chain, bpw, miner.window());
    miner.on_event(move |e| {
        if let MinerEvent::Followed(f) = e {
            held.followed(f);
        }
    });
    if let Some(board) = board {
        miner.on_event(move |e| record(&board, e));
    }
    let stop = stop_on_ctrl_c();
    let summary = miner.run(node.max_windows, Arc::clone(&stop)).await?;
    tracing::info!(
        "stopped: {} window(s) trained, {} slice(s) uploaded, {} window(s) followed, {} caught up; state saved in {}",
        summary.windows_trained,
        summary.slices_uploaded,
        summary.windows_merged,
        summary.windows_caught_up,
        state_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option of the miner and its tools reads an environment variable, except the
    /// S3 secret flag (the secret's variable is read where the bucket is opened, so that a
    /// secret given on the command line, and only then, draws a warning).
    #[test]
    fn every_flag_has_an_environment_variable() {
        let mut missing = Vec::new();
        let mut seen = 0;
        let cmd = super::Cli::command();
        let mut stack = vec![cmd];
        while let Some(c) = stack.pop() {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                // `hparams init` writes a shipped file: its two options are not node settings.
                if a.is_positional() || c.get_name() == "init" || ["help", "version", "s3_secret_key"].contains(&id) {
                    continue;
                }
                seen += 1;
                if a.get_env().is_none() {
                    missing.push(format!("{} --{}", c.get_name(), a.get_long().unwrap_or(id)));
                }
            }
            stack.extend(c.get_subcommands().cloned());
        }
        assert!(seen > 25, "{seen}");
        assert!(missing.is_empty(), "flags without an environment variable: {missing:?}");
    }
}
