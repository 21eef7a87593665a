//! The validator: collect the window's slices, recompute miners' gradients on their pages
//! from `theta_w`, compare with the gradients their slices imply, decide (as the lead) or
//! keep as a fallback the window's accepted set, follow it, keep per-uid EMAs, set weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use std::collections::HashSet;

use bistro_chain::{Chain, ChainError, Metagraph};
use bistro_model::{Llama, Params};
use bistro_train::accepted::AggregateObject;
use bistro_train::hparams::PROTOCOL_VERSION;
use bistro_train::network::attestation::{Statement, Verdict};
use bistro_train::node::{Followed, Found, Listeners, Node, NodeConfig, NodeError, Pace, now_ms, sleep_until_ms};
use bistro_train::step;
use bistro_train::sync::SyncError;
use bistro_train::sync::WindowSlices;

use crate::audit::{Audit, audit};
use crate::lead::{self, NormHistory};
use crate::recompute::{Budget, MinerResult, Scorer, private_sample};
use crate::score::{ScoreRow, Scoreboard, fold_scores, quantize};

/// Errors that stop a validator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidatorError {
    /// Configuration is wrong.
    #[error("validator config: {0}")]
    Config(String),
    /// The chain refused something fatal.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// Data could not be opened.
    #[error(transparent)]
    Data(#[from] bistro_train::data::DataError),
    /// Window sync failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Joining or merging failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Recomputation failed.
    #[error(transparent)]
    Step(#[from] step::StepError),
}

impl ValidatorError {
    /// Whether the operator's settings are wrong rather than something at run time.
    pub fn is_config(&self) -> bool {
        match self {
            ValidatorError::Config(_) | ValidatorError::Chain(ChainError::Config(_)) => true,
            ValidatorError::Node(e) => e.is_config(),
            ValidatorError::Model(e) => e.is_config(),
            _ => false,
        }
    }
}

/// Everything a validator needs.
#[derive(Clone, Debug)]
pub struct ValidatorConfig {
    /// The settings every node shares.
    pub node: NodeConfig,
    /// Most miners recomputed per window (sampled when there are more).
    pub max_miners_per_window: usize,
    /// Pages of the fixed held-out set on which the shared model's loss is measured after
    /// every window (0: not measured).
    pub heldout_pages: usize,
}

/// What a validator reports.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ValidatorEvent {
    /// Ready.
    Started {
        /// This validator's uid.
        uid: u16,
        /// The window its model belongs to.
        window: u64,
        /// Where the model came from.
        origin: String,
    },
    /// As the lead, this validator published the window's accepted set.
    Published {
        /// The window.
        window: u64,
        /// Included slices.
        included: usize,
        /// Excluded miners: (hotkey, reason code).
        excluded: Vec<(String, String)>,
        /// Miners recomputed before deciding.
        scored: usize,
    },
    /// The window's accepted set was applied, or there was none, or a fork was found.
    Followed(Followed),
    /// A window was scored.
    Scored {
        /// The window.
        window: u64,
        /// One row per evaluated miner.
        rows: Vec<ScoreRow>,
        /// Time spent recomputing.
        seconds: f64,
    },
    /// The shared model's loss on the held-out pages after a window.
    HeldOut {
        /// The window whose accepted set was just applied.
        window: u64,
        /// Mean loss per target token.
        loss: f64,
    },
    /// Weights were set on chain.
    WeightsSet {
        /// The window.
        window: u64,
        /// `(uid, u16 weight)`.
        weights: Vec<(u16, u16)>,
    },
    /// Weights were committed timelocked (commit-reveal subnet); the chain applies them by
    /// itself at `reveal_block`.
    WeightsCommitted {
        /// The window.
        window: u64,
        /// `(uid, u16 weight)`.
        weights: Vec<(u16, u16)>,
        /// The beacon round the commit is encrypted to.
        reveal_round: u64,
        /// The block at which the chain reveals and applies them.
        reveal_block: u64,
    },
    /// Setting weights failed (retried next time).
    WeightsFailed {
        /// The window.
        window: u64,
        /// Why.
        reason: String,
    },
}

