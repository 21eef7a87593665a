//! The scale harness: N miners per window on one machine, the real lead pipeline (collect,
//! recompute, decide, aggregate, hash, publish, follow) against a real S3 server (`s3s-fs`)
//! reached through a link with emulated latency and bandwidth.
//!
//! N - 1 miners are *replay* miners: every page holds the same document, so every miner's
//! gradient is the same, computed once by one real [`Miner`] and encoded under each replay
//! hotkey's own dithers, so each slice is genuinely honest (a validator that recomputes one
//! finds `e = 0`) and slices differ by hotkey. The last `cheaters` of them are real
//! adversaries: they upload the same gradient negated (gradient ascent: `e = 2` against an
//! honest recomputation), so the run counts how many cheaters each window catches as
//! dishonest, leaves out unverified, or includes. The lead is the library's [`Validator`];
//! the real miner follows its aggregate like any node. Included by `examples/scale.rs` and
//! its smoke test (`examples/tests/scale.rs`), both of which may use the S3 test server.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use bistro_chain::Chain;
use bistro_chain::devnet::Devnet;
use bistro_train::hparams::HParams;
use bistro_train::miner::{Miner, MinerConfig};
use bistro_train::node::{Followed, Pace};
use bistro_train::slices::{self, SliceIndices};
use bistro_train::storage::{Bucket, BucketOptions, Secret};
use bistro_validate::{Validator, ValidatorConfig};

/// What to run.
#[derive(Clone, Debug)]
pub(crate) struct ScaleOptions {
    /// Miners per window (one real, the rest replay).
    pub(crate) miners: usize,
    /// Windows to measure.
    pub(crate) windows: u64,
    /// Model preset.
    pub(crate) model: String,
    /// Devnet block time (windows are `blocks_per_window` of these; the nodes follow the
    /// wall clock, so deadlines, budgets and cut-offs apply as on a live network).
    pub(crate) block: Duration,
    /// Working directory.
    pub(crate) dir: PathBuf,
    /// Budgets and the rest (model, dataset and network are set by the harness).
    pub(crate) hparams: HParams,
    /// Validators. With 1, the lead runs alone at live pace (deadlines, budgets and
    /// cut-offs as on a network). With more, verification is shared (`verifiers_per_miner`
    /// of `hparams` > 0): every validator's phases run one after another in lockstep and
    /// are timed alone, as if each had this machine to itself, since one machine cannot
    /// run V validators' recomputations at once at live pace.
    pub(crate) validators: usize,
    /// Of the miners, how many cheat (upload the honest gradient negated).
    pub(crate) cheaters: usize,
}

/// The hotkey prefix of the harness's cheating miners.
pub(crate) const CHEATER_PREFIX: &str = "cheat-";

/// One window as the harness measured it.
#[derive(Clone, Debug, Default)]
pub(crate) struct WindowMeasure {
    /// Uploading every slice (the harness's own work, not a node's).
    pub(crate) upload_ms: f64,
    /// The lead from the upload deadline to its aggregate published: collect, recompute,
    /// decide, aggregate, hash, publish (negative: done before the deadline, impossible live).
    pub(crate) lead_publish_ms: f64,
    /// The lead's whole window (also attesting and following its own aggregate).
    pub(crate) lead_window_ms: f64,
    /// A follower fetching, checking and applying the aggregate.
    pub(crate) follow_ms: f64,
    /// Slices included, and how many of them the lead recomputed.
    pub(crate) included: usize,
    /// Of those, recomputed by the lead itself this window.
    pub(crate) recomputed: usize,
    /// Miners excluded for a timeout or a missing slice.
    pub(crate) timeouts: usize,
    /// Honest miners excluded for any other reason.
    pub(crate) other_excluded: usize,
    /// Cheaters included in the aggregate.
    pub(crate) cheaters_included: usize,
    /// Cheaters excluded as `dishonest`: recomputed (here or by complete verdicts) and caught.
    pub(crate) cheaters_caught: usize,
    /// Cheaters excluded without being checked (on probation, unverified, disputed).
    pub(crate) cheaters_unchecked: usize,
    /// Whether the follower applied the lead's aggregate.
    pub(crate) applied: bool,
    /// Shared verification: miners each validator recomputed (the lead last).
    pub(crate) recomputed_by: Vec<usize>,
    /// Shared verification: included on complete verdicts (every assigned verifier found
    /// the slice honest).
    pub(crate) vouched: usize,
}

