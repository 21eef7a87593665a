//! The whole network on one machine: N miners (some of them cheating) and M validators on
//! a fresh local devnet, run window by window in lockstep in one process, with a report of
//! held-out loss, every miner's `R`, `e` and weight, and a centralised reference.
//!
//! Honest miners are the library's [`Miner`] unchanged (`compute_gradient`, `build_slice`,
//! `upload_slice`, `merge_now`); cheaters craft what they upload from the same pieces.
//! Validators are a [`Node`] plus the library's [`Scorer`] and [`Scoreboard`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::data::Page;
use bistro_train::hparams::HParams;
use bistro_train::miner::{Miner, MinerConfig};
use bistro_train::node::{Node, NodeConfig};
use bistro_train::slices::{self, SliceIndices};
use bistro_train::step::{self, WindowGradient};
use bistro_train::storage::BucketOptions;
use bistro_validate::score::{Scoreboard, honesty_score, quantize};
use bistro_validate::validator::{Scorer, miners_of};
use candle_core::Device;
use serde::Serialize;

/// How a miner behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The library, unchanged.
    Honest,
    /// Never uploads.
    Idle,
    /// Uploads all-zero values.
    Zeros,
    /// Uploads its weights plus random noise.
    Noise,
    /// Re-uploads the first honest miner's slice under its own name.
    Copycat,
    /// Builds this window's slice from the previous window's gradient.
    Stale,
    /// Trains on pages that are not its own.
    WrongPages,
    /// Trains on half of its pages.
    Lazy,
    /// Uploads huge values.
    Poison,
    /// Uploads before the seed exists, guessing the indices.
    Early,
}

impl Strategy {
    /// Every cheating strategy.
    pub const CHEATS: [Strategy; 9] = [
        Strategy::Idle,
        Strategy::Zeros,
        Strategy::Noise,
        Strategy::Copycat,
        Strategy::Stale,
        Strategy::WrongPages,
        Strategy::Lazy,
        Strategy::Poison,
        Strategy::Early,
    ];

    /// The strategy's name (`wrong-pages`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Honest => "honest",
            Strategy::Idle => "idle",
            Strategy::Zeros => "zeros",
            Strategy::Noise => "noise",
            Strategy::Copycat => "copycat",
            Strategy::Stale => "stale",
            Strategy::WrongPages => "wrong-pages",
            Strategy::Lazy => "lazy",
            Strategy::Poison => "poison",
            Strategy::Early => "early",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        std::iter::once(Strategy::Honest).chain(Strategy::CHEATS).find(|x| x.name() == s).ok_or_else(|| {
            format!("unknown strategy `{s}` (known: honest, {})", Strategy::CHEATS.map(|c| c.name()).join(", "))
        })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DevnetOptions {
    /// Honest miners.
    pub miners: usize,
    /// Validators.
    pub validators: usize,
    /// Windows to run.
    pub windows: u64,
    /// Model preset or config file.
    pub model: String,
    /// Slice compression.
    pub compression: usize,
    /// One extra miner per listed strategy.
    pub adversaries: Vec<Strategy>,
    /// Working directory (devnet state, buckets, node state).
    pub dir: PathBuf,
    /// Protocol constants (model and compression are overridden by the fields above).
    pub hparams: HParams,
    /// Pages in the held-out set.
    pub heldout_pages: usize,
}

impl DevnetOptions {
    /// Defaults: 4 honest miners, 1 validator, 10 windows of the `tiny` model at compression 8.
    pub fn new(dir: &Path) -> Self {
        DevnetOptions {
            miners: 4,
            validators: 1,
            windows: 10,
            model: "tiny".into(),
            compression: 8,
            adversaries: Vec::new(),
            dir: dir.to_path_buf(),
            hparams: HParams::default(),
            heldout_pages: 8,
        }
    }
}

/// One miner in one window, as validator 0 saw it.
#[derive(Clone, Debug, Serialize)]
pub struct MinerRow {
    /// uid.
    pub uid: u16,
    /// hotkey.
    pub hotkey: String,
    /// Strategy.
    pub strategy: Strategy,
    /// `ok` or the rejection code.
    pub status: String,
    /// `R = -||g_m - g_v||`.
    pub r: f64,
    /// Relative error.
    pub e: f64,
    /// Weight share after this window.
    pub weight: f64,
}

/// One window of the run.
#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    /// The window.
    pub window: u64,
    /// Held-out loss of the shared model at the start of the window.
    pub heldout_loss: f64,
    /// Held-out loss of the centralised reference at the start of the window.
    pub reference_loss: f64,
    /// Largest |shared - reference| over all parameters after the window.
    pub max_abs_diff_vs_reference: f64,
    /// Every miner.
    pub miners: Vec<MinerRow>,
    /// Hotkeys whose slices were merged.
    pub accepted: Vec<String>,
    /// Slices not merged, with the reason.
    pub rejected: Vec<(String, String)>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Model preset or file.
    pub model: String,
    /// Compression.
    pub compression: usize,
    /// Per window.
    pub windows: Vec<WindowReport>,
    /// Final weight share per miner hotkey (validator 0).
    pub shares: BTreeMap<String, f64>,
    /// Strategy per miner hotkey.
    pub strategies: BTreeMap<String, Strategy>,
    /// Whether every node (miners and validators) ended with bit-identical parameters.
    pub all_nodes_identical: bool,
    /// Held-out loss at the end.
    pub final_heldout_loss: f64,
    /// Held-out loss of the reference at the end.
    pub final_reference_loss: f64,
}