/// A validator node.
pub struct Validator {
    node: Node,
    max_miners_per_window: usize,
    heldout_pages: usize,
    scorer: Arc<Scorer>,
    board: Scoreboard,
    norms: NormHistory,
    listeners: Listeners<ValidatorEvent>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator").field("node", &self.node).finish()
    }
}

impl Validator {
    /// Build a validator: data, model state, scores, bucket; register (devnet) and commit the bucket.
    pub async fn new(cfg: ValidatorConfig, chain: Arc<dyn Chain>) -> Result<Self, ValidatorError> {
        let mut node =
            Node::join(cfg.node, chain, " (register it with `btcli subnet register` and stake to it)").await?;
        node.publishes_history = true;
        let board = Scoreboard::load(&node.cfg.state_dir.join("scores.json")).map_err(ValidatorError::Config)?;
        let norms = NormHistory::load(&node.cfg.state_dir.join("norms.json")).map_err(ValidatorError::Config)?;
        let scorer = Arc::new(Scorer {
            hparams: node.cfg.hparams.clone(),
            dataset: node.dataset.clone(),
            tokenizer: node.tokenizer.clone(),
            device: node.cfg.device.clone(),
            micro_batch_rows: node.cfg.micro_batch_rows,
        });
        Ok(Validator {
            node,
            max_miners_per_window: cfg.max_miners_per_window.max(1),
            heldout_pages: cfg.heldout_pages,
            scorer,
            board,
            norms,
            listeners: Listeners::default(),
        })
    }

    /// Call `f` for every event.
    pub fn on_event(&mut self, f: impl Fn(&ValidatorEvent) + Send + Sync + 'static) {
        self.listeners.add(f);
    }

    fn emit(&self, e: ValidatorEvent) {
        self.listeners.emit(&e);
    }

    /// The parameters held now.
    pub fn params(&self) -> &Params {
        &self.node.params
    }

    /// The window the parameters belong to.
    pub fn window(&self) -> u64 {
        self.node.window
    }

    /// The node this validator runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node, mutably (test drivers use it to fork a node on purpose).
    pub fn node_mut(&mut self) -> &mut Node {
        &mut self.node
    }

    /// The scoreboard.
    pub fn scoreboard(&self) -> &Scoreboard {
        &self.board
    }

    /// Process the held window: [`Self::prepare_window`], [`Self::attest_window`], then
    /// [`Self::finish_window`]. Far behind the chain (`score == false`), it only follows.
    pub async fn process_window(
        &mut self,
        pace: Pace,
        score: bool,
        stop: &Arc<AtomicBool>,
    ) -> Result<WindowOutcome, ValidatorError> {
        let prepared = self.prepare_window(pace, score, stop).await?;
        self.attest_window(&prepared, stop).await?;
        self.finish_window(prepared, stop).await
    }

