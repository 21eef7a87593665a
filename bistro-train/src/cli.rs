//! Command-line options and logging shared by the `miner` and `validator` binaries.

use std::path::PathBuf;

use bistro_chain::cli::ChainArgs;
use candle_core::Device;

use anyhow::Context;

use crate::hparams::HParams;
use crate::storage::BucketOptions;

/// The exit code of a node that stops on a configuration error: `EX_CONFIG` of BSD's
/// `sysexits.h`, what service managers and operators' scripts read as "fix the settings,
/// do not restart in a loop". Other errors exit with 1.
pub const EXIT_CONFIG: i32 = 78;

/// Marks an error as the operator's configuration (hyper-parameters, wallet, network,
/// bucket, device): the binaries exit with [`EXIT_CONFIG`] on it ([`exit_code`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The exit code for an error a node binary stopped on: [`EXIT_CONFIG`] when anything in
/// its chain is a configuration error ([`ConfigError`], a node's, chain's or hparams'
/// configuration error), else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    let config = e.downcast_ref::<ConfigError>().is_some()
        || e.chain().any(|c| {
            c.is::<ConfigError>()
                || c.is::<crate::hparams::HParamsError>()
                || c.downcast_ref::<crate::node::NodeError>().is_some_and(crate::node::NodeError::is_config)
                || matches!(c.downcast_ref::<bistro_chain::ChainError>(), Some(bistro_chain::ChainError::Config(_)))
        });
    if config { EXIT_CONFIG } else { 1 }
}

/// The binaries' version line: the crate version, the git commit they were built from, the
/// protocol version and whether CUDA is compiled in (`--version`, the build-info metric).
pub fn version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        format!(
            "{} (git {}, protocol {}, cuda {})",
            env!("CARGO_PKG_VERSION"),
            crate::GIT_HASH,
            crate::protocol::PROTOCOL_VERSION,
            if cfg!(feature = "cuda") { "on" } else { "off" }
        )
    })
}

/// Options a binary takes besides [`NodeArgs`] (the validator's `--max-miners`, ...): the
/// tools accept them too, so a tool runs with exactly the node's command line. The miner
/// has none (`NoExtra`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NoExtra {}

/// Operator tools both binaries offer besides running a node; `X` is the binary's own
/// options beyond [`NodeArgs`], accepted (and not needed) by the tools.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Tool<X: clap::Args = NoExtra> {
    /// The network's hyper-parameters: write a network's file, show what a node would run
    /// with, print its hash.
    #[command(subcommand)]
    Hparams(HparamsCmd),
    /// Check this node's set-up before running it: wallet, registration, permit and stake,
    /// bucket (own and as peers read it), commitment length, finality lag, clock, hparams
    /// against the lead's, CUDA. One line per check; exit 0 when none fails, 78 otherwise.
    Doctor {
        /// The node's options, exactly as it will be started with.
        #[command(flatten)]
        node: Box<NodeArgs>,
        /// The binary's own options (accepted, not checked).
        #[command(flatten)]
        extra: X,
    },
}

/// `hparams` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum HparamsCmd {
    /// Write a network's settings as TOML: `test` (BISTRO's testnet, commented) or `devnet`.
    Init {
        /// Which shipped settings.
        #[arg(long, default_value = "test")]
        network: String,
        /// Write to this file (refuses to overwrite) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show the settings a node with these options runs with, and their hashes.
    Show {
        /// The node's options.
        #[command(flatten)]
        node: Box<NodeArgs>,
    },
    /// Print the hparams hash every slice of this network carries (nodes with different
    /// hashes cannot work together).
    Hash {
        /// The node's options.
        #[command(flatten)]
        node: Box<NodeArgs>,
    },
}