impl Report {
    /// A readable summary table.
    pub fn summary(&self) -> String {
        let mut s =
            format!("devnet: model {}, compression {}, {} windows\n", self.model, self.compression, self.windows.len());
        s.push_str("window  held-out loss  reference loss  max |shared - reference|\n");
        for w in &self.windows {
            s.push_str(&format!(
                "{:>6}  {:>13.4}  {:>14.4}  {:>24.3e}\n",
                w.window, w.heldout_loss, w.reference_loss, w.max_abs_diff_vs_reference
            ));
        }
        s.push_str(&format!("final  {:>13.4}  {:>14.4}\n\n", self.final_heldout_loss, self.final_reference_loss));
        s.push_str("miner                 strategy      mean e      last status   weight share\n");
        for (hk, share) in &self.shares {
            let es: Vec<f64> =
                self.windows.iter().flat_map(|w| w.miners.iter().filter(|m| &m.hotkey == hk).map(|m| m.e)).collect();
            let mean_e = es.iter().sum::<f64>() / es.len().max(1) as f64;
            let status = self
                .windows
                .last()
                .and_then(|w| w.miners.iter().find(|m| &m.hotkey == hk))
                .map(|m| m.status.clone())
                .unwrap_or_default();
            s.push_str(&format!(
                "{:<20}  {:<12}  {:>9.3e}  {:<12}  {:>12.5}\n",
                hk,
                self.strategies[hk].name(),
                mean_e,
                status,
                share
            ));
        }
        s.push_str(&format!("all nodes hold bit-identical parameters: {}\n", self.all_nodes_identical));
        s
    }

    /// An SVG with held-out loss per window and the final weight share per miner.
    pub fn svg(&self) -> String {
        let shared: Vec<(f64, f64)> = self.windows.iter().map(|w| (w.window as f64, w.heldout_loss)).collect();
        let reference: Vec<(f64, f64)> = self.windows.iter().map(|w| (w.window as f64, w.reference_loss)).collect();
        let bars: Vec<(String, f64)> = self.shares.iter().map(|(h, v)| (h.clone(), *v)).collect();
        crate::svg::chart(
            &format!("held-out loss ({}, compression {})", self.model, self.compression),
            "window",
            &[
                crate::svg::Series { label: "devnet", color: "#c0392b", points: shared },
                crate::svg::Series { label: "reference", color: "#2471a3", points: reference },
            ],
            "final weight share",
            &bars,
        )
    }
}

fn gradient_on(params: &Params, node: &Node, pages: &[Page]) -> anyhow::Result<WindowGradient> {
    let h = &node.cfg.hparams;
    let batch = node.dataset.window_batch(&node.tokenizer, pages, h.seq_len)?;
    let model = Llama::new(params)?;
    Ok(step::window_gradient(&model, params, &batch, node.cfg.micro_batch_rows, &node.cfg.device, || true)?)
}