/// A run at one N.
#[derive(Clone, Debug)]
pub(crate) struct ScaleReport {
    /// Miners per window.
    pub(crate) miners: usize,
    /// Bytes of one slice.
    pub(crate) slice_bytes: u64,
    /// Bytes of one aggregate.
    pub(crate) aggregate_bytes: u64,
    /// Every window measured.
    pub(crate) windows: Vec<WindowMeasure>,
    /// Peak resident memory of the whole process (every node in it), MiB.
    pub(crate) peak_rss_mib: f64,
    /// The budget the lead must publish within (`aggregate_wait_ms`).
    pub(crate) publish_budget_ms: u64,
    /// Validators (1: the lead alone at live pace).
    pub(crate) validators: usize,
    /// Cheating miners among them.
    pub(crate) cheaters: usize,
}

impl ScaleReport {
    /// The largest value of `f` over the windows.
    pub(crate) fn max(&self, f: impl Fn(&WindowMeasure) -> f64) -> f64 {
        self.windows.iter().map(f).fold(0.0, f64::max)
    }

    /// Bytes the lead downloads per window (every slice, from the object sizes).
    pub(crate) fn lead_bytes_down(&self) -> u64 {
        self.slice_bytes * self.miners as u64
    }

    /// One Markdown table row: N, lead publish time (max) against its budget, timeouts,
    /// miners recomputed per window (most, and as a share of N), slices included window by
    /// window, follow time, lead and follower bytes per window, peak RSS.
    pub(crate) fn row(&self) -> String {
        let timeouts: usize = self.windows.iter().map(|w| w.timeouts).sum();
        let included: Vec<String> = self.windows.iter().map(|w| w.included.to_string()).collect();
        let recomputed = self.windows.iter().map(|w| w.recomputed).max().unwrap_or(0);
        if self.validators > 1 {
            return self.shared_row();
        }
        format!(
            "| {} | {:.0} of {} | {} | {} ({:.2}) | {} | {} | {:.0} | {:.1} MB | {:.1} MB | {:.0} MiB |",
            self.miners,
            self.max(|w| w.lead_publish_ms),
            self.publish_budget_ms,
            timeouts,
            recomputed,
            recomputed as f64 / self.miners as f64,
            included.join(" → "),
            self.cheaters_cell(),
            self.max(|w| w.follow_ms),
            self.lead_bytes_down() as f64 / 1e6,
            self.aggregate_bytes as f64 / 1e6,
            self.peak_rss_mib,
        )
    }
}

impl ScaleReport {
    /// [`ScaleReport::row`] under shared verification: N and V, the critical path (the
    /// slowest validator's collect and recomputation, then the lead's decision and
    /// publication, each timed alone), recomputations per validator (most of a non-lead, the
    /// lead's), the share of N included on verdicts or recomputed, and the rest as above.
    fn shared_row(&self) -> String {
        let timeouts: usize = self.windows.iter().map(|w| w.timeouts).sum();
        let included: Vec<String> = self.windows.iter().map(|w| w.included.to_string()).collect();
        let others = self
            .windows
            .iter()
            .flat_map(|w| w.recomputed_by.iter().take(w.recomputed_by.len().saturating_sub(1)))
            .copied()
            .max()
            .unwrap_or(0);
        let lead = self.windows.iter().filter_map(|w| w.recomputed_by.last()).copied().max().unwrap_or(0);
        let checked = self.windows.iter().map(|w| w.vouched + w.recomputed + w.cheaters_caught).min().unwrap_or(0);
        format!(
            "| {} | {} | {:.0} of {} | {} | {} / {} | {} ({:.2}) | {} | {} | {:.0} | {:.1} MB | {:.1} MB | {:.0} MiB |",
            self.miners,
            self.validators,
            self.max(|w| w.lead_publish_ms),
            self.publish_budget_ms,
            timeouts,
            others,
            lead,
            checked,
            checked as f64 / self.miners as f64,
            included.join(" → "),
            self.cheaters_cell(),
            self.max(|w| w.follow_ms),
            self.lead_bytes_down() as f64 / 1e6,
            self.aggregate_bytes as f64 / 1e6,
            self.peak_rss_mib,
        )
    }

