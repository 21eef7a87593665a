//! The validator: collect the window's slices, recompute miners' gradients on their pages
//! from `theta_w`, compare with the gradients their slices imply, decide (as the lead) or
//! keep as a fallback the window's accepted set, follow it, keep per-uid EMAs, set weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use std::collections::{BTreeMap, HashSet};

use bistro_chain::{Chain, ChainError, Metagraph};
use bistro_model::{Llama, Params};
use bistro_train::accepted::AggregateObject;
use bistro_train::hparams::PROTOCOL_VERSION;
use bistro_train::network::attestation::{Statement, Verdict};
use bistro_train::node::{Followed, Found, Listeners, Node, NodeConfig, NodeError, Pace, now_ms, sleep_until_ms};
use bistro_train::step;
use bistro_train::sync::SyncError;
use bistro_train::sync::WindowSlices;
use bistro_train::verdicts::{MinerVerdict, VerdictSheet};

use crate::assignment::{Assignment, assignment_block, lead_quota};
use crate::audit::{Audit, audit};
use crate::lead::{self, NormHistory};
use crate::recompute::{Budget, MinerResult, Scorer, private_sample};
use crate::score::{ScoreRow, Scoreboard, fold_scores, quantize};
use crate::verification::{self, VerdictBook};

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
    /// A verifier's signed verdict was contradicted by this validator's own recomputation of
    /// the same slice: its verdicts no longer count here for a while.
    VerifierContradicted {
        /// The window.
        window: u64,
        /// The verifier.
        verifier: String,
        /// The miner its verdict was about.
        miner: String,
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
    /// Verifiers whose verdicts an own recomputation contradicted, until which window they
    /// do not count here.
    contradicted: BTreeMap<String, u64>,
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
            contradicted: BTreeMap::new(),
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

    /// Process the held window: [`Self::prepare_window`], [`Self::decide_window`],
    /// [`Self::attest_window`], then [`Self::finish_window`]. Far behind the chain
    /// (`score == false`), it only follows.
    pub async fn process_window(
        &mut self,
        pace: Pace,
        score: bool,
        stop: &Arc<AtomicBool>,
    ) -> Result<WindowOutcome, ValidatorError> {
        let mut prepared = self.prepare_window(pace, score, stop).await?;
        self.decide_window(&mut prepared, stop).await?;
        self.attest_window(&mut prepared, stop).await?;
        self.finish_window(prepared, stop).await
    }

    /// Collect the slices after the upload deadline and recompute miners within the
    /// verification budget: under shared verification (`verifiers_per_miner > 0`) the
    /// miners the public draw assigned to this validator (and, for the lead, a private
    /// sample of the others', its audits), whose verdicts it then publishes signed; else
    /// miners in a private random order. Far behind the chain (`score == false`), or
    /// restarted after publishing this window, nothing is collected.
    pub async fn prepare_window(
        &mut self,
        pace: Pace,
        score: bool,
        stop: &Arc<AtomicBool>,
    ) -> Result<Prepared, ValidatorError> {
        let w = self.node.window;
        let h = self.node.cfg.hparams.clone();
        let skip = Prepared { window: w, pace, scored: None, work: None };
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
        let me = self.node.cfg.hotkey.clone();
        self.node.review_disputes(w).await?;
        let is_lead = self.node.lead(w).await?.is_some_and(|lead| lead == me);
        let assignment = match h.verifiers_per_miner {
            0 => None,
            r => self.draw_assignment(w, r as usize, pace, stop).await,
        };
        let (order, share) = match &assignment {
            Some(a) => {
                let share: HashSet<String> = a.share_of(&me).into_iter().collect();
                let (mine, others): (Vec<_>, Vec<_>) = miners.iter().cloned().partition(|(_, hk)| share.contains(hk));
                let mut order = private_sample(&mine, usize::MAX);
                if is_lead {
                    order.extend(private_sample(&others, audit_count(h.audit_share, others.len())));
                }
                (order, share)
            }
            None => (private_sample(&miners, self.max_miners_per_window), HashSet::new()),
        };
        let budget = match pace {
            Pace::Live => Some(Budget::from_now(h.verify_budget_ms, self.board.on_probation(&miners))),
            Pace::Lockstep => None,
        };
        let started = Instant::now();
        bistro_train::telemetry::phase("verify");
        let (scorer, flag, ws) = (self.scorer.clone(), stop.clone(), Arc::new(ws));
        let (theta_w, ws2) = (self.node.params.clone(), ws.clone());
        let results = tokio::task::spawn_blocking(move || scorer.score(&theta_w, &ws2, &order, &flag, budget.as_ref()))
            .await
            .map_err(|e| ValidatorError::Config(format!("scoring task failed: {e}")))??;
        let seconds = started.elapsed().as_secs_f64();
        let recomputed = results.iter().filter(|r| r.recomputed).count();
        bistro_train::telemetry::phase_seconds("verify", seconds);
        metrics::gauge!(bistro_train::telemetry::RECOMPUTED).set(recomputed as f64);
        tracing::info!(
            window = w,
            recomputed,
            miners = miners.len(),
            share = share.len(),
            seconds,
            "recomputed miners' gradients"
        );
        if let Some(a) = &assignment {
            let verdicts = results
                .iter()
                .filter(|r| share.contains(&r.hotkey))
                .map(|r| MinerVerdict {
                    hotkey: r.hotkey.clone(),
                    sha256: ws
                        .peers
                        .iter()
                        .find(|p| p.hotkey == r.hotkey)
                        .and_then(|p| p.sha256.clone())
                        .unwrap_or_default(),
                    status: r.status.clone(),
                    e: r.recomputed.then_some(r.e),
                })
                .collect();
            if let Err(e) = self.node.publish_verdicts(w, &a.randomness, verdicts).await {
                tracing::warn!(window = w, error = %e, "cannot publish this validator's verdicts");
            }
        }
        let parent = self.node.state_hash.clone();
        let share = share.len();
        let scored = Scored { ws, results, mg, miners, seconds, parent, assignment, share };
        Ok(Prepared { window: w, pace, scored: Some(scored), work: None })
    }

    /// The window's public draw of miners to verifiers, from the hash of its assignment
    /// block (waited for until the lead's cut-off when live). `None`, logged, when the block
    /// cannot be read: this validator then recomputes in a private order as without sharing.
    async fn draw_assignment(&self, w: u64, r: usize, pace: Pace, stop: &Arc<AtomicBool>) -> Option<Assignment> {
        let h = &self.node.cfg.hparams;
        let chain = &self.node.chain;
        let block = assignment_block(h, w, chain.block_time().as_millis() as u64);
        // The block is due at the deadline, readable once final; waiting past the point
        // where the verification budget still fits before the lead's cut-off would leave
        // nothing to verify with (this validator then verifies privately this window).
        let give_up = match pace {
            Pace::Live => self.node.cutoffs_ms(w).await.ok()?.0.saturating_sub(h.verify_budget_ms),
            Pace::Lockstep => now_ms() + 4 * h.upload_grace_secs * 1000 + 10_000,
        };
        let hash = loop {
            match chain.block_hash(block).await {
                Ok(hash) => break hash,
                Err(ChainError::FutureBlock(_)) if now_ms() < give_up && !stop.load(Ordering::Relaxed) => {
                    tokio::time::sleep(chain.block_time() / 4).await;
                }
                Err(e) => {
                    tracing::warn!(window = w, block, error = %e, "cannot read the assignment block: verifying privately this window");
                    return None;
                }
            }
        };
        let roster = self.node.ctx.roster(w).await.ok()?;
        let verifiers: Vec<String> = bistro_train::accepted::validators_by_stake(&roster.metagraph)
            .into_iter()
            .filter(|n| roster.commitments.contains_key(&n.uid))
            .map(|n| n.hotkey)
            .collect();
        // The miners of the roster (no permit, a committed bucket), not of this validator's
        // collection: every validator draws over the same list.
        let miners: Vec<String> = roster
            .metagraph
            .neurons
            .iter()
            .filter(|n| !n.validator_permit && roster.commitments.contains_key(&n.uid))
            .map(|n| n.hotkey.clone())
            .collect();
        // The first verifier in stake order is the expected lead: it audits on top of its
        // share, so it is dealt less (every validator computes the same quota).
        let quota =
            verifiers.first().map(|v| (v.as_str(), lead_quota(miners.len(), verifiers.len(), r, h.audit_share)));
        Some(Assignment::draw_balanced(&hash, &miners, &verifiers, r, quota))
    }

    /// Read the verdict sheets of the window's verifiers (not this validator's own: its
    /// recomputations are in hand), all at once. Live, poll until every verifier's sheet is
    /// in or the verdict cut-off (halfway from the end of the verification budget to the
    /// lead's cut-off) passes; a bucket that does not answer by then, or serves an unusable
    /// sheet, is not read again this window.
    async fn read_verdicts(&self, w: u64, a: &Assignment, pace: Pace, stop: &Arc<AtomicBool>) -> Vec<VerdictSheet> {
        let h = &self.node.cfg.hparams;
        let Ok(publishers) = self.node.publishers(w, true).await else { return Vec::new() };
        // Validators this node skips (a stalled bucket, a disputed aggregate) are not waited for.
        let wanted: Vec<_> = publishers
            .into_iter()
            .filter(|p| !a.share_of(&p.hotkey).is_empty() && !self.node.is_skipped(&p.hotkey, w))
            .collect();
        let cutoff = match (pace, self.node.ctx.deadline_ms(w).await) {
            (Pace::Live, Ok(deadline)) => {
                let checked = h.collect_budget_ms + h.verify_budget_ms;
                deadline + checked + h.aggregate_wait_ms.saturating_sub(checked) / 2
            }
            _ => now_ms() + LOCKSTEP_VERDICT_WAIT_MS,
        };
        let mut sheets: BTreeMap<String, VerdictSheet> = BTreeMap::new();
        let mut done: HashSet<String> = HashSet::new();
        loop {
            let mut reads = tokio::task::JoinSet::new();
            for p in wanted.iter().filter(|p| !done.contains(&p.hotkey)) {
                let (bucket, hotkey) = (p.bucket.clone(), p.hotkey.clone());
                reads.spawn(async move {
                    let got = bistro_train::verdicts::fetch(&bucket, &hotkey, w).await;
                    (hotkey, got)
                });
            }
            let wait = std::time::Duration::from_millis(cutoff.saturating_sub(now_ms()).max(1));
            let _ = tokio::time::timeout(wait, async {
                while let Some(joined) = reads.join_next().await {
                    let Ok((hotkey, got)) = joined else { continue };
                    match got {
                        Ok(Some(s)) => {
                            sheets.insert(hotkey.clone(), s);
                            done.insert(hotkey);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(window = w, verifier = %hotkey, error = %e, "unusable verdicts");
                            done.insert(hotkey);
                        }
                    }
                }
            })
            .await;
            if !reads.is_empty() {
                // Still reading at the cut-off: those buckets stall; not read again.
                reads.abort_all();
                break;
            }
            if done.len() >= wanted.len()
                || pace == Pace::Lockstep
                || now_ms() >= cutoff
                || stop.load(Ordering::Relaxed)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::info!(window = w, read = sheets.len(), verifiers = wanted.len(), "verdict sheets read");
        sheets.into_values().collect()
    }

    /// Decide the window's accepted set from this validator's recomputations and, under
    /// shared verification, the verifiers' counted verdicts (the lead first settles with
    /// its own recomputation every miner the verdicts leave open: verifiers that disagree,
    /// stall or lost their voice; a verifier any own recomputation contradicts loses its
    /// voice here for [`CONTRADICTED_SKIP`](crate::verification::CONTRADICTED_SKIP) windows).
    /// The lead publishes it at once with its own attestation; any other validator keeps it
    /// as its fallback, settled in its turn only if it has to offer it.
    pub async fn decide_window(
        &mut self,
        prepared: &mut Prepared,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), ValidatorError> {
        let Some(sc) = prepared.scored.take() else { return Ok(()) };
        let (w, pace) = (prepared.window, prepared.pace);
        let me = self.node.cfg.hotkey.clone();
        let is_lead = self.node.lead(w).await?.is_some_and(|lead| lead == me);
        let sheets = match &sc.assignment {
            Some(a) => self.read_verdicts(w, a, pace, stop).await,
            None => Vec::new(),
        };
        let mut work = Work::new(sc, sheets, is_lead);
        if is_lead {
            let (lead_cutoff, _) = self.node.cutoffs_ms(w).await?;
            let until = lead_cutoff.saturating_sub(self.node.cfg.hparams.aggregate_wait_ms / 10);
            self.settle(&mut work, w, pace, until, stop).await?;
        } else {
            self.note_contradictions(&mut work, w);
        }
        self.decide_work(&mut work)?;
        if is_lead {
            let (_, final_cutoff) = self.node.cutoffs_ms(w).await?;
            if pace == Pace::Lockstep || now_ms() < final_cutoff {
                for i in &work.decision.included {
                    bistro_train::telemetry::decision(match (i.e.is_some(), i.verified_by.is_empty()) {
                        (true, true) => "included-recomputed",
                        (true, false) => "included-verdicts",
                        (false, _) => "included-record",
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
        prepared.work = Some(work);
        Ok(())
    }

    /// What this validator counts `work`'s verdicts from (shared verification only).
    fn ledger(&self, work: &Work) -> Option<verification::Ledger> {
        Some(verification::Ledger {
            fetched: verification::fetched_digests(&work.ws),
            assignment: work.assignment.clone()?,
            sheets: work.sheets.clone(),
            me: self.node.cfg.hotkey.clone(),
            tolerance: self.node.cfg.hparams.honest_tolerance,
        })
    }

    /// Recompute every miner the verdicts leave open (when live, until `until`, Unix ms: for
    /// the lead shortly before its cut-off, for a fallback a fifth of the fallback wait
    /// after it), note the verifiers these and earlier recomputations contradict, and
    /// go on with the miners that leaves open ([`verification::settle`]: a caught verifier's
    /// honest verdicts stop counting for its other miners too).
    async fn settle(
        &mut self,
        work: &mut Work,
        w: u64,
        pace: Pace,
        until: u64,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), ValidatorError> {
        let Some(ledger) = self.ledger(work) else { return Ok(()) };
        let budget = (pace == Pace::Live).then(|| Budget::from_now(until.saturating_sub(now_ms()), HashSet::new()));
        let started = Instant::now();
        let (scorer, flag, ws, theta_w) =
            (self.scorer.clone(), stop.clone(), work.ws.clone(), self.node.params.clone());
        let miners = work.miners.clone();
        let (mut ignored, mut results) = (self.ignored_verifiers(w), std::mem::take(&mut work.results));
        let task = tokio::task::spawn_blocking(move || {
            let out = verification::settle(&ledger, &mut ignored, &mut results, |open| {
                tracing::info!(
                    window = w,
                    miners = open.len(),
                    "settling by recomputation what the verdicts leave open"
                );
                let order: Vec<(u16, String)> = miners.iter().filter(|(_, hk)| open.contains(hk)).cloned().collect();
                scorer.score(&theta_w, &ws, &order, &flag, budget.as_ref())
            });
            (out, results)
        });
        let (out, results) = task.await.map_err(|e| ValidatorError::Config(format!("scoring task failed: {e}")))?;
        work.results = results;
        work.results.sort_by_key(|r| r.uid);
        work.seconds += started.elapsed().as_secs_f64();
        self.take_settled(work, w, out?);
        Ok(())
    }

    /// Keep what settling `work` found: the verifiers it caught lose their voice here, and
    /// the verdicts counted without them.
    fn take_settled(&mut self, work: &mut Work, w: u64, settled: verification::Settled) {
        for (verifier, miner) in &settled.caught {
            self.caught(verifier, miner, w);
        }
        work.book = settled.book;
    }

    /// Note that `verifier`'s verdict on `miner` contradicts this validator's recomputation:
    /// its verdicts stop counting here for
    /// [`CONTRADICTED_SKIP`](crate::verification::CONTRADICTED_SKIP) windows.
    fn caught(&mut self, verifier: &str, miner: &str, w: u64) {
        tracing::warn!(window = w, %verifier, %miner, "a verifier's verdict contradicts this validator's recomputation: its verdicts no longer count here");
        self.contradicted.insert(verifier.to_string(), w + verification::CONTRADICTED_SKIP);
        self.emit(ValidatorEvent::VerifierContradicted {
            window: w,
            verifier: verifier.to_string(),
            miner: miner.to_string(),
        });
    }

    /// Count `work`'s verdicts, note the verifiers this validator's recomputations contradict
    /// (they lose their voice here) and count the verdicts again without them: settling
    /// without recomputing anything more.
    fn note_contradictions(&mut self, work: &mut Work, w: u64) {
        let Some(ledger) = self.ledger(work) else { return };
        let mut ignored = self.ignored_verifiers(w);
        let none = |_: &[String]| Ok::<_, std::convert::Infallible>(Vec::new());
        let Ok(settled) = verification::settle(&ledger, &mut ignored, &mut work.results, none);
        self.take_settled(work, w, settled);
    }

    /// Decide `work`'s accepted set and build its aggregate.
    fn decide_work(&mut self, work: &mut Work) -> Result<(), ValidatorError> {
        let h = self.node.cfg.hparams.clone();
        let w = work.ws.window;
        work.decision = lead::decide(&work.ws, &work.results, &work.book, &self.board, &self.norms, &h);
        let me = self.node.cfg.hotkey.clone();
        work.obj =
            lead::build(&self.node.params, &mut self.node.adam, &work.parent, &work.ws, &work.decision, &me, &h)?;
        let expect = self.node.ctx.aggregate_expectation(&self.node.params, &work.ws.indices, w);
        work.bytes = bytes::Bytes::from(
            bistro_train::accepted::encode(&expect, &work.obj)
                .map_err(|e| ValidatorError::Config(format!("cannot encode the aggregate: {e}")))?,
        );
        Ok(())
    }

    /// Verifiers whose verdicts do not count here in `window`: contradicted recently, or
    /// skipped by this node (a stalled bucket, a disputed aggregate). Their assigned miners
    /// fall to the deciding validator's own recomputation.
    fn ignored_verifiers(&self, window: u64) -> HashSet<String> {
        let skipped = self.node.skipped.iter().filter(|(v, _)| self.node.is_skipped(v, window)).map(|(v, _)| v.clone());
        self.contradicted.iter().filter(|(_, until)| **until > window).map(|(v, _)| v.clone()).chain(skipped).collect()
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
    pub async fn attest_window(
        &mut self,
        prepared: &mut Prepared,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), ValidatorError> {
        let Some(work) = prepared.work.as_mut() else { return Ok(()) };
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
            // Its fallback must stand on its own: first settle what the verdicts left open.
            // The lead's cut-off may have passed (a stalled lead): settle into the fallback
            // wait, leaving time to publish before the others stop looking.
            if work.assignment.is_some() && !verification::to_settle(&work.book, &work.results).is_empty() {
                let until = lead_cutoff + h.fallback_wait_ms / 5;
                self.settle(work, w, pace, until, stop).await?;
                self.decide_work(work)?;
            }
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
        let own: Vec<f64> = work
            .decision
            .included
            .iter()
            .filter(|i| i.e.is_some() && i.verified_by.is_empty())
            .map(|i| i.norm)
            .filter(|n| n.is_finite())
            .collect();
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

/// In lockstep (tests, replays), how long a validator reads the verifiers' sheets, which are
/// all published before anyone decides: only a stalling bucket takes this long.
const LOCKSTEP_VERDICT_WAIT_MS: u64 = 3_000;

/// A window collected and recomputed by [`Validator::prepare_window`], then decided by
/// [`Validator::decide_window`], waiting for [`Validator::attest_window`] and
/// [`Validator::finish_window`].
#[derive(Debug)]
pub struct Prepared {
    window: u64,
    pace: Pace,
    scored: Option<Scored>,
    work: Option<Work>,
}

impl Prepared {
    /// The window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Miners this validator recomputed in the window (its share and audits under shared
    /// verification, and disputes it settled).
    pub fn recomputed(&self) -> usize {
        let results = match (&self.work, &self.scored) {
            (Some(w), _) => &w.results,
            (None, Some(s)) => &s.results,
            (None, None) => return 0,
        };
        results.iter().filter(|r| r.recomputed).count()
    }

    /// Miners the public draw assigned to this validator in the window (0 without shared
    /// verification).
    pub fn share(&self) -> usize {
        match (&self.work, &self.scored) {
            (Some(w), _) => w.share,
            (None, Some(s)) => s.share,
            (None, None) => 0,
        }
    }

    /// Valid slices this validator collected in the window: what recomputing every miner
    /// (full coverage) costs.
    pub fn valid_slices(&self) -> usize {
        let ws = match (&self.work, &self.scored) {
            (Some(w), _) => &w.ws,
            (None, Some(s)) => &s.ws,
            (None, None) => return 0,
        };
        ws.peers.iter().filter(|p| p.outcome.is_ok()).count()
    }

    /// This validator's own aggregate of the window (when it collected it), and whether it
    /// published it as the lead.
    pub fn own_aggregate(&self) -> Option<(&AggregateObject, &bytes::Bytes, bool)> {
        self.work.as_ref().map(|w| (&w.obj, &w.bytes, w.is_lead))
    }
}

/// What a validator holds of a window it collected and recomputed, before deciding.
#[derive(Debug)]
struct Scored {
    ws: Arc<WindowSlices>,
    results: Vec<MinerResult>,
    mg: Metagraph,
    miners: Vec<(u16, String)>,
    seconds: f64,
    parent: String,
    assignment: Option<Assignment>,
    share: usize,
}

/// What a validator holds of a window it collected and decided.
#[derive(Debug)]
struct Work {
    assignment: Option<Assignment>,
    sheets: Vec<VerdictSheet>,
    book: VerdictBook,
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
    share: usize,
}

impl Work {
    /// A scored window with the verdict sheets read, not decided yet.
    fn new(sc: Scored, sheets: Vec<VerdictSheet>, is_lead: bool) -> Self {
        let Scored { ws, results, mg, miners, seconds, parent, assignment, share } = sc;
        Work {
            assignment,
            sheets,
            book: VerdictBook::new(),
            ws,
            results,
            decision: lead::Decision::default(),
            obj: AggregateObject::default(),
            bytes: bytes::Bytes::new(),
            mg,
            miners,
            seconds,
            parent,
            is_lead,
            share,
        }
    }
}

/// How many of `n` miners to audit at `share`: `share * n` rounded down, plus one with the
/// probability of the fraction left (this validator's own entropy), so that each miner is
/// audited with probability `share` however few there are.
fn audit_count(share: f64, n: usize) -> usize {
    use rand_core::{RngCore, SeedableRng};
    let want = share.clamp(0.0, 1.0) * n as f64;
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let coin = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (want.floor() as usize + usize::from(coin < want.fract())).min(n)
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

#[cfg(test)]
mod tests {
    #[test]
    fn audits_are_the_share_in_expectation() {
        assert_eq!(super::audit_count(0.0, 10), 0);
        assert_eq!(super::audit_count(1.0, 10), 10);
        assert_eq!(super::audit_count(0.5, 10), 5);
        let total: usize = (0..4000).map(|_| super::audit_count(0.125, 1)).sum();
        assert!((350..650).contains(&total), "{total} audits of 4000 at 1/8");
    }
}
