//! The arms: ways to train the shared model from the same pages.
//!
//! * R0 [`ArmSpec::AdamW`]: centralised AdamW on the union of the miners' pages, one step per window.
//! * R1/R2 [`ArmSpec::Sgd`]: today's protocol (random `1/compression` of `theta - eta g`, f32,
//!   the mean of the deltas); compression 1 is uncompressed SGD.
//! * D1 [`ArmSpec::QuantSlices`]: dithered `bits`-bit codes of the gradient at a random
//!   `1/c` of the coordinates (c chosen so the upload fits the budget), then a lazy AdamW
//!   step at those coordinates with public moments every node keeps.
//! * D2 [`ArmSpec::DiLoCo`]: rounds of `h` windows; each miner runs one inner AdamW step per
//!   window from the round's public model with fresh moments (`keep_moments` is the
//!   unverifiable control), uploads its dithered, quantised pseudo-gradient (`bits` 0: f32);
//!   the lead applies an outer Nesterov step with public momentum.
//! * D3 [`ArmSpec::SparseLoCo`]: D2's rounds with top-k per 4096-chunk of `beta e + delta`,
//!   quantised, error feedback `e` reset every `ef_reset` rounds (0: never, the control).
//!
//! With `verify`, a validator replays miner 0 through another micro-batch split every window
//! (D1) or round (D2, D3) and checks its codes; in one round the cheaters are checked too.

use std::time::Instant;

use anyhow::bail;
use bistro_model::Params;
use bistro_model::optim::AdamW;
use bistro_train::slices::quant::{Codec, Consistency, Quantised};
use bistro_train::slices::{self, SliceIndices, SliceMeta};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use super::report::ArmReport;
use super::verify::{self, AdversaryCheck, HonestCheck, TOLERANCES, VerifyReport};
use super::{Flat, Lab, adam_step, adamw, gradient, params_flat, set_params, sub, warmup_lr};

/// Today's upload budget: 1/300 of the model in f32, in bits per parameter per window.
pub const BUDGET_BITS: f64 = 32.0 / 300.0;

/// Windows of linear learning-rate warm-up for every AdamW in the lab.
pub const WARMUP: u64 = 5;

/// Values per chunk of D3's top-k selection.
pub const CHUNK: usize = 4096;

/// Bits of an index inside a chunk.
const INDEX_BITS: usize = 12;

/// One arm of the lab.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ArmSpec {
    /// R0: centralised AdamW.
    AdamW {
        /// Peak learning rate.
        lr: f64,
    },
    /// R1 (compression 1) and R2 (compression 300): today's SGD slices.
    Sgd {
        /// Slice compression.
        compression: usize,
    },
    /// D1: quantised random slices with a public AdamW.
    QuantSlices {
        /// Bits per code.
        bits: u8,
        /// The public AdamW's learning rate.
        lr: f64,
    },
    /// D2: replayable DiLoCo.
    DiLoCo {
        /// Windows per round.
        h: u64,
        /// Bits per code; 0 uploads f32.
        bits: u8,
        /// Keep the inner moments across rounds (unverifiable control).
        keep_moments: bool,
        /// Inner AdamW learning rate.
        inner_lr: f64,
        /// Outer learning rate.
        outer_lr: f64,
        /// Outer Nesterov momentum.
        momentum: f64,
        /// The inner AdamW's epsilon.
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// D3: top-k with error feedback reset every `ef_reset` rounds.
    SparseLoCo {
        /// Windows per round.
        h: u64,
        /// Bits per code.
        bits: u8,
        /// Fraction of each chunk sent; 0 picks the largest that fits the budget.
        density: f64,
        /// Rounds per error-feedback epoch; 0 never resets (unverifiable control).
        ef_reset: u64,
        /// Error-feedback decay.
        beta: f64,
        /// Inner AdamW learning rate.
        inner_lr: f64,
        /// Outer learning rate.
        outer_lr: f64,
    },
}

impl ArmSpec {
    /// A short label for tables.
    pub fn label(&self) -> String {
        match self {
            ArmSpec::AdamW { lr } => format!("R0 AdamW lr {lr:e}"),
            ArmSpec::Sgd { compression: 1 } => "R1 SGD c=1".into(),
            ArmSpec::Sgd { compression } => format!("R2 SGD c={compression}"),
            ArmSpec::QuantSlices { bits, lr } => {
                format!("D1 {bits}-bit slices c={}, Adam lr {lr:e}", d1_compression(*bits))
            }
            ArmSpec::DiLoCo { h, bits, keep_moments, outer_lr, momentum, inner_lr, eps } => {
                let q = if *bits == 0 { "f32".to_string() } else { format!("{bits}-bit") };
                let m = if *keep_moments { ", moments kept" } else { "" };
                let lr = if *inner_lr == 3e-3 { String::new() } else { format!(", inner lr {inner_lr:e}") };
                let e = if *eps == 1e-8 { String::new() } else { format!(", eps {eps:e}") };
                format!("D2 H={h} {q}{m} (outer {outer_lr}, μ {momentum}{lr}{e})")
            }
            ArmSpec::SparseLoCo { h, bits, ef_reset, .. } => {
                let e = if *ef_reset == 0 { "EF never reset".to_string() } else { format!("EF reset/{ef_reset}") };
                format!("D3 H={h} {bits}-bit top-k, {e}")
            }
        }
    }