    /// The cheaters' cell: how many, then caught / unchecked / included, window by window.
    fn cheaters_cell(&self) -> String {
        if self.cheaters == 0 {
            return "none".into();
        }
        let per: Vec<String> = self
            .windows
            .iter()
            .map(|w| format!("{}/{}/{}", w.cheaters_caught, w.cheaters_unchecked, w.cheaters_included))
            .collect();
        format!("{}: {}", self.cheaters, per.join(" → "))
    }
}

/// The table header matching [`ScaleReport::row`] under shared verification.
pub(crate) const SHARED_TABLE_HEADER: &str = "| N | V | critical path: slowest validator's collect + recompute, then the lead's decide + publish, ms (max) of budget | timeouts | recomputed per validator (max of the others / the lead) | checked per window: on verdicts or recomputed (share, min) | included, window by window | cheaters: caught / unchecked / included, window by window | follower apply, ms (max) | lead download / window | follower download / window | peak RSS (whole process) |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

/// The table header matching [`ScaleReport::row`].
pub(crate) const TABLE_HEADER: &str = "| N | lead deadline → publish, ms (max) of budget | timeouts | recomputed / window (share) | included, window by window | cheaters: caught / unchecked / included, window by window | follower apply, ms (max) | lead download / window | follower download / window | peak RSS (whole process) |\n|---|---|---|---|---|---|---|---|---|---|";

