//! The learning lab: how much the shared model learns per byte under each candidate
//! protocol, at equal tokens, against centralised AdamW — and whether a validator can still
//! check every honest miner exactly.
//!
//! One process runs one *arm* (a way to train the shared model) over `windows` windows. Every
//! arm sees the same data: `miners` honest miners (hotkeys `m00-honest`, … as in the devnet)
//! with the devnet's page assignment per window, so equal windows mean equal tokens. The
//! held-out set is 32 pages (by default) of `bistro/held-out` that no training draw returns:
//! a training page overlapping one of them is replaced by the next page of the miner's draw.
//!
//! The pieces are the project's own: [`bistro_train::data`] for pages and batches,
//! [`bistro_train::step::window_gradient`] for every gradient, [`bistro_train::slices::SliceIndices`] for random
//! coordinates, [`bistro_train::slices::aggregate()`] for today's rule,
//! [`bistro_model::optim::AdamW`] for every AdamW, and [`bistro_train::slices::quant`] for
//! every quantised upload and its consistency check. See [`arm`] for the arms and
//! [`verify`] for the checks, [`report`] for the tables.

pub mod arm;
pub mod report;
pub mod verify;

use anyhow::{Context, bail};
use bistro_model::optim::AdamW;
use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::HParams;
use bistro_train::data::{Dataset, Page, TextTokenizer, WindowBatch};
use bistro_train::step;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use arm::{ArmSpec, run_arm};
pub use report::{ArmReport, LabTable};

/// Values of every parameter, flattened row-major, in canonical order.
pub type Flat = Vec<Vec<f32>>;

/// What the lab runs on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabOptions {
    /// Network name: the page-assignment key (`devnet`, `devnet-b` for a second page seed).
    pub network: String,
    /// Model preset.
    pub model: String,
    /// Windows to train.
    pub windows: u64,
    /// Honest miners.
    pub miners: usize,
    /// Held-out pages.
    pub heldout_pages: usize,
    /// Evaluate the held-out loss every this many windows (and at the end).
    pub eval_every: u64,
    /// Rows per micro-batch of the miners' gradients.
    pub micro_rows: usize,
    /// Rows per micro-batch of the validator's replay: another f32 summation order.
    pub replay_micro_rows: usize,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            network: "devnet".into(),
            model: "tiny".into(),
            windows: 384,
            miners: 4,
            heldout_pages: 32,
            eval_every: 32,
            micro_rows: 8,
            replay_micro_rows: 1,
        }
    }
}

/// The lab's data and model, shared by the arms of one run.
#[derive(Debug)]
pub struct Lab {
    /// The options.
    pub opts: LabOptions,
    /// Devnet hyper-parameters (pages per window, rows, sequence length, today's learning rate).
    pub hparams: HParams,
    /// The model's shape.
    pub config: ModelConfig,
    /// Miners' hotkeys.
    pub hotkeys: Vec<String>,
    /// `batches[w][m]`: miner `m`'s batch in window `w`.
    pub batches: Vec<Vec<WindowBatch>>,
    /// `pages[w][m]`: the pages behind them.
    pub pages: Vec<Vec<Vec<Page>>>,
    /// The held-out batch.
    pub heldout: WindowBatch,
    /// Training pages that were replaced because they overlapped a held-out page.
    pub redrawn: usize,
    /// Dataset and tokenizer (for adversaries that train on other pages).
    pub dataset: Dataset,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// Where tensors live.
    pub device: Device,
}

fn overlaps(a: &Page, b: &Page, rows: u64) -> bool {
    a.shard == b.shard && a.row_offset.abs_diff(b.row_offset) < rows
}

impl Lab {
    /// Load the embedded corpus and tokenizer and build every window's batches.
    pub fn new(opts: LabOptions) -> anyhow::Result<Self> {
        // The SGD arms (R1, R2) keep protocol v3's schedule (peak 0.5, cosine to 0.05 at
        // window 2000), the one they were measured with.
        let hparams = HParams {
            network: opts.network.clone(),
            model: opts.model.clone(),
            learning_rate: 0.5,
            min_learning_rate: 0.05,
            decay_windows: 2000,
            ..HParams::default()
        };
        let config = ModelConfig::resolve(&opts.model)?;
        let dataset = Dataset::embedded(hparams.rows_per_page)?;
        let tokenizer = TextTokenizer::embedded()?;
        let heldout_pages = dataset.pages(&opts.network, "bistro/held-out", u64::MAX, opts.heldout_pages);
        let heldout = dataset.window_batch(&tokenizer, &heldout_pages, hparams.seq_len)?;
        let hotkeys: Vec<String> = (0..opts.miners).map(|i| format!("m{i:02}-honest")).collect();
        let rows = hparams.rows_per_page as u64;
        let n = hparams.pages_per_window;
        let mut redrawn = 0;
        let (mut batches, mut pages) = (Vec::new(), Vec::new());
        for w in 0..opts.windows {
            let (mut bw, mut pw) = (Vec::new(), Vec::new());
            for hk in &hotkeys {
                let mut kept: Vec<Page> = Vec::with_capacity(n);
                for p in dataset.pages(&opts.network, hk, w, n + 64) {
                    if kept.len() == n {
                        break;
                    }
                    if heldout_pages.iter().any(|h| overlaps(&p, h, rows)) {
                        redrawn += 1;
                    } else {
                        kept.push(p);
                    }
                }
                if kept.len() < n {
                    bail!("window {w}, {hk}: could not draw {n} pages outside the held-out set");
                }
                bw.push(dataset.window_batch(&tokenizer, &kept, hparams.seq_len)?);
                pw.push(kept);
            }
            batches.push(bw);
            pages.push(pw);
        }
        Ok(Lab {
            opts,
            hparams,
            config,
            hotkeys,
            batches,
            pages,
            heldout,
            redrawn,
            dataset,
            tokenizer,
            device: Device::Cpu,
        })
    }