    /// Collect the slices after the upload deadline, recompute miners in a private random
    /// order within the verification budget and decide the window's accepted set. The lead
    /// publishes it at once with its own attestation; any other validator keeps it as its
    /// fallback. Far behind the chain (`score == false`), or restarted after publishing this
    /// window, nothing is collected.
    pub async fn prepare_window(
        &mut self,
        pace: Pace,
        score: bool,
        stop: &Arc<AtomicBool>,
    ) -> Result<Prepared, ValidatorError> {
        let w = self.node.window;
        let h = self.node.cfg.hparams.clone();
        let skip = Prepared { window: w, pace, work: None };
        if !score {
            return Ok(skip);
        }
        if pace == Pace::Live {
            sleep_until_ms(self.node.ctx.deadline_ms(w).await?, stop).await;
        }
        // Restarted after publishing this window's accepted set (killed before saving the
        // state it produced): never decide a published window again; follow what was published.
        let own = bistro_train::protocol::aggregate_key(w);
        if self.node.bucket.head(&own).await.is_ok() {
            tracing::info!(window = w, "this validator already published the window's accepted set; following it");
            return Ok(skip);
        }
        let ws =
            self.node.ctx.collect(&self.node.params, &self.node.state_hash.clone(), w, &self.node.cfg.hotkey).await?;
        let mg = self.node.ctx.roster(w).await?.metagraph.clone();
        let miners = ws.miners();
        let order = private_sample(&miners, self.max_miners_per_window);
        let budget = match pace {
            Pace::Live => Some(Budget::from_now(h.verify_budget_ms, self.board.on_probation(&miners))),
            Pace::Lockstep => None,
        };
        let started = Instant::now();
        bistro_train::telemetry::phase("verify");
        let (scorer, flag, ws) = (self.scorer.clone(), stop.clone(), Arc::new(ws));
        let (theta_w, ws2) = (self.node.params.clone(), ws.clone());
        let mut results =
            tokio::task::spawn_blocking(move || scorer.score(&theta_w, &ws2, &order, &flag, budget.as_ref()))
                .await
                .map_err(|e| ValidatorError::Config(format!("scoring task failed: {e}")))??;
        results.sort_by_key(|r| r.uid);
        let seconds = started.elapsed().as_secs_f64();
        let recomputed = results.iter().filter(|r| r.recomputed).count();
        bistro_train::telemetry::phase_seconds("verify", seconds);
        metrics::gauge!(bistro_train::telemetry::RECOMPUTED).set(recomputed as f64);
        tracing::info!(window = w, recomputed, miners = miners.len(), seconds, "recomputed miners' gradients");
        let decision = lead::decide(&ws, &results, &self.board, &self.norms, &h);
        let me = self.node.cfg.hotkey.clone();
        let parent = self.node.state_hash.clone();
        let obj = lead::build(&self.node.params, &mut self.node.adam, &parent, &ws, &decision, &me, &h)?;
        let expect = self.node.ctx.aggregate_expectation(&self.node.params, &ws.indices, w);
        let bytes = bytes::Bytes::from(
            bistro_train::accepted::encode(&expect, &obj)
                .map_err(|e| ValidatorError::Config(format!("cannot encode the aggregate: {e}")))?,
        );
        self.node.review_disputes(w).await?;
        let is_lead = self.node.lead(w).await?.is_some_and(|lead| lead == me);
        let mut work = Work { ws, results, decision, obj, bytes, mg, miners, seconds, parent, is_lead };
        if is_lead {
            let (_, final_cutoff) = self.node.cutoffs_ms(w).await?;
            if pace == Pace::Lockstep || now_ms() < final_cutoff {
                for i in &work.decision.included {
                    bistro_train::telemetry::decision(if i.e.is_some() {
                        "included-recomputed"
                    } else {
                        "included-record"
                    });
                }
                for x in &work.decision.excluded {
                    bistro_train::telemetry::decision(&x.reason);
                }
                match self.publish_own(&work).await {
                    Ok(()) => self.emit(ValidatorEvent::Published {
                        window: w,
                        included: work.decision.included.len(),
                        excluded: work.decision.excluded.iter().map(|x| (x.hotkey.clone(), x.reason.clone())).collect(),
                        scored: work.decision.scored,
                    }),
                    Err(e) => tracing::warn!(window = w, error = %e, "cannot publish the accepted set"),
                }
            } else {
                tracing::warn!(window = w, "the accepted set was decided after the cut-off; not published");
                work.is_lead = false;
            }
        }
        Ok(Prepared { window: w, pace, work: Some(work) })
    }

    /// Publish this validator's own aggregate and attest it.
    async fn publish_own(&self, work: &Work) -> Result<(), ValidatorError> {
        let w = work.obj.set.window;
        self.node
            .bucket
            .put(&bistro_train::protocol::aggregate_key(w), work.bytes.clone())
            .await
            .map_err(NodeError::Storage)?;
        let own = Statement {
            publisher: self.node.cfg.hotkey.clone(),
            aggregate: bistro_train::accepted::bytes_sha256(&work.bytes),
            parent: work.obj.set.parent.clone(),
            state: work.obj.set.state.clone(),
            verdict: Verdict::Attest,
            reason: String::new(),
        };
        self.node.publish_attestation(w, vec![own]).await?;
        Ok(())
    }

