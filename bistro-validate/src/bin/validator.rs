//! `validator`: recompute miners' gradients, score them, set weights.
//!
//! With no arguments it validates the embedded local devnet (same defaults as the miner).

use std::sync::Arc;

use bistro_train::cli::{NodeArgs, stop_on_ctrl_c};
use bistro_train::status::{ScoreEntry, StatusBoard};
use bistro_validate::{Validator, ValidatorConfig, ValidatorEvent};
use clap::Parser;

/// BISTRO validator: downloads each miner's slice, recomputes its gradient on the same pages
/// from the same model state, rewards R = -||g_m - g_v|| and sets weights on chain.
#[derive(Parser, Debug)]
#[command(
    version = bistro_train::cli::version(),
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  cargo run --bin validator                             # score the miners of the local devnet
  cargo run --bin validator -- --max-windows 5          # score five windows, then exit
  validator doctor --subtensor.network test --netuid N --wallet.name W --wallet.hotkey H \\
            --bucket 's3://B/prefix?endpoint=https://...'   # check the set-up first
  validator --subtensor.network test --netuid N --wallet.name W --wallet.hotkey H \\
            --bucket 's3://B/prefix?endpoint=https://...'   # testnet: shipped hparams

Every option also reads an environment variable (shown as [env: ...]); the wallet and
network ones are the Bittensor SDK's. Exit codes: 0 done, 78 configuration error (do not
restart), 1 other errors, 130/143 second Ctrl-C/SIGTERM."
)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,

    /// The validator's own options.
    #[command(flatten)]
    own: ValidatorArgs,

    /// An operator tool instead of running the node.
    #[command(subcommand)]
    tool: Option<bistro_train::cli::Tool<ValidatorArgs>>,
}

/// The validator's options beyond every node's.
#[derive(clap::Args, Clone, Debug)]
struct ValidatorArgs {
    /// Most miners recomputed per window (a private random sample, drawn after the upload
    /// deadline, when there are more; the verification budget may stop it earlier).
    #[arg(long = "max-miners", default_value_t = 64, env = "BISTRO_MAX_MINERS")]
    max_miners: usize,

    /// Pages of the fixed held-out set on which the shared model's loss is measured after
    /// every window (0: off).
    #[arg(long = "heldout-pages", default_value_t = 2, env = "BISTRO_HELDOUT_PAGES")]
    heldout_pages: usize,

    /// Stake to register with on the devnet (gives the validator permit).
    #[arg(long = "devnet.stake", default_value_t = 1000, env = "BISTRO_DEVNET_STAKE", help_heading = "Devnet")]
    devnet_stake: u64,
}

fn short(h: &str) -> String {
    if h.chars().count() > 18 { format!("{}…", h.chars().take(17).collect::<String>()) } else { h.to_string() }
}

/// Feed the status page.
fn record(board: &StatusBoard, e: &ValidatorEvent) {
    match e {
        ValidatorEvent::Started { window, .. } => board.update(|s| s.window = *window),
        ValidatorEvent::Published { included, excluded, .. } => {
            board.count("accepted sets published", 1);
            board.count("slices included (as lead)", *included as u64);
            board.count("miners excluded (as lead)", excluded.len() as u64);
        }
        ValidatorEvent::Followed(f) => bistro_train::cli::board_followed(board, f),
        ValidatorEvent::HeldOut { window, loss } => board.window(*window, |w| w.heldout_loss = Some(*loss)),
        ValidatorEvent::Scored { rows, .. } => board.update(|s| {
            s.scores = rows
                .iter()
                .map(|r| ScoreEntry {
                    uid: r.uid,
                    hotkey: r.hotkey.clone(),
                    status: r.status.clone(),
                    e: r.e,
                    score: r.score,
                    ema: r.ema,
                    weight: r.weight,
                })
                .collect();
        }),
        ValidatorEvent::WeightsSet { .. } => board.count("weights set", 1),
        ValidatorEvent::WeightsCommitted { .. } => board.count("weights committed", 1),
        ValidatorEvent::WeightsFailed { .. } => board.count("weights failed", 1),
        _ => {}
    }
}

