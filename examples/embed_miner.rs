//! Embed a miner in your own program: three windows on the local devnet.
//!
//! ```bash
//! cargo run --release --example embed_miner
//! ```
//!
//! Start `cargo run --release --bin validator` in another terminal to see it scored.

use std::sync::{Arc, atomic::AtomicBool};
use std::time::Duration;

use bistro_chain::{Chain, devnet::Devnet};
use bistro_train::miner::{Miner, MinerConfig, MinerEvent};
use bistro_train::{HParams, storage::BucketOptions};

// The allocator and runtime settings the `miner` binary uses (mimalloc, then `tune()` and a
// tokio runtime, first thing in `main`). A program with its own `main` can skip this.
bistro_train::node_main!(run);

async fn run() -> anyhow::Result<()> {
    let chain: Arc<dyn Chain> = Arc::new(Devnet::open(".bistro/devnet".as_ref(), Duration::from_secs(4))?);
    let bucket = std::path::absolute(".bistro/buckets/embedded-miner")?;
    let cfg = MinerConfig {
        hparams: HParams::default(),
        netuid: 1,
        hotkey: "embedded-miner".into(),
        bucket_url: format!("file://{}", bucket.display()),
        bucket_options: BucketOptions::default(),
        state_dir: ".bistro/miners/embedded-miner".into(),
        device: candle_core::Device::Cpu,
        micro_batch_rows: 8,
        auto_register: Some(0),
        allow_local_buckets: true,
        allow_private_endpoints: true,
    };
    let mut miner = Miner::new(cfg, chain).await?;
    miner.on_event(|e| match e {
        MinerEvent::StepDone { window, loss, tokens_per_sec } => {
            println!("window {window}: loss {loss:.3} at {tokens_per_sec:.0} tokens/s")
        }
        MinerEvent::SliceUploaded { window, bytes, .. } => println!("window {window}: uploaded {bytes} bytes"),
        MinerEvent::Followed(f) => println!("{}", f.describe()),
        _ => {}
    });
    let summary = miner.run(Some(3), Arc::new(AtomicBool::new(false))).await?;
    println!("done: {summary:?}");
    Ok(())
}
