//! Command-line options and logging shared by the `miner` and `validator` binaries.

use std::path::PathBuf;

use bistro_chain::cli::ChainArgs;
use candle_core::Device;

use crate::hparams::HParams;
use crate::storage::BucketOptions;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Options every BISTRO node takes.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// Chain and wallet.
    #[command(flatten)]
    pub chain: ChainArgs,

    /// This node's bucket URL: file:///path, s3://bucket/prefix?endpoint=..&region=.., or a
    /// plain directory [default: .bistro/buckets/<hotkey>]
    #[arg(long)]
    pub bucket: Option<String>,

    /// S3 access key id (else BISTRO_S3_ACCESS_KEY_ID / AWS_ACCESS_KEY_ID).
    #[arg(long = "s3.access-key", env = "BISTRO_S3_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key: Option<String>,

    /// S3 secret access key (else BISTRO_S3_SECRET_ACCESS_KEY / AWS_SECRET_ACCESS_KEY).
    #[arg(long = "s3.secret-key", env = "BISTRO_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,

    /// Compute device: auto (CUDA when built with it and present, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Protocol hyper-parameters (TOML). Every node of a network must use the same file
    /// [default: the embedded devnet settings]
    #[arg(long)]
    pub hparams: Option<PathBuf>,

    /// Model preset (tiny, small, 125m, 1b) or config file; overrides the hparams' model.
    #[arg(long)]
    pub model: Option<String>,

    /// Dataset: `embedded` or a path to .jsonl/.jsonl.gz/.txt files; overrides the hparams' dataset.
    #[arg(long)]
    pub data: Option<String>,

    /// Stop cleanly after this many windows (exit 0).
    #[arg(long = "max-windows")]
    pub max_windows: Option<u64>,

    /// Directory for local state [default: .bistro/<role>s/<hotkey>]
    #[arg(long = "state-dir")]
    pub state_dir: Option<PathBuf>,

    /// Rows per micro-batch (gradient accumulation keeps memory bounded).
    #[arg(long = "micro-batch", default_value_t = 8)]
    pub micro_batch: usize,

    /// Log format.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

impl NodeArgs {
    /// The hyper-parameters: the file (or defaults) with `--model` and `--data` applied.
    pub fn hparams(&self) -> anyhow::Result<HParams> {
        let mut h = match &self.hparams {
            Some(p) => HParams::from_file(p)?,
            None => HParams::default(),
        };
        if let Some(m) = &self.model {
            h.model = m.clone();
        }
        if let Some(d) = &self.data {
            h.dataset = d.clone();
        }
        if !self.chain.is_devnet() && h.network == "devnet" {
            h.network = self.chain.network.clone();
        }
        h.validate()?;
        Ok(h)
    }

    /// The bucket URL, defaulting to `.bistro/buckets/<hotkey>` as an absolute file URL.
    pub fn bucket_url(&self, hotkey: &str) -> anyhow::Result<String> {
        match &self.bucket {
            Some(b) if b.contains("://") => Ok(b.clone()),
            Some(dir) => Ok(format!("file://{}", std::path::absolute(dir)?.display())),
            None => {
                Ok(format!("file://{}", std::path::absolute(PathBuf::from(".bistro/buckets").join(hotkey))?.display()))
            }
        }
    }

    /// Credentials and transfer settings for buckets.
    pub fn bucket_options(&self) -> BucketOptions {
        BucketOptions {
            access_key_id: self.s3_access_key.clone(),
            secret_access_key: self.s3_secret_key.clone(),
            ..Default::default()
        }
    }

    /// The state directory, defaulting to `.bistro/<role>s/<hotkey>`.
    pub fn state_dir(&self, role: &str, hotkey: &str) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(".bistro").join(format!("{role}s")).join(hotkey))
    }

    /// Everything a binary does before building its node: logging, hyper-parameters,
    /// hotkey, device and chain connection (for `role` = `miner` or `validator`), and the
    /// node settings with `auto_register` stake on a devnet.
    pub async fn prepare(
        &self,
        role: &str,
        devnet_stake: u64,
    ) -> anyhow::Result<(crate::node::NodeConfig, std::sync::Arc<dyn bistro_chain::Chain>)> {
        init_logging(self.log_format);
        let hparams = self.hparams()?;
        let hotkey = self.chain.hotkey(role)?;
        let device = self.device()?;
        let chain = self.chain.connect(role).await?;
        tracing::info!(
            "BISTRO {role} {hotkey} on {} (netuid {}), model {}, device {}",
            chain.describe(),
            self.chain.netuid,
            hparams.model,
            bistro_model::device_name(&device)
        );
        let cfg = self.node_config(role, hotkey, hparams, device, self.chain.is_devnet().then_some(devnet_stake))?;
        Ok((cfg, chain))
    }

    /// The settings of a node with `role` (`miner` or `validator`) and `hotkey`.
    pub fn node_config(
        &self,
        role: &str,
        hotkey: String,
        hparams: HParams,
        device: Device,
        auto_register: Option<u64>,
    ) -> anyhow::Result<crate::node::NodeConfig> {
        Ok(crate::node::NodeConfig {
            netuid: self.chain.netuid,
            bucket_url: self.bucket_url(&hotkey)?,
            bucket_options: self.bucket_options(),
            state_dir: self.state_dir(role, &hotkey),
            device,
            micro_batch_rows: self.micro_batch,
            auto_register,
            allow_local_buckets: self.chain.is_devnet(),
            hotkey,
            hparams,
        })
    }

    /// The compute device.
    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(bistro_model::parse_device(&self.device)?)
    }
}

/// Install the `tracing` subscriber (`RUST_LOG` overrides the default `info` level).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A flag set by the first Ctrl-C (finish cleanly); a second Ctrl-C exits at once.
pub fn stop_on_ctrl_c() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("Ctrl-C: finishing the current step and saving state (press again to quit now)");
            flag.store(true, Ordering::Relaxed);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    stop
}