/// Log a node event; under `--log-format json` the score table is one structured event per
/// miner (fields `window`, `uid`, `hotkey`, `status`, `r`, `e`, `score`, `ema`, `weight`),
/// so JSON-lines shippers get no raw text.
fn print_event(e: &ValidatorEvent, json: bool) {
    match e {
        ValidatorEvent::Started { uid, window, origin } => {
            tracing::info!("validator uid {uid} ready: model at window {window} from {origin}")
        }
        ValidatorEvent::Published { window, included, excluded, scored } => {
            let ex: Vec<String> = excluded.iter().map(|(h, r)| format!("{h}: {r}")).collect();
            tracing::info!(
                "window {window}: as the lead, published the accepted set: {included} included, {scored} recomputed{}",
                if ex.is_empty() { String::new() } else { format!("; excluded {}", ex.join(", ")) }
            )
        }
        ValidatorEvent::Followed(f) => match f {
            bistro_train::node::Followed::Applied { .. } => tracing::info!("{}", f.describe()),
            _ => tracing::warn!("{}", f.describe()),
        },
        ValidatorEvent::Scored { window, rows, seconds } if json => {
            tracing::info!(window, miners = rows.len(), seconds, "scores");
            for r in rows {
                tracing::info!(
                    window,
                    uid = r.uid,
                    hotkey = %r.hotkey,
                    status = %r.status,
                    r = r.r,
                    e = r.e,
                    score = r.score,
                    ema = r.ema,
                    weight = r.weight,
                    "score"
                );
            }
        }
        ValidatorEvent::Scored { window, rows, seconds } => {
            let mut t = format!("window {window} scores ({seconds:.1}s of recomputation):\n");
            t.push_str(&format!(
                "  {:>4}  {:<18}  {:<12}  {:>10}  {:>9}  {:>6}  {:>6}  {:>7}\n",
                "uid", "hotkey", "status", "R", "e", "score", "ema", "weight"
            ));
            for r in rows {
                t.push_str(&format!(
                    "  {:>4}  {:<18}  {:<12}  {:>10.3e}  {:>9.2e}  {:>6.3}  {:>6.3}  {:>7.4}\n",
                    r.uid,
                    short(&r.hotkey),
                    r.status,
                    r.r,
                    r.e,
                    r.score,
                    r.ema,
                    r.weight
                ));
            }
            if rows.is_empty() {
                t.push_str("  (no miners registered)\n");
            }
            eprint!("{t}");
        }
        ValidatorEvent::HeldOut { window, loss } => tracing::info!("window {window}: held-out loss {loss:.4}"),
        ValidatorEvent::WeightsSet { window, weights } => tracing::info!("window {window}: set weights {weights:?}"),
        ValidatorEvent::WeightsCommitted { window, weights, reveal_round, reveal_block } => tracing::info!(
            "window {window}: committed weights {weights:?} (commit-reveal: encrypted to beacon round {reveal_round}; \
             the chain reveals and applies them at block {reveal_block})"
        ),
        ValidatorEvent::WeightsFailed { window, reason } => {
            tracing::warn!("window {window}: set_weights failed: {reason}")
        }
        _ => {}
    }
}

bistro_train::node_main!(run);

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(tool) = &cli.tool {
        return bistro_train::cli::run_tool(tool, bistro_train::doctor::Role::Validator).await;
    }
    let node = cli.node;
    let (node_cfg, chain) = node.prepare("validator", cli.own.devnet_stake).await?;
    let board = bistro_train::cli::start_status(
        node.metrics_addr,
        "validator",
        &node_cfg.hotkey,
        &node_cfg.hparams,
        chain.clone(),
    )
    .await?;
    let cfg = ValidatorConfig {
        node: node_cfg,
        max_miners_per_window: cli.own.max_miners.max(1),
        heldout_pages: cli.own.heldout_pages,
    };
    let (countdown_chain, bpw) = (chain.clone(), cfg.node.hparams.blocks_per_window);
    let mut v = Validator::new(cfg, chain).await.map_err(|e| {
        let config = e.is_config();
        let e = anyhow::Error::new(e).context("cannot start the validator");
        if config { e.context(bistro_train::cli::ConfigError("the validator's settings".into())) } else { e }
    })?;
    let json = node.log_format == bistro_train::cli::LogFormat::Json;
    v.on_event(move |e| print_event(e, json));
    let held = bistro_train::cli::spawn_countdown(node.log_format, countdown_chain, bpw, v.window());
    v.on_event(move |e| {
        if let ValidatorEvent::Followed(f) = e {
            held.followed(f);
        }
    });
    if let Some(board) = board {
        v.on_event(move |e| record(&board, e));
    }
    let stop = stop_on_ctrl_c();
    let scored = v.run(node.max_windows, Arc::clone(&stop)).await?;
    tracing::info!("stopped after scoring {scored} window(s)");
    Ok(())
}