/// Run an operator tool for a node of `role`.
pub async fn run_tool<X: clap::Args>(tool: &Tool<X>, role: crate::doctor::Role) -> anyhow::Result<()> {
    use std::io::Write;
    match tool {
        Tool::Hparams(HparamsCmd::Init { network, out }) => {
            let text = crate::hparams::shipped_text(network).ok_or_else(|| {
                let known: Vec<&str> =
                    std::iter::once("devnet").chain(crate::hparams::SHIPPED_FILES.iter().map(|(n, _)| *n)).collect();
                ConfigError(format!("no shipped settings for `{network}` (known: {})", known.join(", ")))
            })??;
            match out {
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|e| ConfigError(format!("cannot create {}: {e}", path.display())))?;
                    f.write_all(text.as_bytes())?;
                    eprintln!("wrote the {network} settings to {}", path.display());
                }
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
        }
        Tool::Hparams(HparamsCmd::Show { node }) => {
            let h = node.hparams().context(ConfigError("the hyper-parameters".into()))?;
            let model = bistro_model::ModelConfig::resolve(&h.model).context(ConfigError("the model".into()))?;
            println!("# network `{}`", h.network);
            println!("# hparams hash {}", h.hash()?);
            println!("# model config hash {} ({} parameters)", model.hash()?, model.num_params());
            print!("{}", toml::to_string(&h).map_err(|e| anyhow::anyhow!("cannot serialise the hparams: {e}"))?);
        }
        Tool::Hparams(HparamsCmd::Hash { node }) => {
            let h = node.hparams().context(ConfigError("the hyper-parameters".into()))?;
            println!("{}", h.hash()?);
        }
        Tool::Doctor { node, .. } => {
            let report = crate::doctor::run(node, role).await;
            print!("{}", report.render());
            if report.failures() > 0 {
                return Err(ConfigError(format!("doctor: {} check(s) failed", report.failures())).into());
            }
        }
    }
    Ok(())
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Options every BISTRO node takes.
// The doc comments are also `--help` text, where `<hotkey>` reads as a placeholder.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// Chain and wallet.
    #[command(flatten)]
    pub chain: ChainArgs,

    /// This node's bucket URL: file:///path, s3://bucket/prefix?endpoint=..&region=.., or a
    /// plain directory [default: .bistro/buckets/<hotkey>]
    #[arg(long, env = "BISTRO_BUCKET")]
    pub bucket: Option<String>,

    /// S3 access key id of this node's bucket (else BISTRO_S3_ACCESS_KEY_ID / AWS_ACCESS_KEY_ID).
    #[arg(long = "s3.access-key", env = "BISTRO_S3_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key: Option<String>,

    /// S3 secret of this node's bucket. Prefer BISTRO_S3_SECRET_ACCESS_KEY (or
    /// AWS_SECRET_ACCESS_KEY) or --s3.secret-key-file: a secret given here shows in process
    /// lists, and the node warns about it. Peers' buckets are never read with it.
    #[arg(long = "s3.secret-key", hide_env_values = true)]
    pub s3_secret_key: Option<crate::storage::Secret>,

    /// A file holding the S3 secret of this node's bucket (first line).
    #[arg(long = "s3.secret-key-file", env = "BISTRO_S3_SECRET_KEY_FILE")]
    pub s3_secret_key_file: Option<PathBuf>,

    /// Read peers' endpoints even when they are internal addresses (loopback, private,
    /// link-local). Always on for the local devnet; on a real network only for a private
    /// deployment.
    #[arg(long = "allow-private-endpoints", env = "BISTRO_ALLOW_PRIVATE_ENDPOINTS")]
    pub allow_private_endpoints: bool,

    /// Compute device: auto (CUDA when built with it and present, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", env = "BISTRO_DEVICE")]
    pub device: String,

    /// Protocol hyper-parameters (TOML). Every node of a network must use the same file
    /// (`hparams init` writes one). Required on finney and custom endpoints [default: the
    /// embedded settings of the devnet, or of BISTRO's testnet on `test`]
    #[arg(long, env = "BISTRO_HPARAMS")]
    pub hparams: Option<PathBuf>,

    /// Model preset (tiny, small, 125m, 1b) or config file: on the devnet it overrides the
    /// hparams' model; elsewhere it must agree with them (the network's hash covers it).
    #[arg(long, env = "BISTRO_MODEL")]
    pub model: Option<String>,

    /// Dataset: `embedded` or a path to .jsonl/.jsonl.gz/.txt files: on the devnet it
    /// overrides the hparams' dataset; elsewhere it must agree with them.
    #[arg(long, env = "BISTRO_DATA")]
    pub data: Option<String>,

    /// Stop cleanly after this many windows (exit 0).
    #[arg(long = "max-windows", env = "BISTRO_MAX_WINDOWS")]
    pub max_windows: Option<u64>,

    /// Directory for local state [default: .bistro/<role>s/<hotkey>]
    #[arg(long = "state-dir", env = "BISTRO_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Rows per micro-batch (gradient accumulation keeps memory bounded).
    #[arg(long = "micro-batch", default_value_t = 8, env = "BISTRO_MICRO_BATCH")]
    pub micro_batch: usize,

    /// Log format.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Pretty, env = "BISTRO_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics (/metrics), the node's status (/status.json) and a live
    /// page (/) on this address; without a value 127.0.0.1:9616 [default: off]
    #[arg(
        long = "metrics.addr",
        num_args = 0..=1,
        default_missing_value = "127.0.0.1:9616",
        env = "BISTRO_METRICS_ADDR"
    )]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl NodeArgs {
    /// The hyper-parameters: the file, else the embedded settings of the network
    /// ([`crate::hparams::shipped`]: the devnet's, BISTRO's testnet on `test`). On the devnet
    /// `--model` and `--data` override them; on any other network they must agree with them,
    /// and devnet settings are refused (every node's hash must match, and nothing is
    /// changed behind the operator's back).
    pub fn hparams(&self) -> anyhow::Result<HParams> {
        let devnet = self.chain.is_devnet();
        if !devnet {
            // An unknown network name first: its settings cannot be right either.
            self.chain.endpoint()?;
        }
        let mut h = match &self.hparams {
            Some(p) => HParams::from_file(p)?,
            None => match crate::hparams::shipped(&self.chain.network) {
                Some(h) => h?,
                None => anyhow::bail!(
                    "--hparams FILE is required on {}: every node of a network must share its settings \
                     (windows, budgets, tolerance, model). Ask the subnet owner for the file, or start from \
                     `hparams init --network test --out network.toml`",
                    self.chain.network
                ),
            },
        };
        for (flag, given, field) in [("--model", &self.model, &mut h.model), ("--data", &self.data, &mut h.dataset)] {
            let Some(given) = given else { continue };
            if devnet {
                *field = given.clone();
            } else if given != field {
                anyhow::bail!(
                    "{flag} {given} contradicts the network's hparams ({field}): off the devnet the model and \
                     data are the network's, fixed by its hparams file (leave {flag} out)"
                );
            }
        }
        if !devnet && h.network == "devnet" {
            anyhow::bail!(
                "the hparams name the network `devnet`, but this node runs on {}: devnet settings do not fit a \
                 real chain (4 s blocks, a 2 s upload grace). Use the network's file (`hparams init --network \
                 test` writes BISTRO's testnet settings)",
                self.chain.network
            );
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

    /// Credentials and transfer settings for this node's own bucket: the secret from
    /// `--s3.secret-key-file`, else the flag (with a warning), else the environment.
    pub fn bucket_options(&self) -> anyhow::Result<BucketOptions> {
        let secret = match (&self.s3_secret_key_file, &self.s3_secret_key) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read --s3.secret-key-file {}: {e}", path.display()))?;
                Some(crate::storage::Secret::new(text.lines().next().unwrap_or_default().trim()))
            }
            (None, Some(s)) => {
                tracing::warn!(
                    "the S3 secret was given on the command line, where process lists show it; \
                     use BISTRO_S3_SECRET_ACCESS_KEY or --s3.secret-key-file instead"
                );
                Some(s.clone())
            }
            (None, None) => None,
        };
        Ok(BucketOptions { access_key_id: self.s3_access_key.clone(), secret_access_key: secret, ..Default::default() })
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
        if self.log_format == LogFormat::Pretty && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            install_download_bars();
        }
        let config = |what: &str| ConfigError(what.to_string());
        let hparams = self.hparams().context(config("the hyper-parameters"))?;
        let netuid = self.chain.netuid().context(config("the subnet"))?;
        let hotkey = self.chain.hotkey(role).context(config("the wallet and network"))?;
        let device = self.device().context(config("--device"))?;
        let chain = self.chain.connect(role).await?;
        if !self.chain.is_devnet() {
            let newest = chain.block_number().await?;
            let produced = chain.block_time_unix_ms(newest).await?;
            check_finality_lag(hparams.upload_grace_secs, crate::node::now_ms(), produced)?;
        }
        tracing::info!(
            "BISTRO {role} {hotkey} on {} (netuid {}), model {}, device {}",
            chain.describe(),
            netuid,
            hparams.model,
            bistro_model::device_name(&device)
        );
        let cfg = self
            .node_config(role, hotkey, hparams, device, self.chain.is_devnet().then_some(devnet_stake))
            .context(config("the bucket"))?;
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
            netuid: self.chain.netuid()?,
            bucket_url: self.bucket_url(&hotkey)?,
            bucket_options: self.bucket_options()?,
            state_dir: self.state_dir(role, &hotkey),
            device,
            micro_batch_rows: self.micro_batch,
            auto_register,
            allow_local_buckets: self.chain.is_devnet(),
            allow_private_endpoints: self.chain.is_devnet() || self.allow_private_endpoints,
            hotkey,
            hparams,
        })
    }

    /// The compute device.
    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(bistro_model::parse_device(&self.device)?)
    }
}

