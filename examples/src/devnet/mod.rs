//! The whole network on one machine: N miners (some of them cheating) and M validators on
//! a fresh local devnet, run window by window in lockstep in one process, with a report of
//! held-out loss next to an honest-only centralised reference, every miner's `R`, `e` and
//! weight, the accepted sets and the forks among honest nodes.
//!
//! Honest miners are the library's [`Miner`] unchanged (`compute_gradient`, `build_slice`,
//! `upload_slice`, `follow`); cheaters craft what they upload from the same pieces, and some
//! commit hostile endpoints ([`crate::hostile`]). Validators are the library's [`Validator`]
//! (validator 0 has the most stake and leads).

mod report;
mod strategy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::data::{Page, WindowBatch};
use bistro_train::hparams::HParams;
use bistro_train::miner::{Miner, MinerConfig};
use bistro_train::node::{Followed, Node, NodeConfig, Pace};
use bistro_train::public_adam::PublicAdam;
use bistro_train::slices::{self, SliceIndices};
use bistro_train::step::{self, WindowGradient};
use bistro_train::storage::BucketOptions;
use bistro_validate::{Validator, ValidatorConfig};
use candle_core::Device;

pub use report::{MinerRow, Report, StrategyReport, WindowReport};
use strategy::MinerSlot;
pub use strategy::Strategy;

use crate::hostile::Endpoint;

/// What to run.
#[derive(Clone, Debug)]
pub struct DevnetOptions {
    /// Honest miners.
    pub miners: usize,
    /// Honest validators (validator 0 has the most stake of them). With hostile validators
    /// among the adversaries, at least as many as give the honest ones a stake majority.
    pub validators: usize,
    /// Windows to run.
    pub windows: u64,
    /// Model preset or config file.
    pub model: String,
    /// Slice compression.
    pub compression: usize,
    /// One extra miner (three for `sybil-zero`) per listed strategy.
    pub adversaries: Vec<Strategy>,
    /// Working directory (devnet state, buckets, node state).
    pub dir: PathBuf,
    /// Protocol constants (model and compression are overridden by the fields above).
    pub hparams: HParams,
    /// Pages in the held-out set.
    pub heldout_pages: usize,
    /// Most miners each validator recomputes per window (fewer than the miners gives the
    /// live protocol's p < 1).
    pub max_miners: usize,
    /// Fork this validator on purpose at this window of the run (one wrong write into its
    /// state), to show the repair: `(validator index, windows after the first)`.
    pub fork_at: Option<(usize, u64)>,
    /// Called after every window with its report (the live page of `--serve`).
    pub on_window: Option<WindowHook>,
    /// After the run, start one more node that bootstraps from the validators' attested
    /// checkpoints, and report where it landed.
    pub late_joiner: bool,
}

/// A callback that sees every window's report as the run goes.
#[derive(Clone)]
pub struct WindowHook(pub Arc<dyn Fn(&WindowReport) + Send + Sync>);

impl std::fmt::Debug for WindowHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WindowHook")
    }
}

impl DevnetOptions {
    /// Defaults: 4 honest miners, 1 validator, 10 windows of the `tiny` model at the devnet's compression.
    pub fn new(dir: &Path) -> Self {
        DevnetOptions {
            miners: 4,
            validators: 1,
            windows: 10,
            model: "tiny".into(),
            compression: HParams::default().compression,
            adversaries: Vec::new(),
            dir: dir.to_path_buf(),
            hparams: HParams { collect_budget_ms: 1_000, ..HParams::default() },
            heldout_pages: 8,
            max_miners: 1024,
            fork_at: None,
            on_window: None,
            late_joiner: false,
        }
    }
}

fn gradient_of(params: &Params, node: &Node, batch: &WindowBatch) -> anyhow::Result<WindowGradient> {
    let model = Llama::new(params)?;
    Ok(step::window_gradient(&model, params, batch, node.cfg.micro_batch_rows, &node.cfg.device, || true)?)
}