/// Peak resident memory of this process (Linux `VmHWM`), MiB; 0 where unknown.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Run N miners for the given windows against `s3` (the S3 server) behind `link` (the same
/// server through the emulated link), and measure.
pub(crate) async fn run(
    opts: &ScaleOptions,
    s3: std::net::SocketAddr,
    link: std::net::SocketAddr,
) -> anyhow::Result<ScaleReport> {
    anyhow::ensure!(opts.miners >= 1, "at least one miner");
    anyhow::ensure!(opts.miners <= 255, "a subnet holds 256 uids: at most 255 miners beside the lead");
    let dir = &opts.dir;
    std::fs::create_dir_all(dir)?;
    // Every page holds the same document: every miner's gradient is the same.
    let doc = "The scale harness trains every miner on this one document, again and again, so that a \
               single gradient stands for all of them and a validator recomputing any miner finds it \
               honest. ";
    let corpus = dir.join("corpus.jsonl");
    let line = serde_json::json!({ "text": doc.repeat(4) }).to_string();
    std::fs::write(&corpus, std::iter::repeat_n(line, 64).collect::<Vec<_>>().join("\n") + "\n")?;
    let mut h = opts.hparams.clone();
    h.model = opts.model.clone();
    h.dataset = corpus.display().to_string();
    h.network = "scale".into();
    h.validate()?;
    let chain = Arc::new(Devnet::open(&dir.join("devnet"), opts.block)?);
    let dyn_chain: Arc<dyn Chain> = chain.clone();
    let stop = Arc::new(AtomicBool::new(false));

    let mut real = Miner::new(
        bistro_examples::devnet::local_node_config(dir, &h, "real-miner", "miner", 0)? as MinerConfig,
        dyn_chain.clone(),
    )
    .await
    .context("starting the real miner")?;
    // Replay miners: registered, each committing its own bucket on the S3 server, read by
    // peers through the link.
    anyhow::ensure!(opts.cheaters < opts.miners, "at least the real miner is honest");
    let first_cheater = opts.miners - opts.cheaters;
    let replay: Vec<String> = (1..opts.miners)
        .map(|i| if i >= first_cheater { format!("{CHEATER_PREFIX}{i:04}") } else { format!("replay-{i:04}") })
        .collect();
    let owner = BucketOptions {
        access_key_id: Some(crate::support::ACCESS_KEY.into()),
        secret_access_key: Some(Secret::new(crate::support::SECRET_KEY)),
        ..Default::default()
    };
    let root = dir.join("s3");
    let mut own_buckets = Vec::new();
    for hk in &replay {
        let name = hk.to_ascii_lowercase();
        std::fs::create_dir_all(root.join(&name))?;
        chain.ensure_registered(1, hk, 0).await?;
        let peer_url = format!("s3://{name}?endpoint=http://{link}&region=us-east-1{}", crate::support::read_params());
        chain.set_commitment(1, hk, &peer_url).await?;
        own_buckets.push(Bucket::open(&format!("s3://{name}?endpoint=http://{s3}&region=us-east-1"), &owner)?);
    }
    let lead_cfg = ValidatorConfig {
        node: bistro_examples::devnet::local_node_config(dir, &h, "lead", "validator", 2000)?,
        max_miners_per_window: 4096,
        heldout_pages: 0,
    };
    let mut lead = Validator::new(lead_cfg, dyn_chain.clone()).await.context("starting the lead")?;
    let shared = opts.validators > 1;
    anyhow::ensure!(
        !shared || h.verifiers_per_miner > 0,
        "several validators share verification: set verifiers_per_miner"
    );
    anyhow::ensure!(opts.miners + opts.validators <= 256, "a subnet holds 256 uids");
    let mut others = Vec::new();
    for i in 1..opts.validators {
        let cfg = ValidatorConfig {
            node: bistro_examples::devnet::local_node_config(dir, &h, &format!("validator-{i:02}"), "validator", 1000)?,
            max_miners_per_window: 4096,
            heldout_pages: 0,
        };
        others.push(Validator::new(cfg, dyn_chain.clone()).await.with_context(|| format!("starting validator {i}"))?);
    }

    let start = h.window_of(chain.block_number().await?) + 1;
    real.node_mut().window = start;
    lead.node_mut().window = start;
    for v in &mut others {
        v.node_mut().window = start;
    }
    let mut windows = Vec::new();
    let (mut slice_bytes, mut aggregate_bytes) = (0u64, 0u64);
    for w in start..start + opts.windows {
        let g = real.compute_gradient(&stop).await?.context("the real miner did not train")?;
        chain.wait_for_block(h.first_block(w + 1), Duration::from_secs(30)).await?;
        let seed = real.node().ctx.seed(w).await?;
        let g_at_i = real.slice_gradient(&seed, &g)?;
        let up = Instant::now();
        let own = real.encode_slice(&seed, &g_at_i)?;
        slice_bytes = own.len() as u64;
        real.upload_slice(own, u64::MAX, &stop).await;
        // Each replay miner's slice: the same gradient under its own dithers and metadata.
        let node = real.node();
        let idx = SliceIndices::select(node.params.specs(), &seed, h.compression);
        let codec = h.codec();
        let names: Vec<String> = node.params.specs().iter().map(|s| s.name.clone()).collect();
        let mut uploads = Vec::new();
        // A cheater ascends: the same gradient negated.
        let negated: Vec<Vec<f32>> = g_at_i.iter().map(|t| t.iter().map(|x| -x).collect()).collect();
        for (hk, b) in replay.iter().zip(&own_buckets) {
            let g = if hk.starts_with(CHEATER_PREFIX) { &negated } else { &g_at_i };
            let codes = slices::encode_gradient(&codec, g, &slices::dithers(&seed, hk, &idx));
            let bytes = slices::encode(&node.ctx.meta(w, hk, &node.state_hash), &names, &codec, &codes)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (b, key) = (b.clone(), bistro_train::protocol::slice_key(w, hk));
            uploads.push(tokio::spawn(async move { b.put(&key, bytes.into()).await }));
        }
        for u in uploads {
            u.await??;
        }
        let upload_ms = up.elapsed().as_secs_f64() * 1e3;

        if shared {
            // The draw's block (at the upload deadline) first: waiting for it is not work.
            let block = bistro_validate::assignment::assignment_block(&h, w, opts.block.as_millis() as u64);
            chain.wait_for_block(block + 1, Duration::from_secs(60)).await?;
            let m = shared_window(&mut lead, &mut others, &mut real, &stop, upload_ms).await?;
            aggregate_bytes = record(&lead, opts.miners, w, m, &mut windows).await;
            continue;
        }
        // Live pace: the lead waits for the upload deadline, then works under its budgets
        // and publishes only before its cut-off, as on a real network.
        let deadline = lead.node().ctx.deadline_ms(w).await?;
        let t = Instant::now();
        let mut prepared = lead.prepare_window(Pace::Live, true, &stop).await?;
        lead.decide_window(&mut prepared, &stop).await?;
        let lead_publish_ms = bistro_train::node::now_ms() as f64 - deadline as f64;
        lead.attest_window(&mut prepared, &stop).await?;
        let out = lead.finish_window(prepared, &stop).await?;
        let lead_window_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let followed = real.follow(Pace::Live, &stop).await?;
        let follow_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut m = WindowMeasure { upload_ms, lead_publish_ms, lead_window_ms, follow_ms, ..Default::default() };
        m.count(&out.followed, &followed);
        aggregate_bytes = record(&lead, opts.miners, w, m, &mut windows).await;
    }
    Ok(ScaleReport {
        miners: opts.miners,
        slice_bytes,
        aggregate_bytes,
        windows,
        peak_rss_mib: peak_rss_mib(),
        publish_budget_ms: h.aggregate_wait_ms,
        validators: opts.validators,
        cheaters: opts.cheaters,
    })
}