    /// A short label for charts.
    pub fn short(&self) -> String {
        match self {
            ArmSpec::AdamW { .. } => "R0 AdamW".into(),
            ArmSpec::Sgd { compression: 1 } => "R1 SGD, uncompressed".into(),
            ArmSpec::Sgd { .. } => "R2 today (1/300, f32)".into(),
            ArmSpec::QuantSlices { bits, .. } => format!("D1 {bits}-bit slices"),
            ArmSpec::DiLoCo { h, bits, keep_moments, .. } => {
                let q = if *bits == 0 { "f32".to_string() } else { format!("{bits}-bit") };
                format!("D2 H={h} {q}{}", if *keep_moments { ", moments kept" } else { "" })
            }
            ArmSpec::SparseLoCo { h, ef_reset: 0, .. } => format!("D3 H={h}, EF never reset"),
            ArmSpec::SparseLoCo { h, ef_reset, .. } => format!("D3 H={h}, EF reset/{ef_reset}"),
        }
    }

    /// The family an arm belongs to (the curves show the best of each): `R0`, `R1`, `R2`,
    /// `D1`, `D2`, `D2 kept`, `D3`, `D3 no reset`.
    pub fn family(&self) -> &'static str {
        match self {
            ArmSpec::AdamW { .. } => "R0",
            ArmSpec::Sgd { compression: 1 } => "R1",
            ArmSpec::Sgd { .. } => "R2",
            ArmSpec::QuantSlices { .. } => "D1",
            ArmSpec::DiLoCo { keep_moments: true, .. } => "D2 kept",
            ArmSpec::DiLoCo { .. } => "D2",
            ArmSpec::SparseLoCo { ef_reset: 0, .. } => "D3 no reset",
            ArmSpec::SparseLoCo { .. } => "D3",
        }
    }

    /// Whether a validator can recompute what an honest miner uploads from public data.
    pub fn verifiable(&self) -> bool {
        match self {
            ArmSpec::AdamW { .. } => false,
            ArmSpec::Sgd { .. } | ArmSpec::QuantSlices { .. } => true,
            ArmSpec::DiLoCo { keep_moments, .. } => !keep_moments,
            ArmSpec::SparseLoCo { ef_reset, .. } => *ef_reset > 0,
        }
    }

    /// Parse `kind:key=value,...`, e.g. `d2:h=32,bits=2`; unnamed keys take the defaults.
    pub fn parse(s: &str, inner_lr: f64) -> anyhow::Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut kv = std::collections::BTreeMap::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else { bail!("`{part}` in `{s}` is not key=value") };
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
        let mut take = |k: &str, default: f64| -> anyhow::Result<f64> {
            match kv.remove(k) {
                Some(v) => v.parse::<f64>().map_err(|e| anyhow::anyhow!("{k}={v} in `{s}`: {e}")),
                None => Ok(default),
            }
        };
        let spec = match kind {
            "r0" | "adamw" => ArmSpec::AdamW { lr: take("lr", inner_lr)? },
            "r1" => ArmSpec::Sgd { compression: 1 },
            "r2" | "sgd" => ArmSpec::Sgd { compression: take("c", 300.0)? as usize },
            "d1" => ArmSpec::QuantSlices { bits: take("bits", 2.0)? as u8, lr: take("lr", 1e-2)? },
            "d2" => ArmSpec::DiLoCo {
                h: take("h", 32.0)? as u64,
                bits: take("bits", 2.0)? as u8,
                keep_moments: take("keep", 0.0)? != 0.0,
                inner_lr: take("lr", inner_lr)?,
                outer_lr: take("outer", 1.0)?,
                momentum: take("mu", 0.0)?,
                eps: take("eps", 1e-8)?,
            },
            "d3" => ArmSpec::SparseLoCo {
                h: take("h", 8.0)? as u64,
                bits: take("bits", 2.0)? as u8,
                density: take("density", 0.0)?,
                ef_reset: take("e", 8.0)? as u64,
                beta: take("beta", 0.95)?,
                inner_lr: take("lr", inner_lr)?,
                outer_lr: take("outer", 1.0)?,
            },
            k => bail!("unknown arm kind `{k}` (r0, r1, r2, d1, d2, d3)"),
        };
        if let Some(k) = kv.keys().next() {
            bail!("unknown key `{k}` for arm `{kind}`");
        }
        Ok(spec)
    }
}

fn default_eps() -> f64 {
    1e-8
}

/// D1's compression: the smallest that keeps `bits` per value plus a scale per block in the budget.
pub fn d1_compression(bits: u8) -> usize {
    ((bits as f64 + 32.0 / slices::quant::BLOCK as f64) / BUDGET_BITS).ceil() as usize
}

/// D3's density: the largest that keeps indices, codes and scales in the budget over `h` windows.
pub fn d3_density(bits: u8, h: u64) -> f64 {
    0.995 * BUDGET_BITS * h as f64 / (bits as f64 + INDEX_BITS as f64 + 32.0 / slices::quant::BLOCK as f64)
}

/// Bytes on the wire of today's slice (safetensors, f32) at `compression` for the lab's model.
pub fn sgd_slice_bytes(lab: &Lab, params: &Params, compression: usize) -> anyhow::Result<usize> {
    let idx = SliceIndices::select(params.specs(), &lab.seed(0), compression);
    let names: Vec<String> = params.specs().iter().map(|s| s.name.clone()).collect();
    // Protocol v3's slice: one f32 per value (written here as its raw bytes).
    let values: Vec<Vec<u8>> = idx.all().iter().map(|i| vec![0u8; 4 * i.len()]).collect();
    let meta = SliceMeta::new(0, &lab.hotkeys[0], "lab", compression, "lab", "lab");
    Ok(slices::format::encode_raw(&meta, &names, &values).map_err(|e| anyhow::anyhow!("{e}"))?.len())
}

