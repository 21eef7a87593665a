//! The validator: collect the window's slices, recompute miners' gradients on their pages
//! from `theta_w`, compare with the gradients their slices imply, decide (as the lead) or
//! keep as a fallback the window's accepted set, follow it, keep per-uid EMAs, set weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bistro_chain::{Chain, ChainError};
use bistro_model::{Llama, Params};
use bistro_train::hparams::PROTOCOL_VERSION;
use bistro_train::node::{Followed, Listeners, Node, NodeConfig, NodeError, Pace, now_ms, sleep_until_ms};
use bistro_train::step;
use bistro_train::sync::SyncError;

use crate::lead::{self, NormHistory};
use crate::recompute::{Scorer, private_sample};
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
    /// The kernel failed.
    #[error(transparent)]
    Kernel(#[from] bistro_kernels::KernelError),
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

    /// Process the held window: collect the slices after the upload deadline, recompute
    /// miners in a private random order within the verification budget, decide the window's
    /// accepted set (published at once when this validator is the lead, kept as a fallback
    /// otherwise), follow the accepted set, fold the scores into the EMAs and set weights on
    /// schedule. Far behind the chain (`score == false`), it only follows.
    pub async fn process_window(
        &mut self,
        pace: Pace,
        score: bool,
        stop: &Arc<AtomicBool>,
    ) -> Result<WindowOutcome, ValidatorError> {
        let w = self.node.window;
        let h = self.node.cfg.hparams.clone();
        if !score {
            let f = self.node.follow(pace, stop, None).await?;
            self.after_follow(&f);
            return Ok(WindowOutcome { followed: f, rows: Vec::new() });
        }
        if pace == Pace::Live {
            sleep_until_ms(self.node.ctx.deadline_ms(w).await?, stop).await;
        }
        // Restarted after publishing this window's accepted set (killed before saving the
        // state it produced): never decide a published window again; follow what was published.
        let own = bistro_train::protocol::aggregate_key(w);
        if self.node.bucket.head(&own).await.is_ok() {
            tracing::info!(window = w, "this validator already published the window's accepted set; following it");
            let f = self.node.follow(pace, stop, None).await?;
            self.after_follow(&f);
            return Ok(WindowOutcome { followed: f, rows: Vec::new() });
        }
        let ws = self.node.ctx.collect(&self.node.params, w, &self.node.cfg.hotkey).await?;
        let mg = self.node.chain.metagraph(self.node.cfg.netuid).await?;
        let miners = ws.miners();
        let order = private_sample(&miners, self.max_miners_per_window);
        let budget_end = match pace {
            Pace::Live => Some(Instant::now() + std::time::Duration::from_millis(h.verify_budget_ms)),
            Pace::Lockstep => None,
        };
        let started = Instant::now();
        bistro_train::telemetry::phase("verify");
        let (scorer, flag, ws) = (self.scorer.clone(), stop.clone(), Arc::new(ws));
        let (theta_w, ws2) = (self.node.params.clone(), ws.clone());
        let mut results = tokio::task::spawn_blocking(move || scorer.score(&theta_w, &ws2, &order, &flag, budget_end))
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
        let obj = lead::build(&self.node.params, &self.node.state_hash, &ws, &decision, &me, &h)?;
        let expect = self.node.ctx.aggregate_expectation(&self.node.params, &ws.indices, w);
        let bytes = bytes::Bytes::from(
            bistro_train::accepted::encode(&expect, &obj)
                .map_err(|e| ValidatorError::Config(format!("cannot encode the aggregate: {e}")))?,
        );
        let is_lead = self.node.lead().await?.is_some_and(|lead| lead == me);
        let mut candidate = Some(bytes.clone());
        if is_lead {
            let (_, final_cutoff) = self.node.cutoffs_ms(w).await?;
            if pace == Pace::Lockstep || now_ms() < final_cutoff {
                for i in &decision.included {
                    bistro_train::telemetry::decision(if i.e.is_some() {
                        "included-recomputed"
                    } else {
                        "included-record"
                    });
                }
                for x in &decision.excluded {
                    bistro_train::telemetry::decision(&x.reason);
                }
                match self.node.bucket.put(&bistro_train::protocol::aggregate_key(w), bytes).await {
                    Ok(()) => self.emit(ValidatorEvent::Published {
                        window: w,
                        included: decision.included.len(),
                        excluded: decision.excluded.iter().map(|x| (x.hotkey.clone(), x.reason.clone())).collect(),
                        scored: decision.scored,
                    }),
                    Err(e) => tracing::warn!(window = w, error = %e, "cannot publish the accepted set"),
                }
            } else {
                tracing::warn!(window = w, "the accepted set was decided after the cut-off; not published");
            }
            candidate = None;
        }
        let followed = self.node.follow(pace, stop, candidate).await?;
        // The outlier bound's reference: the norms of the slices this validator itself
        // recomputed and found honest, never the norms an aggregate reports (red team 3,
        // F9/F13: a lead or on-record sybils could steer every validator's reference).
        let own: Vec<f64> =
            decision.included.iter().filter(|i| i.e.is_some()).map(|i| i.norm).filter(|n| n.is_finite()).collect();
        self.norms.push(w, own, h.norm_history_windows);
        if let Err(e) = self.norms.save(&self.node.cfg.state_dir.join("norms.json")) {
            tracing::error!(error = %e, "cannot save the norm history");
        }
        self.after_follow(&followed);
        let (rows, weights) = fold_scores(&mut self.board, &results, w, &mg, &miners, &h);
        self.emit(ValidatorEvent::Scored { window: w, rows: rows.clone(), seconds });
        if let Err(e) = self.board.save(&self.node.cfg.state_dir.join("scores.json")) {
            tracing::error!(error = %e, "cannot save scores");
        }
        if (w + 1).is_multiple_of(h.windows_per_weights) && !weights.is_empty() {
            let (uids, q) = quantize(&weights);
            let (netuid, hotkey) = (self.node.cfg.netuid, &self.node.cfg.hotkey);
            match bistro_chain::submit_weights(
                self.node.chain.as_ref(),
                netuid,
                hotkey,
                &uids,
                &q,
                PROTOCOL_VERSION as u64,
            )
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
                Ok(_) => {
                    self.emit(ValidatorEvent::WeightsSet { window: w, weights: uids.into_iter().zip(q).collect() })
                }
                Err(e) => self.emit(ValidatorEvent::WeightsFailed { window: w, reason: e.to_string() }),
            }
        }
        Ok(WindowOutcome { followed, rows })
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

/// What one processed window gave.
#[derive(Clone, Debug)]
pub struct WindowOutcome {
    /// The accepted set as this validator followed it.
    pub followed: Followed,
    /// The score rows of the window (empty when it was not scored).
    pub rows: Vec<ScoreRow>,
}