/// One window under shared verification, in lockstep: every validator collects and
/// recomputes its share (and publishes its verdicts), then every validator decides (the
/// lead publishing its aggregate), attests and finishes; then the real miner follows. Each
/// validator's phases are timed alone: the critical path is the slowest validator's
/// preparation plus the lead's decision.
async fn shared_window(
    lead: &mut Validator,
    others: &mut [Validator],
    real: &mut Miner,
    stop: &Arc<AtomicBool>,
    upload_ms: f64,
) -> anyhow::Result<WindowMeasure> {
    let mut slowest_prepare = 0f64;
    let mut prepared = Vec::new();
    for v in others.iter_mut() {
        let t = Instant::now();
        prepared.push(v.prepare_window(Pace::Lockstep, true, stop).await?);
        slowest_prepare = slowest_prepare.max(t.elapsed().as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let mut lead_prepared = lead.prepare_window(Pace::Lockstep, true, stop).await?;
    slowest_prepare = slowest_prepare.max(t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    lead.decide_window(&mut lead_prepared, stop).await?;
    let lead_decide_ms = t.elapsed().as_secs_f64() * 1e3;
    for (v, p) in others.iter_mut().zip(prepared.iter_mut()) {
        v.decide_window(p, stop).await?;
    }
    let mut recomputed_by: Vec<usize> = prepared.iter().map(|p| p.recomputed()).collect();
    recomputed_by.push(lead_prepared.recomputed());
    let t = Instant::now();
    lead.attest_window(&mut lead_prepared, stop).await?;
    for (v, p) in others.iter_mut().zip(prepared.iter_mut()) {
        v.attest_window(p, stop).await?;
    }
    let out = lead.finish_window(lead_prepared, stop).await?;
    for (v, p) in others.iter_mut().zip(prepared) {
        v.finish_window(p, stop).await?;
    }
    let lead_window_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let followed = real.follow(Pace::Lockstep, stop).await?;
    let follow_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut m = WindowMeasure {
        upload_ms,
        lead_publish_ms: slowest_prepare + lead_decide_ms,
        lead_window_ms,
        follow_ms,
        recomputed_by,
        ..Default::default()
    };
    m.count(&out.followed, &followed);
    Ok(m)
}

/// Log and keep window `w`'s measure; returns the size of the lead's aggregate of `w`.
async fn record(lead: &Validator, miners: usize, w: u64, m: WindowMeasure, windows: &mut Vec<WindowMeasure>) -> u64 {
    let agg = lead.node().bucket.head(&bistro_train::protocol::aggregate_key(w)).await;
    tracing::info!(miners, window = w, ?m, "window measured");
    windows.push(m);
    agg.map(|o| o.size).unwrap_or(0)
}

impl WindowMeasure {
    /// Count what the lead's accepted set (as the lead followed it) included and excluded,
    /// and whether the follower applied it.
    fn count(&mut self, lead: &Followed, follower: &Followed) {
        if let Followed::Applied { set, .. } = lead {
            let cheat = |hk: &str| hk.starts_with(CHEATER_PREFIX);
            self.included = set.included.len();
            self.cheaters_included = set.included.iter().filter(|i| cheat(&i.hotkey)).count();
            self.recomputed = set.included.iter().filter(|i| i.verified_by.is_empty() && i.e.is_some()).count();
            self.vouched = set.included.iter().filter(|i| !i.verified_by.is_empty()).count();
            for x in &set.excluded {
                if cheat(&x.hotkey) {
                    if x.reason == "dishonest" {
                        self.cheaters_caught += 1;
                    } else {
                        self.cheaters_unchecked += 1;
                    }
                } else if x.reason.contains("timeout") || x.reason.contains("missing") {
                    self.timeouts += 1;
                } else {
                    self.other_excluded += 1;
                }
            }
        }
        self.applied = matches!(follower, Followed::Applied { .. });
    }
}