/// Run `spec` over the lab's windows; `progress` sees each evaluation.
pub fn run_arm(
    lab: &Lab,
    spec: &ArmSpec,
    verify: bool,
    mut progress: impl FnMut(u64, f64),
) -> anyhow::Result<ArmReport> {
    let start = Instant::now();
    let mut arm: Box<dyn Arm> = match spec {
        ArmSpec::AdamW { lr } => Box::new(Central::new(lab, *lr)?),
        ArmSpec::Sgd { compression } => Box::new(SgdSlices::new(lab, *compression)?),
        ArmSpec::QuantSlices { bits, lr } => Box::new(QuantSlices::new(lab, *bits, *lr, verify)?),
        ArmSpec::DiLoCo { .. } | ArmSpec::SparseLoCo { .. } => Box::new(Rounds::new(lab, spec.clone(), verify)?),
    };
    let mut curve = vec![(0, lab.heldout_loss(arm.public())?)];
    progress(0, curve[0].1);
    for w in 0..lab.opts.windows {
        arm.window(lab, w)?;
        let done = w + 1;
        if done.is_multiple_of(lab.opts.eval_every) || done == lab.opts.windows {
            let loss = lab.heldout_loss(arm.public())?;
            if !loss.is_finite() {
                bail!("{}: held-out loss {loss} after {done} windows", spec.label());
            }
            curve.push((done, loss));
            progress(done, loss);
        }
    }
    let (upload, download) = arm.bytes();
    Ok(ArmReport {
        label: spec.label(),
        spec: spec.clone(),
        verifiable: spec.verifiable(),
        network: lab.opts.network.clone(),
        windows: lab.opts.windows,
        tokens_per_window: lab.tokens_per_window(),
        curve,
        upload_bytes_per_window: upload,
        download_bytes_per_window: download,
        budget_bytes_per_window: sgd_slice_bytes(lab, arm.public(), 300)? as f64,
        verify: arm.verification(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What every arm does.
trait Arm {
    /// Train window `w`.
    fn window(&mut self, lab: &Lab, w: u64) -> anyhow::Result<()>;
    /// The model every node holds.
    fn public(&self) -> &Params;
    /// Upload bytes per miner and download bytes per node, per window.
    fn bytes(&self) -> (f64, f64);
    /// The verification measurements, if any.
    fn verification(&self) -> Option<VerifyReport> {
        None
    }
}

/// R0: one trainer on the union of the miners' pages.
struct Central {
    trainer: Trainer,
    lr: f64,
}

impl Central {
    fn new(lab: &Lab, lr: f64) -> anyhow::Result<Self> {
        Ok(Central { trainer: Trainer::new(lab, lab.opts.micro_rows, lr, 1e-8, false)?, lr })
    }
}

impl Arm for Central {
    fn window(&mut self, lab: &Lab, w: u64) -> anyhow::Result<()> {
        self.trainer.step(&lab.union_batch(w)?, warmup_lr(self.lr, w, WARMUP))
    }
    fn public(&self) -> &Params {
        &self.trainer.params
    }
    fn bytes(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// R1, R2.
struct SgdSlices {
    params: Params,
    compression: usize,
    slice_bytes: usize,
    miners: usize,
}

impl SgdSlices {
    fn new(lab: &Lab, compression: usize) -> anyhow::Result<Self> {
        let params = lab.genesis()?;
        let slice_bytes = sgd_slice_bytes(lab, &params, compression)?;
        Ok(SgdSlices { params, compression, slice_bytes, miners: lab.hotkeys.len() })
    }
}

impl Arm for SgdSlices {
    fn window(&mut self, lab: &Lab, w: u64) -> anyhow::Result<()> {
        let idx = SliceIndices::select(self.params.specs(), &lab.seed(w), self.compression);
        let theta = slices::gather_params(&self.params, &idx)?;
        let eta = lab.hparams.learning_rate_at(w);
        // Protocol v3's rule: each miner's slice `s = theta - eta g` in f32, the mean of the
        // deltas `theta - s` in f64, `theta - mean` in f32.
        let mut deltas: Vec<Vec<Vec<f64>>> = Vec::new();
        for m in 0..lab.hotkeys.len() {
            let g = gradient(&self.params, &lab.batches[w as usize][m], lab.opts.micro_rows)?;
            let gi = slices::gather_grads(&g, &idx)?;
            deltas.push(
                theta
                    .iter()
                    .zip(&gi)
                    .map(|(t, gg)| {
                        t.iter()
                            .zip(gg)
                            .map(|(&a, &b)| a as f64 - ((a as f64 - eta * b as f64) as f32) as f64)
                            .collect()
                    })
                    .collect(),
            );
        }
        let n = deltas.len().max(1) as f64;
        let new: Flat = theta
            .iter()
            .enumerate()
            .map(|(p, t)| {
                t.iter()
                    .enumerate()
                    .map(|(j, &a)| (a as f64 - deltas.iter().map(|d| d[p][j]).sum::<f64>() / n) as f32)
                    .collect()
            })
            .collect();
        Ok(slices::scatter_params(&self.params, &idx, &new)?)
    }
    fn public(&self) -> &Params {
        &self.params
    }
    fn bytes(&self) -> (f64, f64) {
        // Nodes download the lead's aggregate: the same coordinates, f32.
        (self.slice_bytes as f64, self.slice_bytes as f64 * (self.miners > 0) as u8 as f64)
    }
}

/// Encode each tensor's values with its dither, round-trip the bytes, and decode.
fn through_wire(codec: &Codec, values: &Flat, dithers: &Flat) -> anyhow::Result<(Vec<Quantised>, Flat, usize)> {
    let mut qs = Vec::with_capacity(values.len());
    let mut decoded = Vec::with_capacity(values.len());
    let mut bytes = 0;
    for (x, u) in values.iter().zip(dithers) {
        let wire = codec.to_bytes(&codec.encode(x, u));
        bytes += wire.len();
        let q = codec.from_bytes(&wire, x.len())?;
        decoded.push(codec.decode(&q));
        qs.push(q);
    }
    Ok((qs, decoded, bytes))
}

fn dithers(seed: &[u8], hotkey: &str, lengths: impl Iterator<Item = usize>) -> Flat {
    lengths.enumerate().map(|(p, n)| slices::quant::dither(seed, hotkey, p as u64, n)).collect()
}

/// The per-coordinate mean of `xs` in f64, in a fixed order.
fn mean(xs: &[Flat]) -> Flat {
    let n = xs.len().max(1) as f64;
    (0..xs.first().map_or(0, Vec::len))
        .map(|p| (0..xs[0][p].len()).map(|j| (xs.iter().map(|x| x[p][j] as f64).sum::<f64>() / n) as f32).collect())
        .collect()
}

/// D1.
struct QuantSlices {
    params: Params,
    codec: Codec,
    compression: usize,
    lr: f64,
    /// Public first and second moments and per-coordinate step counts.
    m: Flat,
    v: Flat,
    t: Vec<Vec<u32>>,
    upload: f64,
    miners: usize,
    report: Option<VerifyReport>,
    /// The validator's gradient of the previous window (what a stale miner re-sends).
    previous: Option<Vec<candle_core::Tensor>>,
}

impl QuantSlices {
    fn new(lab: &Lab, bits: u8, lr: f64, verify: bool) -> anyhow::Result<Self> {
        let params = lab.genesis()?;
        let zeros: Flat = params.specs().iter().map(|s| vec![0.0; s.numel()]).collect();
        Ok(QuantSlices {
            codec: Codec::new(bits)?,
            compression: d1_compression(bits),
            lr,
            m: zeros.clone(),
            v: zeros,
            t: params.specs().iter().map(|s| vec![0; s.numel()]).collect(),
            params,
            upload: 0.0,
            miners: lab.hotkeys.len(),
            report: verify.then(VerifyReport::new),
            previous: None,
        })
    }
}

impl Arm for QuantSlices {
    fn window(&mut self, lab: &Lab, w: u64) -> anyhow::Result<()> {
        let seed = lab.seed(w);
        let idx = SliceIndices::select(self.params.specs(), &seed, self.compression);
        let mut decoded = Vec::new();
        let mut miner0 = None;
        for (m, hk) in lab.hotkeys.iter().enumerate() {
            let t0 = Instant::now();
            let g = gradient(&self.params, &lab.batches[w as usize][m], lab.opts.micro_rows)?;
            let gi = slices::gather_grads(&g, &idx)?;
            let u = dithers(&seed, hk, gi.iter().map(Vec::len));
            let (qs, dec, bytes) = through_wire(&self.codec, &gi, &u)?;
            if let Some(r) = &mut self.report
                && m == 0
            {
                r.miner_seconds += t0.elapsed().as_secs_f64();
            }
            self.upload = bytes as f64;
            decoded.push(dec);
            if m == 0 {
                miner0 = Some((gi, qs, u));
            }
        }
        if let (Some(r), Some((gi, qs, u))) = (&mut self.report, miner0) {
            let t0 = Instant::now();
            let gv = gradient(&self.params, &lab.batches[w as usize][0], lab.opts.replay_micro_rows)?;
            let gvi = slices::gather_grads(&gv, &idx)?;
            r.replay_seconds += t0.elapsed().as_secs_f64();
            r.honest.push(verify::honest_check(&self.codec, &gi, &gvi, &qs, &u));
            if w == adversary_window(lab.opts.windows, 1) {
                let other = |b| -> anyhow::Result<Flat> {
                    Ok(slices::gather_grads(&gradient(&self.params, &b, lab.opts.micro_rows)?, &idx)?)
                };
                let wrong = other(lab.other_pages_batch(0, w)?)?;
                let half = lab.batches[w as usize][0].clone();
                let half = bistro_train::data::WindowBatch {
                    rows: half.rows / 2,
                    input_ids: half.input_ids[..half.rows / 2 * half.seq_len].to_vec(),
                    labels: half.labels[..half.rows / 2 * half.seq_len].to_vec(),
                    ..half
                };
                let lazy = if half.rows > 0 { other(half)? } else { gi.clone() };
                let zeros: Flat = gi.iter().map(|x| vec![0.0; x.len()]).collect();
                // Last window's gradient (previous state, previous pages) at this window's coordinates.
                let stale = match &self.previous {
                    Some(g) => slices::gather_grads(g, &idx)?,
                    None => zeros.clone(),
                };
                let copy = slices::gather_grads(
                    &gradient(&self.params, &lab.batches[w as usize][1 % self.miners], lab.opts.micro_rows)?,
                    &idx,
                )?;
                let noise = verify::noise_like(&gi, &seed);
                r.adversaries = [
                    ("zeros", zeros),
                    ("noise", noise),
                    ("wrong-pages", wrong),
                    ("lazy", lazy),
                    ("stale", stale),
                    ("copycat", copy),
                ]
                .iter()
                .map(|(n, f)| verify::dense_adversary(n, &self.codec, f, &gi, &gvi, &u))
                .collect();
            }
            self.previous = Some(gv);
        }
        // The public lazy AdamW step at the window's coordinates.
        let g = mean(&decoded);
        let lr = warmup_lr(self.lr, w, WARMUP);
        let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8f64, 0.1f64);
        let theta = slices::gather_params(&self.params, &idx)?;
        let mut new = theta.clone();
        for (p, ids) in idx.all().iter().enumerate() {
            for (j, &i) in ids.iter().enumerate() {
                let i = i as usize;
                let gj = g[p][j] as f64;
                let t = self.t[p][i] + 1;
                self.t[p][i] = t;
                let m = b1 * self.m[p][i] as f64 + (1.0 - b1) * gj;
                let v = b2 * self.v[p][i] as f64 + (1.0 - b2) * gj * gj;
                self.m[p][i] = m as f32;
                self.v[p][i] = v as f32;
                let step = (m / (1.0 - b1.powi(t as i32))) / ((v / (1.0 - b2.powi(t as i32))).sqrt() + eps);
                new[p][j] = (theta[p][j] as f64 * (1.0 - lr * wd) - lr * step) as f32;
            }
        }
        Ok(slices::scatter_params(&self.params, &idx, &new)?)
    }
    fn public(&self) -> &Params {
        &self.params
    }
    fn bytes(&self) -> (f64, f64) {
        // Every node downloads the included miners' codes and runs the public step itself.
        (self.upload, self.upload * self.miners as f64)
    }
    fn verification(&self) -> Option<VerifyReport> {
        self.report.clone()
    }
}

/// The window (D1) or the round index (D2, D3) in which the cheaters are checked: the
/// second, so that a stale upload exists.
fn adversary_window(total: u64, per: u64) -> u64 {
    (total / per).min(2).saturating_sub(1) * per
}

/// One party that trains through a round: a miner, or the validator's replay of one.
struct Trainer {
    params: Params,
    opt: AdamW,
    micro_rows: usize,
    /// Error feedback (D3).
    ef: Option<Flat>,
    /// AdamW's epsilon.
    eps: f64,
    seconds: f64,
}

impl Trainer {
    fn new(lab: &Lab, micro_rows: usize, lr: f64, eps: f64, ef: bool) -> anyhow::Result<Self> {
        let params = lab.genesis()?;
        let opt = adamw(&params, lr, eps)?;
        let ef = ef.then(|| params.specs().iter().map(|s| vec![0.0; s.numel()]).collect());
        Ok(Trainer { params, opt, micro_rows, ef, eps, seconds: 0.0 })
    }

    /// Start a round from the public model (fresh moments unless kept).
    fn start(&mut self, public: &Params, keep_moments: bool, lr: f64) -> anyhow::Result<()> {
        self.params.assign(public)?;
        if !keep_moments {
            self.opt = adamw(&self.params, lr, self.eps)?;
        }
        Ok(())
    }

    fn step(&mut self, batch: &bistro_train::data::WindowBatch, lr: f64) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let g = gradient(&self.params, batch, self.micro_rows)?;
        self.opt.set_learning_rate(lr);
        adam_step(&mut self.opt, &self.params, g)?;
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The pseudo-gradient `theta_t - theta`.
    fn delta(&self, public: &Flat) -> anyhow::Result<Flat> {
        Ok(sub(public, &params_flat(&self.params)?))
    }
}

/// D3's upload of one tensor: sorted indices and the codes of the values there.
#[derive(Clone, Debug)]
struct Sparse {
    idx: Vec<u32>,
    q: Quantised,
}

impl Sparse {
    /// The decoded values at their indices in a tensor of `n` values (indices out of range
    /// are dropped).
    fn dense(&self, codec: &Codec, n: usize) -> Vec<f32> {
        let mut full = vec![0f32; n];
        for (&i, v) in self.idx.iter().zip(codec.decode(&self.q)) {
            if let Some(f) = full.get_mut(i as usize) {
                *f = v;
            }
        }
        full
    }
}

/// Values sent per chunk of `len` values.
fn k_of(len: usize, density: f64) -> usize {
    ((density * len as f64).round() as usize).clamp(1, len)
}

/// Top-k by magnitude per chunk (ties to the lower index), ascending.
fn top_k(x: &[f32], density: f64) -> Vec<u32> {
    let mut out = Vec::new();
    for (c, chunk) in x.chunks(CHUNK).enumerate() {
        let k = k_of(chunk.len(), density);
        let mut order: Vec<u32> = (0..chunk.len() as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            chunk[b as usize].abs().total_cmp(&chunk[a as usize].abs()).then(a.cmp(&b))
        });
        let mut sel: Vec<u32> = order[..k].iter().map(|i| i + (c * CHUNK) as u32).collect();
        sel.sort_unstable();
        out.extend(sel);
    }
    out
}

/// The `k`-th largest magnitude of each chunk.
fn thresholds(x: &[f32], density: f64) -> Vec<f32> {
    x.chunks(CHUNK)
        .map(|chunk| {
            let k = k_of(chunk.len(), density);
            let mut a: Vec<f32> = chunk.iter().map(|v| v.abs()).collect();
            a.select_nth_unstable_by(k - 1, |p, q| q.total_cmp(p));
            a[k - 1]
        })
        .collect()
}

fn sparse_bytes(codec: &Codec, k: usize) -> usize {
    (k * INDEX_BITS).div_ceil(8) + codec.encoded_len(k)
}

/// Check a sparse upload against the validator's `u_v`: every sent index must be within the
/// validator's top-k up to `rtol` of the chunk's threshold, each chunk must send exactly k,
/// and the codes must be consistent. A failed selection counts as an inconsistent code.
fn check_sparse(codec: &Codec, uv: &Flat, sent: &[Sparse], dithers: &Flat, density: f64, rtol: f64) -> Consistency {
    let mut total = Consistency::default();
    for ((x, s), u) in uv.iter().zip(sent).zip(dithers) {
        let th = thresholds(x, density);
        let mut per_chunk = vec![0usize; th.len()];
        let mut bad = 0usize;
        let mut prev: Option<u32> = None;
        for &i in &s.idx {
            let ok_order = prev.is_none_or(|p| i > p);
            prev = Some(i);
            let Some(&v) = x.get(i as usize) else {
                bad += 1;
                continue;
            };
            let c = i as usize / CHUNK;
            per_chunk[c] += 1;
            if !ok_order || (v.abs() as f64) < th[c] as f64 * (1.0 - rtol) {
                bad += 1;
            }
        }
        let expected: usize = x.chunks(CHUNK).map(|c| k_of(c.len(), density)).sum();
        let wrong_counts: usize =
            x.chunks(CHUNK).zip(&per_chunk).map(|(c, &n)| n.abs_diff(k_of(c.len(), density))).sum();
        let at: Vec<f32> = s.idx.iter().map(|&i| x.get(i as usize).copied().unwrap_or(0.0)).collect();
        let mut c = if s.q.codes.len() == at.len() && u.len() >= at.len() {
            codec.check(&at, &s.q, &u[..at.len()], verify::tolerance(codec, rtol))
        } else {
            Consistency { codes: at.len(), inconsistent: at.len(), ..Default::default() }
        };
        c.codes = c.codes.max(expected);
        c.inconsistent = (c.inconsistent + bad + wrong_counts).min(c.codes);
        total.merge(&c);
    }
    total
}

/// D2 and D3.
struct Rounds {
    spec: ArmSpec,
    public: Params,
    /// Outer momentum (D2).
    momentum: Flat,
    miners: Vec<Trainer>,
    codec: Option<Codec>,
    replay: Option<Trainer>,
    report: Option<VerifyReport>,
    upload_per_round: f64,
    previous: Option<Flat>,
    /// Extra trajectories of the cheaters that train (wrong pages, lazy) in the checked round.
    cheaters: Vec<(String, Trainer)>,
}

impl Rounds {
    fn new(lab: &Lab, spec: ArmSpec, verify: bool) -> anyhow::Result<Self> {
        let public = lab.genesis()?;
        let (bits, ef) = match &spec {
            ArmSpec::DiLoCo { bits, .. } => (*bits, false),
            ArmSpec::SparseLoCo { bits, .. } => (*bits, true),
            _ => bail!("not a round-based arm"),
        };
        let (lr, eps) = (inner_lr(&spec), inner_eps(&spec));
        let codec = if bits == 0 { None } else { Some(Codec::new(bits)?) };
        let miners = lab
            .hotkeys
            .iter()
            .map(|_| Trainer::new(lab, lab.opts.micro_rows, lr, eps, ef))
            .collect::<anyhow::Result<_>>()?;
        let verify = verify && spec.verifiable();
        let replay = if verify { Some(Trainer::new(lab, lab.opts.replay_micro_rows, lr, eps, ef)?) } else { None };
        Ok(Rounds {
            momentum: public.specs().iter().map(|s| vec![0.0; s.numel()]).collect(),
            public,
            spec,
            miners,
            codec,
            replay,
            report: verify.then(VerifyReport::new),
            upload_per_round: 0.0,
            previous: None,
            cheaters: Vec::new(),
        })
    }

    fn h(&self) -> u64 {
        match self.spec {
            ArmSpec::DiLoCo { h, .. } | ArmSpec::SparseLoCo { h, .. } => h.max(1),
            _ => 1,
        }
    }

    fn keep_moments(&self) -> bool {
        matches!(self.spec, ArmSpec::DiLoCo { keep_moments: true, .. })
    }

    fn density(&self) -> f64 {
        match self.spec {
            ArmSpec::SparseLoCo { density, bits, h, .. } if density <= 0.0 => d3_density(bits, h),
            ArmSpec::SparseLoCo { density, .. } => density,
            _ => 1.0,
        }
    }

    /// D3's `beta e + delta`: what a round offers for selection (0 error feedback for D2).
    fn with_feedback(&self, delta: &Flat, ef: &Flat) -> Flat {
        let beta = match self.spec {
            ArmSpec::SparseLoCo { beta, .. } => beta as f32,
            _ => 0.0,
        };
        delta.iter().zip(ef).map(|(d, e)| d.iter().zip(e).map(|(d, e)| beta * e + d).collect()).collect()
    }

    /// D3: the upload of `delta` given error feedback `ef` (updated in place to what is not sent).
    fn sparse_upload(&self, codec: &Codec, delta: &Flat, ef: &mut Flat, dithers: &Flat) -> (Vec<Sparse>, Flat, usize) {
        let density = self.density();
        let acc = self.with_feedback(delta, ef);
        let mut sent = Vec::new();
        let mut dense = Vec::new();
        let mut bytes = 0;
        for ((acc, e), u) in acc.iter().zip(ef.iter_mut()).zip(dithers) {
            let idx = top_k(acc, density);
            let vals: Vec<f32> = idx.iter().map(|&i| acc[i as usize]).collect();
            let s = Sparse { q: codec.encode(&vals, &u[..vals.len()]), idx };
            bytes += sparse_bytes(codec, s.idx.len());
            let full = s.dense(codec, acc.len());
            *e = acc.iter().zip(&full).map(|(a, f)| a - f).collect();
            sent.push(s);
            dense.push(full);
        }
        (sent, dense, bytes)
    }

    fn end_round(&mut self, lab: &Lab, round: u64, round_start: u64) -> anyhow::Result<()> {
        let theta = params_flat(&self.public)?;
        let seed = lab.seed(round_start);
        let lengths: Vec<usize> = theta.iter().map(Vec::len).collect();
        let mut decoded = Vec::new();
        let mut deltas = Vec::new();
        let ef_epoch_start =
            matches!(self.spec, ArmSpec::SparseLoCo { ef_reset, .. } if ef_reset > 0 && round.is_multiple_of(ef_reset));
        if ef_epoch_start {
            for t in self.miners.iter_mut().chain(self.replay.as_mut()) {
                if let Some(e) = &mut t.ef {
                    e.iter_mut().for_each(|v| v.iter_mut().for_each(|x| *x = 0.0));
                }
            }
        }
        let mut sent0 = None;
        for m in 0..self.miners.len() {
            let delta = self.miners[m].delta(&theta)?;
            let u = dithers(&seed, &lab.hotkeys[m], lengths.iter().copied());
            match (self.codec, self.miners[m].ef.take()) {
                (None, _) => {
                    self.upload_per_round = 4.0 * lengths.iter().sum::<usize>() as f64;
                    decoded.push(delta.clone());
                }
                (Some(codec), None) => {
                    let (qs, dec, bytes) = through_wire(&codec, &delta, &u)?;
                    self.upload_per_round = bytes as f64;
                    decoded.push(dec);
                    if m == 0 {
                        sent0 = Some(SentKind::Dense(qs));
                    }
                }
                (Some(codec), Some(mut ef)) => {
                    let ef_before = ef.clone();
                    let (sent, dense, bytes) = self.sparse_upload(&codec, &delta, &mut ef, &u);
                    self.miners[m].ef = Some(ef);
                    self.upload_per_round = bytes as f64;
                    decoded.push(dense);
                    if m == 0 {
                        sent0 = Some(SentKind::Sparse(sent, ef_before));
                    }
                }
            }
            deltas.push(delta);
        }
        if let (true, Some(codec)) = (self.report.is_some(), self.codec)
            && let Some(mut replay) = self.replay.take()
        {
            let checked = self.check_round(lab, round, &theta, &deltas, sent0, &seed, &lengths, &codec, &mut replay);
            self.replay = Some(replay);
            checked?;
        }
        // The lead's outer step.
        let avg = mean(&decoded);
        let new: Flat = match self.spec {
            ArmSpec::DiLoCo { outer_lr, momentum, .. } => {
                let (a, mu) = (outer_lr, momentum);
                theta
                    .iter()
                    .zip(&avg)
                    .zip(self.momentum.iter_mut())
                    .map(|((t, d), mm)| {
                        t.iter()
                            .zip(d)
                            .zip(mm.iter_mut())
                            .map(|((&t, &d), m)| {
                                let mnew = mu * *m as f64 + d as f64;
                                *m = mnew as f32;
                                (t as f64 - a * (d as f64 + mu * mnew)) as f32
                            })
                            .collect()
                    })
                    .collect()
            }
            ArmSpec::SparseLoCo { outer_lr, .. } => theta
                .iter()
                .zip(&avg)
                .map(|(t, d)| t.iter().zip(d).map(|(&t, &d)| (t as f64 - outer_lr * d as f64) as f32).collect())
                .collect(),
            _ => bail!("not a round-based arm"),
        };
        set_params(&self.public, &new)?;
        Ok(())
    }

    /// The validator's check of miner 0's upload of `round` against its replay (and, in
    /// one round, the cheaters').
    #[allow(clippy::too_many_arguments)]
    fn check_round(
        &mut self,
        lab: &Lab,
        round: u64,
        theta: &Flat,
        deltas: &[Flat],
        sent0: Option<SentKind>,
        seed: &[u8],
        lengths: &[usize],
        codec: &Codec,
        replay: &mut Trainer,
    ) -> anyhow::Result<()> {
        let codec = *codec;
        let dv = replay.delta(theta)?;
        let u = dithers(seed, &lab.hotkeys[0], lengths.iter().copied());
        let adversary_round = round == adversary_window(lab.opts.windows / self.h(), 1);
        let mut cheats: Vec<(String, Flat)> = Vec::new();
        if adversary_round {
            cheats.push(("zeros".into(), dv.iter().map(|x| vec![0.0; x.len()]).collect()));
            cheats.push(("noise".into(), verify::noise_like(&deltas[0], seed)));
            for (name, t) in &self.cheaters {
                cheats.push((name.clone(), t.delta(theta)?));
            }
            cheats.push((
                "stale".into(),
                self.previous.clone().unwrap_or_else(|| dv.iter().map(|x| vec![0.0; x.len()]).collect()),
            ));
            cheats.push(("copycat".into(), deltas[1 % deltas.len()].clone()));
        }
        let Some(mut report) = self.report.take() else { return Ok(()) };
        match sent0 {
            Some(SentKind::Dense(qs)) => {
                report.honest.push(verify::honest_check(&codec, &deltas[0], &dv, &qs, &u));
                if adversary_round {
                    report.adversaries = cheats
                        .iter()
                        .map(|(n, f)| verify::dense_adversary(n, &codec, f, &deltas[0], &dv, &u))
                        .collect();
                }
            }
            Some(SentKind::Sparse(sent, ef_before)) => {
                let mut ev = replay.ef.take().unwrap_or_default();
                let density = self.density();
                let uv = self.with_feedback(&dv, &ev);
                let um = self.with_feedback(&deltas[0], &ef_before);
                let mut h = HonestCheck {
                    max_bin_deviation: um
                        .iter()
                        .zip(&uv)
                        .map(|(a, b)| codec.max_bin_deviation(a, b))
                        .fold(0.0, f64::max),
                    rel_error: super::norm(&sub(&um, &uv)) / super::norm(&uv).max(f64::MIN_POSITIVE),
                    ..Default::default()
                };
                for &t in &TOLERANCES {
                    let c = check_sparse(&codec, &uv, &sent, &u, density, t);
                    h.codes = c.codes;
                    h.inconsistent.push(c.inconsistent);
                    h.room.push(c.room());
                }
                report.honest.push(h);
                if adversary_round {
                    let honest_dense = sparse_dense(&codec, &sent, lengths);
                    report.adversaries = cheats
                        .iter()
                        .map(|(name, fake)| {
                            let mut e = ef_before.clone();
                            let (fs, fd, _) = self.sparse_upload(&codec, fake, &mut e, &u);
                            AdversaryCheck {
                                name: name.clone(),
                                inconsistent_fraction: TOLERANCES
                                    .iter()
                                    .map(|&t| check_sparse(&codec, &uv, &fs, &u, density, t).inconsistent_fraction())
                                    .collect(),
                                rel_distance: super::norm(&sub(&fd, &honest_dense))
                                    / super::norm(&honest_dense).max(f64::MIN_POSITIVE),
                            }
                        })
                        .collect();
                }
                // The validator's error feedback follows what the miner actually sent.
                let sent_dense = sparse_dense(&codec, &sent, lengths);
                ev = uv.iter().zip(&sent_dense).map(|(a, s)| a.iter().zip(s).map(|(a, s)| a - s).collect()).collect();
                replay.ef = Some(ev);
            }
            None => {}
        }
        self.report = Some(report);
        if let Some(r) = self.report.as_mut() {
            r.replay_seconds = replay.seconds;
            r.miner_seconds = self.miners[0].seconds;
        }
        self.previous = Some(dv);
        self.cheaters.clear();
        Ok(())
    }
}

/// The inner AdamW's learning rate of a round-based arm.
fn inner_lr(spec: &ArmSpec) -> f64 {
    match spec {
        ArmSpec::DiLoCo { inner_lr, .. } | ArmSpec::SparseLoCo { inner_lr, .. } => *inner_lr,
        _ => 0.0,
    }
}

/// The inner AdamW's epsilon of a round-based arm (D3 uses AdamW's usual 1e-8).
fn inner_eps(spec: &ArmSpec) -> f64 {
    match spec {
        ArmSpec::DiLoCo { eps, .. } => *eps,
        _ => default_eps(),
    }
}

fn sparse_dense(codec: &Codec, sent: &[Sparse], lengths: &[usize]) -> Flat {
    sent.iter().zip(lengths).map(|(s, &n)| s.dense(codec, n)).collect()
}

/// What miner 0 sent in a round.
enum SentKind {
    Dense(Vec<Quantised>),
    Sparse(Vec<Sparse>, Flat),
}

impl Arm for Rounds {
    fn window(&mut self, lab: &Lab, w: u64) -> anyhow::Result<()> {
        let h = self.h();
        let (round, pos) = (w / h, w % h);
        let lr = warmup_lr(inner_lr(&self.spec), w, WARMUP);
        if pos == 0 {
            let keep = self.keep_moments();
            for t in self.miners.iter_mut().chain(self.replay.as_mut()) {
                t.start(&self.public, keep, lr)?;
            }
            if self.replay.is_some() && round == adversary_window(lab.opts.windows / h, 1) {
                for name in ["wrong-pages", "lazy"] {
                    let mut t = Trainer::new(lab, lab.opts.micro_rows, lr, inner_eps(&self.spec), false)?;
                    t.start(&self.public, false, lr)?;
                    self.cheaters.push((name.to_string(), t));
                }
            }
        }
        for (m, t) in self.miners.iter_mut().enumerate() {
            t.step(&lab.batches[w as usize][m], lr)?;
        }
        if let Some(r) = &mut self.replay {
            r.step(&lab.batches[w as usize][0], lr)?;
        }
        for (name, t) in &mut self.cheaters {
            match name.as_str() {
                "wrong-pages" => t.step(&lab.other_pages_batch(0, w)?, lr)?,
                _ if pos < h / 2 => t.step(&lab.batches[w as usize][0], lr)?,
                _ => {}
            }
        }
        if pos == h - 1 {
            self.end_round(lab, round, round * h)?;
        }
        Ok(())
    }
    fn public(&self) -> &Params {
        &self.public
    }
    fn bytes(&self) -> (f64, f64) {
        let h = self.h() as f64;
        (self.upload_per_round / h, self.upload_per_round * self.miners.len() as f64 / h)
    }
    fn verification(&self) -> Option<VerifyReport> {
        self.report.clone()
    }
}
