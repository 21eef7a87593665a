//! What a devnet run reports: per window, per miner and per strategy, and its charts.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Strategy;

/// One miner in one window, as the lead saw it.
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
    /// `R = -||g_m - g_v||` (NaN when nothing was recomputed).
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
    /// Held-out loss of the honest-only centralised reference at the start of the window.
    pub reference_loss: f64,
    /// Largest |shared - reference| over all parameters after the window.
    pub max_abs_diff_vs_reference: f64,
    /// Every miner, as the lead scored it.
    pub miners: Vec<MinerRow>,
    /// Hotkeys whose slices the accepted set included.
    pub accepted: Vec<String>,
    /// Miners the accepted set excluded, with the reason.
    pub rejected: Vec<(String, String)>,
    /// Honest nodes (miners and validators) whose state differs from the lead's after the window.
    pub forks: usize,
    /// Honest miners that trained this window.
    pub honest_trained: usize,
    /// Honest nodes that applied an aggregate published by a hostile validator.
    pub rogue_applied: usize,
    /// Whether the reporting validator applied an accepted set this window.
    pub updated: bool,
    /// Miners each honest validator recomputed this window (its share, audits, settled
    /// disputes; every miner its budget allows without shared verification).
    pub recomputed: Vec<usize>,
    /// Hotkeys of the conditional cheats (`patient` before it has seen itself recomputed,
    /// `sample-aware` in even windows) whose upload this window was honest.
    pub honest_now: Vec<String>,
    /// Miners the public draw assigned to each honest validator (shared verification).
    pub assigned: Vec<usize>,
    /// Valid slices the first honest validator collected: what full coverage recomputes.
    pub valid_slices: usize,
    /// The honest validator that published this window's aggregate as the lead, if one did.
    pub deciding: Option<usize>,
    /// Verifiers an honest validator caught this window (a verdict its own recomputation
    /// contradicted), once per catch.
    pub contradicted: Vec<String>,
}

/// How far one strategy got.
#[derive(Clone, Debug, Serialize)]
pub struct StrategyReport {
    /// Total weight share of its hotkeys (the lead's weights).
    pub share: f64,
    /// Windows in which one of its slices was included.
    pub included_windows: u64,
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
    /// Final weight share per miner hotkey (the lead's).
    pub shares: BTreeMap<String, f64>,
    /// Strategy per miner hotkey.
    pub strategies: BTreeMap<String, Strategy>,
    /// Per strategy: weight share and inclusions.
    pub by_strategy: BTreeMap<String, StrategyReport>,
    /// Whether every honest node (miners and validators) ended with the lead's state.
    pub all_nodes_identical: bool,
    /// Forks detected over the run, summed over nodes.
    pub forks_detected: u64,
    /// Forks repaired over the run, summed over nodes.
    pub forks_repaired: u64,
    /// Held-out loss at the end.
    pub final_heldout_loss: f64,
    /// Held-out loss of the honest-only reference at the end.
    pub final_reference_loss: f64,
    /// Mean loss of the backdoor's trigger -> target batch on the shared model at the end
    /// (lower means implanted), when a `backdoor` miner ran.
    pub backdoor_loss: Option<f64>,
    /// The same on the honest-only reference.
    pub backdoor_reference_loss: Option<f64>,
    /// The same on the counterfactual that included the backdoor's slice every window
    /// beside the honest miners' (what an implanted backdoor looks like on this run).
    pub backdoor_included_loss: Option<f64>,
    /// Bytes of an honest miner's slice (its upload per window), as last uploaded.
    pub honest_slice_bytes: usize,
    /// Where a node that joined after the run got its state (a verified checkpoint of the
    /// validators, or genesis).
    pub joiner_origin: String,
    /// Whether the joiner's state is the one the lead held at the joiner's window.
    pub joiner_on_lead_chain: bool,
}

impl Report {
    /// Weight share of honest miners.
    pub fn honest_share(&self) -> f64 {
        self.shares.iter().filter(|(h, _)| self.strategies[*h] == Strategy::Honest).map(|(_, s)| s).sum()
    }