/// The terminal progress bar (window countdown), when one is shown.
static BAR: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();

/// Writes log lines to stderr, lifting the progress bar out of the way while it does.
struct BarAwareStderr;

impl std::io::Write for BarAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BAR.get() {
            Some(bar) => bar.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The window a node's state has reached, as the countdown bar reads it: the node's window
/// at start, then the one after each window it follows.
#[derive(Clone, Debug)]
pub struct HeldWindow(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl HeldWindow {
    /// Record that the node followed (applied, or found no update for) `f`'s window.
    pub fn followed(&self, f: &crate::node::Followed) {
        self.0.store(f.window() + 1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Show a window countdown bar on a terminal (never under `--log-format json` or when
/// stderr is not a TTY): the block within the window, the window, and how far the node's
/// state is behind (catch-up). The node's state starts at `start_window`; feed every
/// followed window to the returned [`HeldWindow`].
pub fn spawn_countdown(
    format: LogFormat,
    chain: std::sync::Arc<dyn bistro_chain::Chain>,
    blocks_per_window: u64,
    start_window: u64,
) -> HeldWindow {
    let held = HeldWindow(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(start_window)));
    if format != LogFormat::Pretty || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return held;
    }
    let state_window = held.0.clone();
    let bpw = blocks_per_window.max(1);
    let bar = indicatif::ProgressBar::new(bpw);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] block {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let bar = BAR.get_or_init(|| bar).clone();
    tokio::spawn(async move {
        loop {
            if let Ok(n) = chain.block_number().await {
                let w = n / bpw;
                let held = state_window.load(std::sync::atomic::Ordering::Relaxed);
                bar.set_prefix(format!("window {w}"));
                bar.set_position(n % bpw + 1);
                bar.set_message(if w > held + 1 {
                    format!("catching up: {} window(s) behind", w - held)
                } else {
                    String::new()
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    });
    held
}

/// Show large downloads (checkpoints) as progress bars on the terminal, one per object,
/// with a log line when each completes.
fn install_download_bars() {
    use std::collections::HashMap;
    let bars: std::sync::Mutex<HashMap<String, indicatif::ProgressBar>> = Default::default();
    crate::storage::set_progress_hook(Some(std::sync::Arc::new(move |p: &crate::storage::DownloadProgress| {
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(p.key.clone()).or_insert_with(|| {
            let b = indicatif::ProgressBar::new(p.total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(format!("downloading {}", p.key));
            b
        });
        bar.set_position(p.done);
        if p.resumes > 0 {
            bar.set_message(format!("downloading {} (resumed {}x)", p.key, p.resumes));
        }
        if p.finished {
            bar.finish_and_clear();
            bars.remove(&p.key);
            tracing::info!(
                "downloaded {} from {}: {:.1} MB in {:.1} s{}",
                p.key,
                p.bucket,
                p.total as f64 / 1e6,
                p.elapsed.as_secs_f64(),
                if p.resumes > 0 { format!(", resumed {} time(s)", p.resumes) } else { String::new() }
            );
        }
    })));
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
        .with_writer(|| BarAwareStderr);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A flag set by the first Ctrl-C or SIGTERM (finish the current step, save state, exit 0:
/// what `docker stop`, systemd and Kubernetes send); a second one exits at once (130 after
/// Ctrl-C, 143 after SIGTERM).
pub fn stop_on_ctrl_c() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term = terminate_signal();
        let first = stop_signal(&mut term).await;
        tracing::warn!("{first}: finishing the current step and saving state (send it again to quit now)");
        flag.store(true, Ordering::Relaxed);
        let code = if stop_signal(&mut term).await == "Ctrl-C" { 130 } else { 143 };
        std::process::exit(code);
    });
    stop
}

#[cfg(unix)]
type Terminate = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Terminate = ();

#[cfg(unix)]
fn terminate_signal() -> Terminate {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
}
#[cfg(not(unix))]
fn terminate_signal() -> Terminate {}

/// The next Ctrl-C or SIGTERM, by name.
async fn stop_signal(term: &mut Terminate) -> &'static str {
    #[cfg(unix)]
    {
        let sigterm = async {
            match term {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_ok() { "Ctrl-C" } else { std::future::pending().await },
            _ = sigterm => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = term;
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}

/// Start the status server when `--metrics.addr` was given: installs the Prometheus
/// recorder, serves `/metrics`, `/status.json` and `/`, and keeps the board's block and
/// chain window fresh. Returns the board to feed with the node's events.
pub async fn start_status(
    addr: Option<std::net::SocketAddr>,
    role: &str,
    hotkey: &str,
    hparams: &HParams,
    chain: std::sync::Arc<dyn bistro_chain::Chain>,
) -> anyhow::Result<Option<crate::status::StatusBoard>> {
    let Some(addr) = addr else { return Ok(None) };
    let board = crate::status::StatusBoard::new(role, hotkey, hparams.blocks_per_window);
    // Per-miner series idle for 20 windows (hotkeys that left) are dropped.
    let window_secs = chain.block_time().as_secs_f64() * hparams.blocks_per_window as f64;
    let idle = std::time::Duration::from_secs_f64((20.0 * window_secs).max(60.0));
    let render = crate::status::install_prometheus(idle).map_err(anyhow::Error::msg)?;
    let bound = crate::status::serve(addr, board.clone(), render)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!("metrics at http://{bound}/metrics, status page at http://{bound}/");
    crate::telemetry::record_build_info(
        role,
        &hparams.hash().map_err(anyhow::Error::msg)?,
        &hparams.network,
        &hparams.model,
    );
    let (b, bpw) = (board.clone(), hparams.blocks_per_window.max(1));
    tokio::spawn(async move {
        loop {
            if let Ok(n) = chain.block_number().await {
                metrics::gauge!(crate::telemetry::BLOCK).set(n as f64);
                b.update(|s| {
                    s.block = n;
                    s.chain_window = n / bpw;
                    let behind = s.chain_window > s.window + 1;
                    if behind {
                        s.banner =
                            Some(format!("catching up: {} window(s) behind the chain", s.chain_window - s.window));
                        s.banner_level = Some("warn".into());
                    } else if s.banner.as_deref().is_some_and(|x| x.starts_with("catching up")) {
                        s.banner = None;
                        s.banner_level = None;
                    }
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    Ok(Some(board))
}

/// Record a node's accepted-set outcome on the status board (window figures, banner, counts).
pub fn board_followed(board: &crate::status::StatusBoard, f: &crate::node::Followed) {
    use crate::node::Followed;
    let w = f.window();
    board.window(w, |x| match f {
        Followed::Applied { from, set, .. } => {
            x.outcome = Some("applied".into());
            x.from = Some(from.clone());
            x.included = Some(set.included.len());
            x.excluded = Some(set.excluded.len());
        }
        Followed::NoUpdate { .. } => x.outcome = Some("no update".into()),
        Followed::Forked { .. } => x.outcome = Some("forked".into()),
    });
    board.update(|s| {
        s.window = w + 1;
        match f {
            Followed::Applied { set, repaired, .. } => {
                s.state_hash = set.state.clone();
                if *repaired {
                    s.forks += 1;
                    s.repairs += 1;
                }
            }
            Followed::Forked { .. } => s.forks += 1,
            Followed::NoUpdate { .. } => {}
        }
        s.phase = "idle".into();
        let recent: Vec<&str> = s.windows.iter().rev().take(2).filter_map(|x| x.outcome.as_deref()).collect();
        let (banner, level) = match f {
            Followed::Forked { reason, .. } => (Some(format!("FORKED at window {w}: {reason}")), "bad"),
            _ if recent.len() == 2 && recent.iter().all(|o| *o == "no update") => {
                (Some("aggregates missing: no accepted set for the last 2 windows".to_string()), "warn")
            }
            _ => (None, ""),
        };
        if banner.is_some() || !s.banner.as_deref().is_some_and(|b| b.starts_with("catching up")) {
            s.banner = banner;
            s.banner_level = (!level.is_empty()).then(|| level.to_string());
        }
    });
    if let Followed::Applied { set, .. } = f {
        board.count("included slices", set.included.len() as u64);
        for x in &set.excluded {
            board.count(&format!("excluded: {}", x.reason), 1);
        }
    }
}

/// A node sees blocks only once they are final; the slice seed of a window exists on the
/// best chain earlier. The upload grace must exceed that lag (observed as the age of the
/// newest block this node can read), or miners who follow finality upload after the
/// deadline while an attacker on the best head had the seed before them.
pub fn check_finality_lag(upload_grace_secs: u64, now_ms: u64, newest_block_ms: u64) -> anyhow::Result<()> {
    let lag_ms = now_ms.saturating_sub(newest_block_ms);
    if lag_ms >= upload_grace_secs * 1000 {
        anyhow::bail!(
            "upload_grace_secs = {upload_grace_secs} s does not exceed the finality lag this node observes ({:.1} s \
             since the newest final block): raise it in the network's hparams file",
            lag_ms as f64 / 1000.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Args {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn a_secret_flag_never_shows_in_debug_output() {
        let a =
            Args::try_parse_from(["miner", "--s3.secret-key", "s3cr3t-flag-value", "--s3.access-key", "AKID"]).unwrap();
        let shown = format!("{a:?} {:?}", a.node.bucket_options().unwrap());
        assert!(!shown.contains("s3cr3t-flag-value"), "{shown}");
        assert!(shown.contains("AKID"));
    }

    #[test]
    fn the_upload_grace_must_exceed_the_finality_lag() {
        assert!(check_finality_lag(3, 100_000, 99_000).is_ok());
        let e = check_finality_lag(3, 100_000, 90_000).unwrap_err().to_string();
        assert!(e.contains("upload_grace_secs = 3") && e.contains("10.0 s"), "{e}");
    }
}