fn mean_loss(params: &Params, node: &Node, pages: &[Page]) -> anyhow::Result<f64> {
    let h = &node.cfg.hparams;
    let batch = node.dataset.window_batch(&node.tokenizer, pages, h.seq_len)?;
    let model = Llama::new(params)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for r in batch.micro_batches(16) {
        let (ids, labels) = batch.tensors(r, &node.cfg.device)?;
        let (s, c) = model.loss_sum(&ids, &labels)?;
        sum += s.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n += c;
    }
    Ok(sum / n.max(1) as f64)
}

fn same_bits(a: &Params, b: &Params) -> anyhow::Result<bool> {
    for i in 0..a.len() {
        let (x, y) = (a.to_vec(i)?, b.to_vec(i)?);
        if x.iter().zip(&y).any(|(p, q)| p.to_bits() != q.to_bits()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn max_abs_diff(a: &Params, b: &Params) -> anyhow::Result<f64> {
    let mut m = 0f64;
    for i in 0..a.len() {
        let (x, y) = (a.to_vec(i)?, b.to_vec(i)?);
        for (p, q) in x.iter().zip(&y) {
            m = m.max((*p as f64 - *q as f64).abs());
        }
    }
    Ok(m)
}

fn node_config(opts: &DevnetOptions, h: &HParams, hotkey: &str, role: &str, stake: u64) -> anyhow::Result<NodeConfig> {
    let bucket = std::path::absolute(opts.dir.join("buckets").join(hotkey))?;
    Ok(NodeConfig {
        hparams: h.clone(),
        netuid: 1,
        hotkey: hotkey.to_string(),
        bucket_url: format!("file://{}", bucket.display()),
        bucket_options: BucketOptions::default(),
        state_dir: opts.dir.join(format!("{role}s")).join(hotkey),
        device: Device::Cpu,
        micro_batch_rows: 8,
        auto_register: Some(stake),
        allow_local_buckets: true,
    })
}

struct MinerSlot {
    miner: Miner,
    strategy: Strategy,
    last_grad: Option<WindowGradient>,
}

/// Run the devnet in lockstep in this process and return the report.
pub async fn run_in_process(opts: &DevnetOptions) -> anyhow::Result<Report> {
    if opts.miners == 0 && opts.adversaries.is_empty() {
        bail!("no miners to run");
    }
    if opts.validators == 0 {
        bail!("at least one validator is needed to score");
    }
    let mut h = opts.hparams.clone();
    h.model = opts.model.clone();
    h.compression = opts.compression;
    // Lockstep: every upload happens before its window is merged, so no deadline applies.
    h.upload_grace_secs = 10_000_000;
    h.validate()?;
    std::fs::create_dir_all(&opts.dir)?;
    // Fast blocks: seeds exist as soon as the lockstep driver asks for them.
    let chain = Arc::new(Devnet::open(&opts.dir.join("devnet"), Duration::from_millis(20))?);
    let dyn_chain: Arc<dyn Chain> = chain.clone();
    let mut strategies = BTreeMap::new();
    let mut slots = Vec::new();
    let plan: Vec<Strategy> =
        std::iter::repeat_n(Strategy::Honest, opts.miners).chain(opts.adversaries.iter().copied()).collect();
    for (i, s) in plan.iter().enumerate() {
        let hotkey = format!("m{i:02}-{}", s.name());
        let cfg: MinerConfig = node_config(opts, &h, &hotkey, "miner", 0)?;
        let miner = Miner::new(cfg, dyn_chain.clone()).await.with_context(|| format!("starting {hotkey}"))?;
        strategies.insert(hotkey, *s);
        slots.push(MinerSlot { miner, strategy: *s, last_grad: None });
    }
    let mut validators = Vec::new();
    for v in 0..opts.validators {
        let hotkey = format!("validator-{v}");
        let node = Node::join(node_config(opts, &h, &hotkey, "validator", 1000)?, dyn_chain.clone(), "").await?;
        let scorer = Scorer {
            hparams: h.clone(),
            dataset: node.dataset.clone(),
            tokenizer: node.tokenizer.clone(),
            device: Device::Cpu,
            micro_batch_rows: 8,
        };
        validators.push((node, scorer, Scoreboard::default()));
    }
    let model_config = ModelConfig::resolve(&h.model)?;
    let reference = Params::genesis(&model_config, h.genesis_seed, &Device::Cpu)?;
    let heldout = validators[0].0.dataset.pages(&h.network, "bistro/held-out", u64::MAX, opts.heldout_pages);
    let stop = Arc::new(AtomicBool::new(false));
    let start = slots[0].miner.window();
    let mut reports = Vec::new();
    for w in start..start + opts.windows {
        let shared_loss = mean_loss(&validators[0].0.params, &validators[0].0, &heldout)?;
        let reference_loss = mean_loss(&reference, &validators[0].0, &heldout)?;
        // 1. Every miner trains on its pages at theta_w (cheaters do what cheaters do).
        let mut grads: Vec<Option<WindowGradient>> = Vec::new();
        for slot in slots.iter_mut() {
            let node = slot.miner.node();
            let own_pages = node.dataset.pages(&h.network, &node.cfg.hotkey, w, h.pages_per_window);
            let g = match slot.strategy {
                Strategy::Honest | Strategy::Copycat | Strategy::Noise | Strategy::Early => {
                    slot.miner.compute_gradient(&stop).await?
                }
                Strategy::Idle | Strategy::Zeros | Strategy::Poison => None,
                Strategy::WrongPages => {
                    let other = node.dataset.pages(&h.network, "someone-else", w, h.pages_per_window);
                    Some(gradient_on(&node.params, node, &other)?)
                }
                Strategy::Lazy => Some(gradient_on(&node.params, node, &own_pages[..own_pages.len().div_ceil(2)])?),
                Strategy::Stale => {
                    let fresh = slot.miner.compute_gradient(&stop).await?;
                    let old = slot.last_grad.take();
                    slot.last_grad = fresh;
                    old
                }
            };
            grads.push(g);
        }
        // 2. The window ends: the seed exists; miners upload.
        chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(30)).await?;
        let seed = validators[0].0.ctx.seed(w).await?;
        let guessed_seed = chain.block_hash(h.first_block(w)).await?;
        let mut first_honest_values: Option<Vec<Vec<f32>>> = None;
        for (slot, g) in slots.iter().zip(&grads) {
            let node = slot.miner.node();
            let names: Vec<String> = node.params.specs().iter().map(|s| s.name.clone()).collect();
            let meta = node.ctx.meta(w, &node.cfg.hotkey);
            let idx = SliceIndices::select(node.params.specs(), &seed, h.compression);
            let theta = slices::gather_params(&node.params, &idx)?;
            let encode =
                |values: &[Vec<f32>]| slices::encode(&meta, &names, values).map_err(|e| anyhow::anyhow!("{e}"));
            let bytes = match (slot.strategy, g) {
                (Strategy::Honest, Some(g)) => {
                    let b = slot.miner.build_slice(&seed, g)?;
                    if first_honest_values.is_none() {
                        let exp = slices::expectation(&node.params, &idx, meta.clone(), u64::MAX);
                        first_honest_values = Some(slices::decode(&b, &exp).map_err(|e| anyhow::anyhow!("{e}"))?);
                    }
                    Some(b)
                }
                (Strategy::Idle, _) => None,
                (Strategy::Zeros, _) => Some(encode(&theta.iter().map(|t| vec![0.0; t.len()]).collect::<Vec<_>>())?),
                (Strategy::Poison, _) => {
                    Some(encode(&theta.iter().map(|t| t.iter().map(|x| x + 1e4).collect()).collect::<Vec<_>>())?)
                }
                (Strategy::Noise, Some(g)) => {
                    // The honest update's scale, in random directions.
                    let gi = slices::gather_grads(&g.grads, &idx)?;
                    let eta = h.learning_rate_at(w) as f32;
                    let mut x: u64 = 0x2545F4914F6CDD1D ^ w;
                    let v: Vec<Vec<f32>> = theta
                        .iter()
                        .zip(&gi)
                        .map(|(t, gg)| {
                            t.iter()
                                .zip(gg)
                                .map(|(&a, &b)| {
                                    x ^= x << 13;
                                    x ^= x >> 7;
                                    x ^= x << 17;
                                    let r = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                                    a - eta * b.abs() * r * 1.7
                                })
                                .collect()
                        })
                        .collect();
                    Some(encode(&v)?)
                }
                (Strategy::Copycat, _) => match &first_honest_values {
                    Some(v) => Some(encode(v)?),
                    None => None,
                },
                (Strategy::Early, Some(g)) => Some(slot.miner.build_slice(&guessed_seed, g)?),
                (Strategy::Stale | Strategy::WrongPages | Strategy::Lazy, Some(g)) => {
                    Some(slot.miner.build_slice(&seed, g)?)
                }
                (_, None) => None,
            };
            if let Some(b) = bytes {
                slot.miner.upload_slice(b, u64::MAX, &stop).await;
            }
        }
        // 3. Validators merge and score; they keep theta_w for the recomputation.
        let mut rows = Vec::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for (vi, (node, scorer, board)) in validators.iter_mut().enumerate() {
            let (ws, theta_w) = node.merge_now(true).await?;
            let theta_w = theta_w.context("theta_w kept")?;
            let mg = chain.metagraph(1).await?;
            let results = scorer.score(&theta_w, &ws, &miners_of(&mg), &stop)?;
            for r in &results {
                board.update(r.uid, &r.hotkey, w, honesty_score(r.e, h.honest_tolerance), h.ema_alpha);
            }
            let weights = board.weights(h.temperature);
            if (w + 1) % h.windows_per_weights == 0 {
                let (uids, q) = quantize(&weights);
                chain.set_weights(1, &node.cfg.hotkey, &uids, &q, 1).await?;
            }
            if vi == 0 {
                accepted = bistro_train::node::accepted_of(&ws);
                rejected = bistro_train::node::rejected_of(&ws);
                for r in results {
                    let weight = weights.iter().find(|(u, _)| *u == r.uid).map(|(_, x)| *x).unwrap_or(0.0);
                    let strategy = strategies.get(&r.hotkey).copied().unwrap_or(Strategy::Honest);
                    rows.push(MinerRow {
                        uid: r.uid,
                        hotkey: r.hotkey,
                        strategy,
                        status: r.status,
                        r: r.r,
                        e: r.e,
                        weight,
                    });
                }
            }
        }
        // 4. Miners merge (the same computation as the validators).
        for slot in slots.iter_mut() {
            slot.miner.merge_now().await?;
        }
        // 5. The centralised reference: the same rule on the honest miners' pages.
        let idx = SliceIndices::select(reference.specs(), &seed, h.compression);
        let theta_ref = slices::gather_params(&reference, &idx)?;
        let eta = h.learning_rate_at(w);
        let mut contributions = Vec::new();
        for slot in slots.iter().filter(|s| s.strategy == Strategy::Honest) {
            let node = slot.miner.node();
            let pages = node.dataset.pages(&h.network, &node.cfg.hotkey, w, h.pages_per_window);
            let g = gradient_on(&reference, node, &pages)?;
            let gi = slices::gather_grads(&g.grads, &idx)?;
            contributions.push(slices::Contribution {
                hotkey: node.cfg.hotkey.clone(),
                values: slices::step_values(&theta_ref, &gi, eta),
            });
        }
        let agg = slices::aggregate(&theta_ref, &contributions, &h.aggregation, h.outlier_norm_factor);
        slices::scatter_params(&reference, &idx, &agg.values)?;
        let diff = max_abs_diff(&validators[0].0.params, &reference)?;
        tracing::info!(window = w, heldout_loss = shared_loss, reference_loss, diff, "window done");
        reports.push(WindowReport {
            window: w,
            heldout_loss: shared_loss,
            reference_loss,
            max_abs_diff_vs_reference: diff,
            miners: rows,
            accepted,
            rejected,
        });
    }
    let v0 = &validators[0].0.params;
    let mut identical = true;
    for slot in &slots {
        identical &= same_bits(v0, slot.miner.params())?;
    }
    for (node, _, _) in &validators[1..] {
        identical &= same_bits(v0, &node.params)?;
    }
    let mut shares = BTreeMap::new();
    let last = reports.last().map(|r| r.miners.clone()).unwrap_or_default();
    for m in &last {
        shares.insert(m.hotkey.clone(), m.weight);
    }
    let final_heldout_loss = mean_loss(v0, &validators[0].0, &heldout)?;
    let final_reference_loss = mean_loss(&reference, &validators[0].0, &heldout)?;
    Ok(Report {
        model: opts.model.clone(),
        compression: opts.compression,
        windows: reports,
        shares,
        strategies,
        all_nodes_identical: identical,
        final_heldout_loss,
        final_reference_loss,
    })
}