    /// Weight share of destructive miners.
    pub fn destructive_share(&self) -> f64 {
        self.shares.iter().filter(|(h, _)| self.strategies[*h].destructive()).map(|(_, s)| s).sum()
    }

    /// A readable summary table.
    pub fn summary(&self) -> String {
        let mut s =
            format!("devnet: model {}, compression {}, {} windows\n", self.model, self.compression, self.windows.len());
        s.push_str("window  held-out loss  reference loss  max |shared - reference|  included  forks\n");
        for w in &self.windows {
            s.push_str(&format!(
                "{:>6}  {:>13.4}  {:>14.4}  {:>24.3e}  {:>8}  {:>5}\n",
                w.window,
                w.heldout_loss,
                w.reference_loss,
                w.max_abs_diff_vs_reference,
                w.accepted.len(),
                w.forks
            ));
        }
        s.push_str(&format!("final  {:>13.4}  {:>14.4}\n\n", self.final_heldout_loss, self.final_reference_loss));
        let windows = self.windows.len().max(1) as f64;
        let valid = self.windows.iter().map(|w| w.valid_slices).sum::<usize>() as f64 / windows;
        let per: Vec<f64> = (0..self.windows.first().map_or(0, |w| w.recomputed.len()))
            .map(|i| {
                self.windows.iter().map(|w| w.recomputed.get(i).copied().unwrap_or(0)).sum::<usize>() as f64 / windows
            })
            .collect();
        if !per.is_empty() {
            let mean = per.iter().sum::<f64>() / per.len() as f64;
            s.push_str(&format!(
                "recomputations per honest validator per window: {} (mean {mean:.1}; full coverage {valid:.1} valid slices)\n",
                per.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ")
            ));
            let caught: Vec<String> = self
                .windows
                .iter()
                .filter(|w| !w.contradicted.is_empty())
                .map(|w| format!("{} in window {}", w.contradicted[0], w.window))
                .collect();
            if !caught.is_empty() {
                s.push_str(&format!("verifiers caught contradicting a recomputation: {}\n", caught.join("; ")));
            }
            s.push('\n');
        }
        s.push_str("miner                      strategy        mean e      last status   weight share\n");
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
                "{:<25}  {:<14}  {:>9.3e}  {:<12}  {:>12.5}\n",
                hk,
                self.strategies[hk].name(),
                mean_e,
                status,
                share
            ));
        }
        s.push_str(&format!(
            "\nhonest share {:.4}, destructive share {:.6}; forks detected {}, repaired {}\n",
            self.honest_share(),
            self.destructive_share(),
            self.forks_detected,
            self.forks_repaired
        ));
        if let (Some(b), Some(r)) = (self.backdoor_loss, self.backdoor_reference_loss) {
            s.push_str(&format!("backdoor trigger->target loss: shared {b:.4}, honest-only reference {r:.4}"));
            if let Some(i) = self.backdoor_included_loss {
                s.push_str(&format!(", had it been included {i:.4}"));
            }
            s.push('\n');
        }
        s.push_str(&format!("all honest nodes hold the lead's state: {}\n", self.all_nodes_identical));
        if !self.joiner_origin.is_empty() {
            s.push_str(&format!(
                "a node joining after the run: {}; on the lead's chain: {}\n",
                self.joiner_origin, self.joiner_on_lead_chain
            ));
        }
        let honest: Vec<f64> = self
            .windows
            .iter()
            .flat_map(|w| w.miners.iter().filter(|m| m.strategy == Strategy::Honest && m.status == "ok").map(|m| m.e))
            .collect();
        s.push_str(&format!(
            "honest miners: {} recomputations (validators through other micro-batches), largest e {:.3e}\n",
            honest.len(),
            honest.iter().cloned().fold(0.0, f64::max)
        ));
        s.push_str(&format!("upload per honest miner per window: {} bytes\n", self.honest_slice_bytes));
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
                crate::svg::Series { label: "honest-only reference", color: "#2471a3", points: reference },
            ],
            "final weight share",
            &bars,
        )
    }
}