    /// Check the aggregate this validator would follow against its own view of the window
    /// and publish its signed attestation: the lead's aggregate, attested or disputed; when
    /// it is missing at the lead's cut-off or disputed, this validator publishes its own
    /// aggregate as a fallback and attests the first fallback (in stake order) that passes
    /// its checks. An honest validator attests at most one aggregate per window; a
    /// validator that did not collect the window, or is off the aggregate's state, says
    /// nothing.
    pub async fn attest_window(&mut self, prepared: &Prepared, stop: &Arc<AtomicBool>) -> Result<(), ValidatorError> {
        let Some(work) = &prepared.work else { return Ok(()) };
        if work.is_lead {
            return Ok(());
        }
        let (w, pace) = (prepared.window, prepared.pace);
        let h = self.node.cfg.hparams.clone();
        let publishers = self.node.publishers(w, false).await?;
        let Some(lead) = self.node.lead_among(&publishers, w).cloned() else { return Ok(()) };
        let (lead_cutoff, final_cutoff) = self.node.cutoffs_ms(w).await?;
        let mut stalled = HashSet::new();
        let mut statements = Vec::new();
        let lead_found = loop {
            let f = self.node.try_publisher_until(&lead, &work.ws.indices, w, pace, lead_cutoff, &mut stalled).await;
            if f.is_some()
                || pace == Pace::Lockstep
                || !stalled.is_empty()
                || now_ms() >= lead_cutoff
                || stop.load(Ordering::Relaxed)
            {
                break f;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        };
        if let Some(f) = &lead_found {
            match self.audit_found(f, work) {
                Audit::Attest => {
                    statements.push(statement(f, Verdict::Attest, String::new()));
                    return self.publish_statements(w, statements).await;
                }
                Audit::Dispute(reason) => {
                    tracing::warn!(window = w, lead = %f.from, %reason, "disputing the lead's aggregate");
                    statements.push(statement(f, Verdict::Dispute, reason));
                }
                Audit::Abstain(reason) => {
                    tracing::info!(window = w, lead = %f.from, %reason, "cannot judge the lead's aggregate");
                }
                Audit::OffState => {
                    // Either this validator or the lead is off the accepted state; which
                    // one, the follow will tell. Silence here would let a lead that names
                    // a bogus parent stop every window: offer the fallbacks instead (this
                    // validator's own names its own state, so it only matters if that is
                    // the accepted one).
                    tracing::warn!(window = w, lead = %f.from, "the lead's aggregate applies to another state than this validator's");
                }
            }
        }
        // The lead's aggregate is missing, wrong or cannot be judged here: offer this
        // validator's own as a fallback, then attest the first fallback in stake order that
        // passes the checks.
        if pace == Pace::Lockstep || now_ms() < final_cutoff {
            tracing::info!(window = w, "publishing this validator's aggregate as a fallback");
            if let Err(e) = self.node.bucket.put(&bistro_train::protocol::aggregate_key(w), work.bytes.clone()).await {
                tracing::warn!(window = w, error = %e, "cannot publish the fallback aggregate");
            }
        }
        // Live, wait a little for validators with more stake to offer theirs.
        let settle = lead_cutoff.max(now_ms()) + h.fallback_wait_ms / 4;
        let candidates: Vec<_> = publishers
            .iter()
            .filter(|p| p.hotkey != lead.hotkey && !self.node.skipped_among(&publishers, &p.hotkey, w))
            .cloned()
            .collect();
        for p in &candidates {
            let found = loop {
                let f = self.node.try_publisher_until(p, &work.ws.indices, w, pace, settle, &mut stalled).await;
                if f.is_some() || pace == Pace::Lockstep || stalled.contains(&p.hotkey) || now_ms() >= settle {
                    break f;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let Some(f) = found else { continue };
            match self.audit_found(&f, work) {
                Audit::Attest => {
                    statements.push(statement(&f, Verdict::Attest, String::new()));
                    break;
                }
                Audit::Dispute(reason) => statements.push(statement(&f, Verdict::Dispute, reason)),
                Audit::Abstain(_) | Audit::OffState => {}
            }
            if statements.len() >= bistro_train::network::attestation::MAX_STATEMENTS {
                break;
            }
        }
        self.publish_statements(w, statements).await
    }

    fn audit_found(&mut self, f: &Found, work: &Work) -> Audit {
        if f.from == self.node.cfg.hotkey {
            return if f.digest == bistro_train::accepted::bytes_sha256(&work.bytes) {
                Audit::Attest
            } else {
                Audit::Abstain("own bucket holds another aggregate".into())
            };
        }
        let node = &mut self.node;
        audit(&f.obj, &work.ws, &work.results, &node.params, &mut node.adam, &work.parent, &node.cfg.hparams)
    }

    async fn publish_statements(&self, w: u64, statements: Vec<Statement>) -> Result<(), ValidatorError> {
        if statements.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.node.publish_attestation(w, statements).await {
            tracing::warn!(window = w, error = %e, "cannot publish the attestation");
        }
        Ok(())
    }

    /// Follow the window's accepted set, fold the scores into the EMAs (not when this
    /// validator was itself off the accepted state: it judged miners against another state)
    /// and set weights on schedule.
    pub async fn finish_window(
        &mut self,
        prepared: Prepared,
        stop: &Arc<AtomicBool>,
    ) -> Result<WindowOutcome, ValidatorError> {
        let (w, pace) = (prepared.window, prepared.pace);
        let h = self.node.cfg.hparams.clone();
        let followed = self.node.follow(pace, stop).await?;
        self.after_follow(&followed);
        let Some(work) = prepared.work else { return Ok(WindowOutcome { followed, rows: Vec::new() }) };
        let off_state = match &followed {
            Followed::Applied { set, repaired, .. } => *repaired || set.parent != work.parent,
            Followed::Forked { .. } => true,
            _ => false,
        };
        if off_state {
            tracing::warn!(window = w, "this validator was off the accepted state: the window is not scored here");
            return Ok(WindowOutcome { followed, rows: Vec::new() });
        }
        // The outlier bound's reference: the norms of the slices this validator itself
        // recomputed and found honest, never the norms an aggregate reports (red team 3,
        // F9/F13: a lead or on-record sybils could steer every validator's reference).
        let own: Vec<f64> =
            work.decision.included.iter().filter(|i| i.e.is_some()).map(|i| i.norm).filter(|n| n.is_finite()).collect();
        self.norms.push(w, own, h.norm_history_windows);
        if let Err(e) = self.norms.save(&self.node.cfg.state_dir.join("norms.json")) {
            tracing::error!(error = %e, "cannot save the norm history");
        }
        let (rows, weights) = fold_scores(&mut self.board, &work.results, w, &work.mg, &work.miners, &h);
        self.emit(ValidatorEvent::Scored { window: w, rows: rows.clone(), seconds: work.seconds });
        if let Err(e) = self.board.save(&self.node.cfg.state_dir.join("scores.json")) {
            tracing::error!(error = %e, "cannot save scores");
        }
        if (w + 1).is_multiple_of(h.windows_per_weights) && !weights.is_empty() {
            self.set_weights(w, &weights).await;
        }
        Ok(WindowOutcome { followed, rows })
    }

    async fn set_weights(&self, w: u64, weights: &[(u16, f64)]) {
        let (uids, q) = quantize(weights);
        let (netuid, hotkey) = (self.node.cfg.netuid, &self.node.cfg.hotkey);
        match bistro_chain::submit_weights(self.node.chain.as_ref(), netuid, hotkey, &uids, &q, PROTOCOL_VERSION as u64)
            .await
        {
            Ok(bistro_chain::WeightsSubmission::Committed { reveal_round, reveal_block }) => {
                self.emit(ValidatorEvent::WeightsCommitted {
                    window: w,
                    weights: uids.into_iter().zip(q).collect(),
                    reveal_round,
                    reveal_block,
                })
            }
            Ok(_) => self.emit(ValidatorEvent::WeightsSet { window: w, weights: uids.into_iter().zip(q).collect() }),
            Err(e) => self.emit(ValidatorEvent::WeightsFailed { window: w, reason: e.to_string() }),
        }
    }

    /// The shared model's mean loss on the fixed held-out pages (the same pages on every
    /// node: hotkey `bistro/held-out`, window `u64::MAX`).
    pub fn heldout_loss(&self) -> Result<Option<f64>, ValidatorError> {
        if self.heldout_pages == 0 {
            return Ok(None);
        }
        let h = &self.node.cfg.hparams;
        let pages = self.node.dataset.pages(&h.network, "bistro/held-out", u64::MAX, self.heldout_pages);
        let batch = self.node.dataset.window_batch(&self.node.tokenizer, &pages, h.seq_len)?;
        let model = Llama::new(&self.node.params)?;
        let (mut sum, mut n) = (0f64, 0usize);
        for r in batch.micro_batches(self.node.cfg.micro_batch_rows.max(1)) {
            let (ids, labels) = batch.tensors(r, &self.node.cfg.device)?;
            let (s, c) = model.loss_sum(&ids, &labels)?;
            let s = s.to_dtype(candle_core::DType::F64).and_then(|t| t.to_scalar::<f64>());
            sum += s.map_err(bistro_model::ModelError::from)?;
            n += c;
        }
        Ok((n > 0).then(|| sum / n as f64))
    }

    /// Report what following did.
    fn after_follow(&mut self, f: &Followed) {
        self.emit(ValidatorEvent::Followed(f.clone()));
        match self.heldout_loss() {
            Ok(Some(loss)) => {
                metrics::gauge!(bistro_train::telemetry::HELDOUT_LOSS).set(loss);
                self.emit(ValidatorEvent::HeldOut { window: f.window(), loss });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot measure the held-out loss"),
        }
    }

    /// Run until `max_windows` windows were scored or `stop` is set.
    pub async fn run(&mut self, max_windows: Option<u64>, stop: Arc<AtomicBool>) -> Result<u64, ValidatorError> {
        self.emit(ValidatorEvent::Started {
            uid: self.node.uid,
            window: self.node.window,
            origin: self.node.origin.clone(),
        });
        let mut scored = 0u64;
        while !stop.load(Ordering::Relaxed) && max_windows.is_none_or(|m| scored < m) {
            let current = match self.node.chain_window().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "chain unavailable; retrying");
                    tokio::time::sleep(self.node.chain.block_time()).await;
                    continue;
                }
            };
            if self.node.window >= current {
                tokio::time::sleep(self.node.chain.block_time() / 4).await;
                continue;
            }
            let behind = current > self.node.window + 2;
            if behind {
                tracing::info!(window = self.node.window, current, "behind the chain: following without scoring");
            }
            match self.process_window(Pace::Live, !behind, &stop).await {
                Ok(_) if !behind => scored += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(window = self.node.window, error = %e, "window failed; retrying");
                    tokio::time::sleep(self.node.chain.block_time()).await;
                }
            }
        }
        Ok(scored)
    }
}