    /// The genesis model.
    pub fn genesis(&self) -> anyhow::Result<Params> {
        Ok(Params::genesis(&self.config, self.hparams.genesis_seed, &self.device)?)
    }

    /// The union of the miners' pages in window `w`, as one batch (centralised training).
    pub fn union_batch(&self, w: u64) -> anyhow::Result<WindowBatch> {
        let all: Vec<Page> = self.pages[w as usize].iter().flatten().copied().collect();
        Ok(self.dataset.window_batch(&self.tokenizer, &all, self.hparams.seq_len)?)
    }

    /// Miner `m`'s batch of window `w` built from pages of another window (an adversary's).
    pub fn other_pages_batch(&self, m: usize, w: u64) -> anyhow::Result<WindowBatch> {
        let p = self.dataset.pages(&self.opts.network, &self.hotkeys[m], w + 1_000_000, self.hparams.pages_per_window);
        Ok(self.dataset.window_batch(&self.tokenizer, &p, self.hparams.seq_len)?)
    }

    /// Tokens (prediction targets) per window over all miners, averaged over the run.
    pub fn tokens_per_window(&self) -> f64 {
        let t: usize = self.batches.iter().flatten().map(|b| b.n_targets).sum();
        t as f64 / self.batches.len().max(1) as f64
    }

    /// The public randomness of window `w` (the stand-in for the next block's hash).
    pub fn seed(&self, w: u64) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"bistro/lab/seed");
        h.update((self.opts.network.len() as u64).to_le_bytes());
        h.update(self.opts.network.as_bytes());
        h.update(w.to_le_bytes());
        h.finalize().into()
    }

    /// Mean held-out loss of `params` (nats per token).
    pub fn heldout_loss(&self, params: &Params) -> anyhow::Result<f64> {
        batch_loss(params, &self.heldout, &self.device)
    }
}

/// Mean loss of `params` over every target of `batch`.
pub fn batch_loss(params: &Params, batch: &WindowBatch, device: &Device) -> anyhow::Result<f64> {
    let model = Llama::new(params)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for r in batch.micro_batches(16) {
        let (ids, labels) = batch.tensors(r, device)?;
        let (s, c) = model.loss_sum(&ids, &labels)?;
        sum += s.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n += c;
    }
    Ok(sum / n.max(1) as f64)
}

/// The window gradient of `params` on `batch` in micro-batches of `micro_rows` rows.
pub fn gradient(params: &Params, batch: &WindowBatch, micro_rows: usize) -> anyhow::Result<Vec<Tensor>> {
    let model = Llama::new(params)?;
    Ok(step::window_gradient(&model, params, batch, micro_rows, params.device(), || true)?.grads)
}

/// The parameters as flat host vectors.
pub fn params_flat(p: &Params) -> anyhow::Result<Flat> {
    (0..p.len()).map(|i| Ok(p.to_vec(i)?)).collect()
}

/// Overwrite every parameter with `values`.
pub fn set_params(p: &Params, values: &[Vec<f32>]) -> anyhow::Result<()> {
    if values.len() != p.len() {
        bail!("{} tensors for {} parameters", values.len(), p.len());
    }
    for ((var, spec), v) in p.vars().iter().zip(p.specs()).zip(values) {
        var.set(&Tensor::from_slice(v, spec.shape.as_slice(), p.device())?).with_context(|| spec.name.clone())?;
    }
    Ok(())
}

/// One step of `opt` (over `p`'s variables) with the gradient `grads`.
pub fn adam_step(opt: &mut AdamW, p: &Params, grads: Vec<Tensor>) -> anyhow::Result<()> {
    let mut store = GradStore::default();
    for (var, g) in p.vars().iter().zip(grads) {
        store.insert(var.as_tensor(), g);
    }
    Ok(opt.step(&store)?)
}

/// A fresh AdamW over `p` (betas 0.9/0.95, weight decay 0.1, the lab's R0 settings).
pub fn adamw(p: &Params, lr: f64, eps: f64) -> anyhow::Result<AdamW> {
    let cfg = candle_nn::ParamsAdamW { lr, beta1: 0.9, beta2: 0.95, eps, weight_decay: 0.1 };
    Ok(AdamW::new(p.vars().to_vec(), cfg)?)
}

/// Linear warm-up over the first `warmup` windows, then `lr`.
pub fn warmup_lr(lr: f64, w: u64, warmup: u64) -> f64 {
    if w < warmup { lr * (w + 1) as f64 / warmup as f64 } else { lr }
}

/// `a - b` per coordinate.
pub fn sub(a: &Flat, b: &Flat) -> Flat {
    a.iter().zip(b).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect()).collect()
}

/// Euclidean norm over every coordinate.
pub fn norm(a: &Flat) -> f64 {
    a.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}