fn gradient_on(params: &Params, node: &Node, pages: &[Page]) -> anyhow::Result<WindowGradient> {
    let batch = node.cfg.hparams.window_batch(&node.dataset, &node.tokenizer, pages)?;
    gradient_of(params, node, &batch)
}

fn batch_loss(params: &Params, node: &Node, batch: &WindowBatch) -> anyhow::Result<f64> {
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

fn mean_loss(params: &Params, node: &Node, pages: &[Page]) -> anyhow::Result<f64> {
    let batch = node.dataset.window_batch(&node.tokenizer, pages, node.cfg.hparams.seq_len)?;
    batch_loss(params, node, &batch)
}

/// One window of a reference model: each honest miner's gradient at `params` on its pages,
/// encoded under its own dithers, decoded, combined and applied by the public AdamW, as the
/// network does. With `backdoor`, one more contribution joins them: the gradient toward the
/// trigger batch scaled to the first honest gradient's norm, as the backdoor miner uploads.
fn reference_step(
    h: &HParams,
    w: u64,
    seed: &bistro_chain::BlockHash,
    idx: &SliceIndices,
    honest: &[&Node],
    (params, adam): (&Params, &mut PublicAdam),
    backdoor: Option<&WindowBatch>,
) -> anyhow::Result<()> {
    let codec = h.codec();
    let mut contributions = Vec::new();
    let mut honest_norm = None;
    for node in honest {
        let pages = node.dataset.pages(&h.network, &node.cfg.hotkey, w, h.pages_per_window);
        let g = gradient_on(params, node, &pages)?;
        let gi = slices::gather_grads(&g.grads, idx)?;
        honest_norm.get_or_insert_with(|| l2(&gi));
        let codes = slices::encode_gradient(&codec, &gi, &slices::dithers(seed, &node.cfg.hotkey, idx));
        contributions.push(slices::Contribution {
            hotkey: node.cfg.hotkey.clone(),
            values: codes.iter().map(|q| codec.decode(q)).collect(),
        });
    }
    if let (Some(batch), Some(norm), Some(node)) = (backdoor, honest_norm, honest.first()) {
        let g = gradient_of(params, node, batch)?;
        let mut bi = slices::gather_grads(&g.grads, idx)?;
        let k = (norm / l2(&bi).max(1e-30)) as f32;
        bi.iter_mut().flatten().for_each(|x| *x *= k);
        let hotkey = "bistro/backdoor-counterfactual";
        let codes = slices::encode_gradient(&codec, &bi, &slices::dithers(seed, hotkey, idx));
        contributions.push(slices::Contribution {
            hotkey: hotkey.to_string(),
            values: codes.iter().map(|q| codec.decode(q)).collect(),
        });
    }
    if !contributions.is_empty() {
        let agg = slices::aggregate(&idx.lengths(), &contributions, &h.aggregation);
        let step = bistro_train::public_adam::AdamStep::of(h, w);
        adam.apply(params, idx, &agg.values, &step)?;
    }
    Ok(())
}

fn l2(v: &[Vec<f32>]) -> f64 {
    v.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
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
    local_node_config(&opts.dir, h, hotkey, role, stake)
}

/// The settings of an in-process devnet node under `dir`: a local bucket
/// (`dir/buckets/<hotkey>`), state in `dir/<role>s/<hotkey>`, the CPU, registered on the
/// devnet with `stake`.
pub fn local_node_config(dir: &Path, h: &HParams, hotkey: &str, role: &str, stake: u64) -> anyhow::Result<NodeConfig> {
    let bucket = std::path::absolute(dir.join("buckets").join(hotkey))?;
    Ok(NodeConfig {
        hparams: h.clone(),
        netuid: 1,
        hotkey: hotkey.to_string(),
        bucket_url: format!("file://{}", bucket.display()),
        bucket_options: BucketOptions::default(),
        state_dir: dir.join(format!("{role}s")).join(hotkey),
        device: Device::Cpu,
        // Validators recompute through another f32 path than the miners' (other micro-batches,
        // so every gradient is summed in another order): the code check must hold across it.
        micro_batch_rows: if role == "validator" { 3 } else { 8 },
        auto_register: Some(stake),
        allow_local_buckets: true,
        allow_private_endpoints: true,
    })
}

/// Run the devnet in lockstep in this process and return the report.
pub async fn run_in_process(opts: &DevnetOptions) -> anyhow::Result<Report> {
    if opts.miners == 0 && opts.adversaries.is_empty() {
        bail!("no miners to run");
    }
    if opts.validators == 0 {
        bail!("at least one validator is needed to lead");
    }
    let mut h = opts.hparams.clone();
    h.model = opts.model.clone();
    h.compression = opts.compression;
    h.validate()?;
    std::fs::create_dir_all(&opts.dir)?;
    // Fast blocks: seeds exist as soon as the lockstep driver asks for them.
    let chain = Arc::new(Devnet::open(&opts.dir.join("devnet"), Duration::from_millis(20))?);
    let dyn_chain: Arc<dyn Chain> = chain.clone();
    let mut strategies = BTreeMap::new();
    let mut slots = Vec::new();
    // Stall-flood hotkeys register first: they hold the lowest uids.
    let miner_adversaries = || opts.adversaries.iter().filter(|s| !s.is_validator());
    let plan: Vec<Strategy> = miner_adversaries()
        .filter(|s| **s == Strategy::StallFlood)
        .flat_map(|s| std::iter::repeat_n(*s, s.hotkeys()))
        .chain(std::iter::repeat_n(Strategy::Honest, opts.miners))
        .chain(
            miner_adversaries()
                .filter(|s| **s != Strategy::StallFlood)
                .flat_map(|s| std::iter::repeat_n(*s, s.hotkeys())),
        )
        .collect();
    for (i, s) in plan.iter().enumerate() {
        let hotkey = format!("m{i:02}-{}", s.name());
        let cfg: MinerConfig = node_config(opts, &h, &hotkey, "miner", 0)?;
        let bucket_dir = opts.dir.join("buckets").join(&hotkey);
        let miner = Miner::new(cfg, dyn_chain.clone()).await.with_context(|| format!("starting {hotkey}"))?;
        let endpoint = match s {
            Strategy::Stall | Strategy::StallFlood => Some(Endpoint::stall().await?),
            Strategy::SplitView => Some(Endpoint::split_view(bucket_dir).await?),
            _ => None,
        };
        if let Some(e) = &endpoint {
            chain.set_commitment(1, &hotkey, &e.bucket_url("attacker")).await?;
        }
        strategies.insert(hotkey, *s);
        slots.push(MinerSlot { miner, strategy: *s, last_grad: None, seen_recomputed: false, _endpoint: endpoint });
    }
    let rogue_plan: Vec<Strategy> = opts.adversaries.iter().copied().filter(|s| s.is_validator()).collect();
    // The trust model needs honest validators to hold more than half of the publishing
    // stake: with hostile validators, add honest ones (2000 stake each) until they do.
    let rogue_stake: u64 = rogue_plan.iter().map(|s| s.validator_stake()).sum();
    let needed = if rogue_plan.is_empty() { 1 } else { (rogue_stake / 2000 + 1) as usize };
    let n_validators = opts.validators.max(needed);
    if n_validators > opts.validators {
        tracing::info!(
            asked = opts.validators,
            running = n_validators,
            rogue_stake,
            "adding honest validators so that they hold a stake majority against the hostile ones"
        );
    }
    let mut validators = Vec::new();
    // Verifiers the honest validators caught lying in their verdicts, in order.
    let contradicted: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    for v in 0..n_validators {
        let hotkey = format!("validator-{v}");
        // Validator 0 has the most stake of the honest ones: it leads when no hostile
        // validator outranks it. With hostile validators, every honest one holds 2000.
        let stake = if v == 0 || !rogue_plan.is_empty() { 2000 } else { 1000 };
        let cfg = ValidatorConfig {
            node: node_config(opts, &h, &hotkey, "validator", stake)?,
            max_miners_per_window: opts.max_miners,
            heldout_pages: 0,
        };
        let mut validator = Validator::new(cfg, dyn_chain.clone()).await?;
        let caught = contradicted.clone();
        validator.on_event(move |e| {
            if let bistro_validate::ValidatorEvent::VerifierContradicted { verifier, .. } = e
                && let Ok(mut c) = caught.lock()
            {
                c.push(verifier.clone());
            }
        });
        validators.push(validator);
    }
    let mut rogues = Vec::new();
    for s in &rogue_plan {
        let hotkey = format!("validator-{}", s.name());
        let cfg = ValidatorConfig {
            node: node_config(opts, &h, &hotkey, "validator", s.validator_stake())?,
            max_miners_per_window: opts.max_miners,
            heldout_pages: 0,
        };
        let v = Validator::new(cfg, dyn_chain.clone()).await?;
        let endpoint = match s {
            Strategy::StallingLead => Some(Endpoint::stall().await?),
            _ => None,
        };
        if let Some(e) = &endpoint {
            chain.set_commitment(1, &hotkey, &e.bucket_url("attacker")).await?;
        }
        rogues.push(strategy::Rogue { strategy: *s, validator: v, _endpoint: endpoint });
    }
    let rogue_hotkeys: Vec<String> = rogues
        .iter()
        .filter(|r| r.strategy != Strategy::StallingLead)
        .map(|r| r.validator.node().cfg.hotkey.clone())
        .collect();
    let model_config = ModelConfig::resolve(&h.model)?;
    let reference = Params::genesis(&model_config, h.genesis_seed, &Device::Cpu)?;
    let mut reference_adam = PublicAdam::zeros(reference.specs());
    let mut backdoored = match plan.contains(&Strategy::Backdoor) {
        true => {
            Some((Params::genesis(&model_config, h.genesis_seed, &Device::Cpu)?, PublicAdam::zeros(reference.specs())))
        }
        false => None,
    };
    let mut honest_slice_bytes = 0;
    let lead_node = || validators[0].node();
    let heldout = lead_node().dataset.pages(&h.network, "bistro/held-out", u64::MAX, opts.heldout_pages);
    let trigger = strategy::backdoor_batch(lead_node())?;
    let stop = Arc::new(AtomicBool::new(false));
    // Every role reads a window's registry at its seed block: start with the first window
    // whose seed block comes after every node has registered and committed (joining takes
    // a while), every node at genesis.
    let start = h.window_of(chain.block_number().await?) + 1;
    for slot in slots.iter_mut() {
        slot.miner.node_mut().window = start;
    }
    for v in validators.iter_mut() {
        v.node_mut().window = start;
    }
    for r in rogues.iter_mut() {
        r.validator.node_mut().window = start;
    }
    let mut reports = Vec::new();
    let mut by_strategy: BTreeMap<String, StrategyReport> = BTreeMap::new();
    // The lead's state identity at the start of each window (a late joiner must land on it).
    let mut lead_states: BTreeMap<u64, String> = BTreeMap::new();
    for w in start..start + opts.windows {
        lead_states.insert(w, validators[0].node().state_hash.clone());
        let shared_loss = mean_loss(validators[0].params(), validators[0].node(), &heldout)?;
        let reference_loss = mean_loss(&reference, validators[0].node(), &heldout)?;
        // 1. Every miner trains on its pages at theta_w (cheaters do what cheaters do).
        let mut grads: Vec<Option<WindowGradient>> = Vec::new();
        for slot in slots.iter_mut() {
            let g = strategy::train(slot, &h, w, &stop).await?;
            grads.push(g);
        }
        let honest_trained =
            slots.iter().zip(&grads).filter(|(s, g)| s.strategy == Strategy::Honest && g.is_some()).count();
        // 2. The window ends: the seed exists; miners upload.
        chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(30)).await?;
        let seed = validators[0].node().ctx.seed(w).await?;
        let guessed_seed = chain.block_hash(h.first_block(w)).await?;
        // The window's slice coordinates: one model config, so the same for every node.
        let idx = SliceIndices::select(reference.specs(), &seed, h.compression);
        let mut first_honest_values: Option<slices::SliceUpdate> = None;
        // The conditional cheats that upload an honest slice this window.
        let honest_now: Vec<String> = slots
            .iter()
            .filter(|s| match s.strategy {
                Strategy::Patient => !s.seen_recomputed,
                Strategy::SampleAware => w % 2 == 0,
                _ => false,
            })
            .map(|s| s.miner.node().cfg.hotkey.clone())
            .collect();
        for (si, (slot, g)) in slots.iter().zip(&grads).enumerate() {
            let cx = strategy::UploadContext {
                h: &h,
                window: w,
                seed: &seed,
                indices: &idx,
                guessed_seed: &guessed_seed,
                trigger: &trigger,
                first_honest: first_honest_values.as_ref(),
            };
            let bytes = strategy::upload(slot, si, g.as_ref(), &cx)?;
            if first_honest_values.is_none()
                && slot.strategy == Strategy::Honest
                && let Some(b) = &bytes
            {
                let node = slot.miner.node();
                let exp = slices::expectation(
                    &node.params,
                    &idx,
                    node.ctx.meta(w, &node.cfg.hotkey, &node.state_hash),
                    u64::MAX,
                    h.codec(),
                );
                first_honest_values = Some(slices::decode(b, &exp).map_err(|e| anyhow::anyhow!("{e}"))?);
            }
            if let Some(b) = bytes {
                if slot.strategy == Strategy::Honest {
                    honest_slice_bytes = b.len();
                }
                slot.miner.upload_slice(b, u64::MAX, &stop).await;
            }
        }
        // 3. Validators: the lead (validator 0) collects first, scores, decides and publishes
        //    the accepted set; the others score against the same state and follow it.
        let mut rows = Vec::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        // Each phase runs on every validator before the next: the lead publishes, every
        // validator attests or disputes, then everyone follows what a stake majority attested.
        let mut prepared = Vec::new();
        for v in validators.iter_mut() {
            prepared.push(v.prepare_window(Pace::Lockstep, true, &stop).await?);
        }
        let mut rogue_prepared = Vec::new();
        for r in rogues.iter_mut() {
            let p = r.validator.prepare_window(Pace::Lockstep, true, &stop).await?;
            strategy::lie_in_verdicts(r, &p).await?;
            rogue_prepared.push(p);
        }
        // Every verdict sheet is out: each validator decides (the lead publishes).
        let caught_before = contradicted.lock().map(|c| c.len()).unwrap_or(0);
        for (v, p) in validators.iter_mut().zip(prepared.iter_mut()) {
            v.decide_window(p, &stop).await?;
        }
        for (r, p) in rogues.iter_mut().zip(rogue_prepared.iter_mut()) {
            r.validator.decide_window(p, &stop).await?;
            strategy::misbehave(r, p).await?;
        }
        let recomputed: Vec<usize> = prepared.iter().map(|p| p.recomputed()).collect();
        let assigned: Vec<usize> = prepared.iter().map(|p| p.share()).collect();
        let valid_slices = prepared.first().map(|p| p.valid_slices()).unwrap_or(0);
        let deciding = prepared.iter().position(|p| p.own_aggregate().is_some_and(|(_, _, lead)| lead));
        for (v, p) in validators.iter_mut().zip(prepared.iter_mut()) {
            v.attest_window(p, &stop).await?;
        }
        for (r, p) in rogues.iter_mut().zip(rogue_prepared.iter_mut()) {
            if r.strategy == Strategy::StallingLead {
                r.validator.attest_window(p, &stop).await?;
            }
        }
        // Verifiers caught this window: while deciding, and while settling a fallback (a
        // hostile lead's window; counted only at deciding, a liar every honest validator
        // caught that way looked never caught).
        let newly_contradicted: Vec<String> =
            contradicted.lock().map(|c| c[caught_before..].to_vec()).unwrap_or_default();
        for (r, p) in rogues.iter_mut().zip(rogue_prepared) {
            r.validator.finish_window(p, &stop).await?;
        }
        let mut rogue_applied = 0;
        let mut updated = false;
        for (vi, (v, p)) in validators.iter_mut().zip(prepared).enumerate() {
            let out = v.finish_window(p, &stop).await?;
            if let Followed::Applied { set, .. } = &out.followed {
                rogue_applied += rogue_hotkeys.contains(&set.lead) as usize;
                updated |= vi == 0;
            }
            if vi == 0 {
                if let Followed::Applied { set, .. } = &out.followed {
                    accepted = set.included.iter().map(|i| i.hotkey.clone()).collect();
                    rejected = set.excluded.iter().map(|x| (x.hotkey.clone(), x.reason.clone())).collect();
                }
                for r in out.rows {
                    let strategy = strategies.get(&r.hotkey).copied().unwrap_or(Strategy::Honest);
                    rows.push(MinerRow {
                        uid: r.uid,
                        hotkey: r.hotkey,
                        strategy,
                        status: r.status,
                        r: r.r,
                        e: r.e,
                        weight: r.weight,
                    });
                }
            }
            if opts.fork_at.is_some_and(|(fv, fw)| fv == vi && start + fw == w) {
                // One wrong merge: a write into the state that no accepted set made.
                let node = v.node_mut();
                let idx: Vec<u32> = (0..8).collect();
                node.params.scatter(0, &idx, &[0.5; 8])?;
                // The identity of the state it now holds: one link no accepted set made.
                node.state_hash = bistro_train::lineage::produce(&node.state_hash, w, true, &[vec![0.5; 8]], None).id;
                node.anchor = None;
                node.full_hash = None;
                tracing::warn!(validator = vi, window = w, "forked on purpose");
            }
        }
        // 4. Miners follow the accepted set (a fork victim misses this window's).
        for slot in slots.iter_mut() {
            if slot.strategy == Strategy::ForkVictim && w == start + 2 {
                slot.miner.node_mut().window = w + 1;
                tracing::warn!(window = w, "fork victim: missed this window's aggregate");
                continue;
            }
            let out = slot.miner.follow(Pace::Lockstep, &stop).await?;
            if let Followed::Applied { set, .. } = &out {
                if slot.strategy == Strategy::Honest {
                    rogue_applied += rogue_hotkeys.contains(&set.lead) as usize;
                }
                let me = &slot.miner.node().cfg.hotkey;
                slot.seen_recomputed |= set.included.iter().any(|i| &i.hotkey == me && i.e.is_some());
            }
        }
        for hk in &accepted {
            let name = strategies.get(hk).map(|s| s.name()).unwrap_or("honest").to_string();
            by_strategy.entry(name).or_insert(StrategyReport { share: 0.0, included_windows: 0 }).included_windows += 1;
        }
        // 5. The honest-only reference: the same rule (each honest miner's codes under its
        //    own dithers, decoded, combined, the public AdamW step) on the honest miners' pages;
        //    beside it, when a backdoor miner runs, the counterfactual model that included
        //    the backdoor's slice every window as well.
        let honest: Vec<&Node> =
            slots.iter().filter(|s| s.strategy == Strategy::Honest).map(|s| s.miner.node()).collect();
        reference_step(&h, w, &seed, &idx, &honest, (&reference, &mut reference_adam), None)?;
        if let Some((params, adam)) = backdoored.as_mut() {
            reference_step(&h, w, &seed, &idx, &honest, (params, adam), Some(&trigger))?;
        }
        let lead_hash = validators[0].node().state_hash.clone();
        let forks = slots
            .iter()
            .filter(|s| s.strategy == Strategy::Honest)
            .map(|s| &s.miner.node().state_hash)
            .chain(validators[1..].iter().map(|v| &v.node().state_hash))
            .filter(|hsh| **hsh != lead_hash)
            .count();
        let diff = max_abs_diff(validators[0].params(), &reference)?;
        tracing::info!(window = w, heldout_loss = shared_loss, reference_loss, diff, forks, "window done");
        reports.push(WindowReport {
            window: w,
            heldout_loss: shared_loss,
            reference_loss,
            max_abs_diff_vs_reference: diff,
            miners: rows,
            accepted,
            rejected,
            forks,
            honest_trained,
            rogue_applied,
            updated,
            recomputed,
            honest_now,
            assigned,
            valid_slices,
            deciding,
            contradicted: newly_contradicted,
        });
        if let (Some(hook), Some(r)) = (&opts.on_window, reports.last()) {
            (hook.0)(r);
        }
    }
    let lead_hash = validators[0].node().state_hash.clone();
    lead_states.insert(validators[0].node().window, lead_hash.clone());
    // A node joining now bootstraps from the validators' published, attested checkpoints
    // (each named by the anchored link of its lineage).
    let (mut joiner_origin, mut joiner_on_lead_chain) = (String::new(), false);
    if opts.late_joiner {
        let joiner = bistro_train::node::Node::join(
            local_node_config(&opts.dir, &h, "late-joiner", "miner", 0)?,
            dyn_chain.clone(),
            "",
        )
        .await?;
        joiner_origin = joiner.origin.clone();
        joiner_on_lead_chain = lead_states.get(&joiner.window) == Some(&joiner.state_hash);
    }
    let identical = slots
        .iter()
        .filter(|s| s.strategy == Strategy::Honest)
        .map(|s| &s.miner.node().state_hash)
        .chain(validators[1..].iter().map(|v| &v.node().state_hash))
        .all(|hsh| *hsh == lead_hash);
    let forks_detected =
        slots.iter().map(|s| s.miner.node().forks).chain(validators.iter().map(|v| v.node().forks)).sum();
    let forks_repaired =
        slots.iter().map(|s| s.miner.node().repairs).chain(validators.iter().map(|v| v.node().repairs)).sum();
    // Final weight shares: the reporting validator's whole scoreboard (with p < 1 a
    // window's rows list only the miners it recomputed).
    let mut shares = BTreeMap::new();
    let board = validators[0].scoreboard();
    for (uid, w) in board.weights(h.temperature) {
        let Some(hk) = board.uids.get(&uid).map(|s| s.hotkey.clone()) else { continue };
        let strategy = strategies.get(&hk).copied().unwrap_or(Strategy::Honest);
        by_strategy
            .entry(strategy.name().to_string())
            .or_insert(StrategyReport { share: 0.0, included_windows: 0 })
            .share += w;
        shares.insert(hk, w);
    }
    for hk in strategies.keys() {
        shares.entry(hk.clone()).or_insert(0.0);
    }
    let v0 = validators[0].params();
    let final_heldout_loss = mean_loss(v0, validators[0].node(), &heldout)?;
    let final_reference_loss = mean_loss(&reference, validators[0].node(), &heldout)?;
    let (backdoor_loss, backdoor_reference_loss, backdoor_included_loss) = if plan.contains(&Strategy::Backdoor) {
        (
            Some(batch_loss(v0, validators[0].node(), &trigger)?),
            Some(batch_loss(&reference, validators[0].node(), &trigger)?),
            match &backdoored {
                Some((params, _)) => Some(batch_loss(params, validators[0].node(), &trigger)?),
                None => None,
            },
        )
    } else {
        (None, None, None)
    };
    drop(slots);
    Ok(Report {
        model: opts.model.clone(),
        compression: opts.compression,
        windows: reports,
        shares,
        strategies,
        by_strategy,
        all_nodes_identical: identical,
        forks_detected,
        forks_repaired,
        final_heldout_loss,
        final_reference_loss,
        backdoor_loss,
        backdoor_reference_loss,
        backdoor_included_loss,
        honest_slice_bytes,
        joiner_origin,
        joiner_on_lead_chain,
    })
}