/// A window collected, recomputed and decided by [`Validator::prepare_window`], waiting
/// for [`Validator::attest_window`] and [`Validator::finish_window`].
#[derive(Debug)]
pub struct Prepared {
    window: u64,
    pace: Pace,
    work: Option<Work>,
}

impl Prepared {
    /// The window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// This validator's own aggregate of the window (when it collected it), and whether it
    /// published it as the lead.
    pub fn own_aggregate(&self) -> Option<(&AggregateObject, &bytes::Bytes, bool)> {
        self.work.as_ref().map(|w| (&w.obj, &w.bytes, w.is_lead))
    }
}

/// What a validator holds of a window it collected.
#[derive(Debug)]
struct Work {
    ws: Arc<WindowSlices>,
    results: Vec<MinerResult>,
    decision: lead::Decision,
    obj: AggregateObject,
    bytes: bytes::Bytes,
    mg: Metagraph,
    miners: Vec<(u16, String)>,
    seconds: f64,
    parent: String,
    is_lead: bool,
}

fn statement(f: &Found, verdict: Verdict, reason: String) -> Statement {
    Statement {
        publisher: f.from.clone(),
        aggregate: f.digest.clone(),
        parent: f.obj.set.parent.clone(),
        state: f.obj.set.state.clone(),
        verdict,
        reason,
    }
}

/// What one processed window gave.
#[derive(Clone, Debug)]
pub struct WindowOutcome {
    /// The accepted set as this validator followed it.
    pub followed: Followed,
    /// The score rows of the window (empty when it was not scored).
    pub rows: Vec<ScoreRow>,
}
