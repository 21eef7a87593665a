//! One arm's result, and the lab's tables, curves and choice over many.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::arm::ArmSpec;
use super::verify::VerifyReport;

/// The result of one arm on one page seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArmReport {
    /// Table label.
    pub label: String,
    /// What ran.
    pub spec: ArmSpec,
    /// Whether a validator can recompute the upload from public data.
    pub verifiable: bool,
    /// The page seed (network name).
    pub network: String,
    /// Windows trained.
    pub windows: u64,
    /// Training tokens per window over all miners.
    pub tokens_per_window: f64,
    /// `(windows trained, held-out loss)`.
    pub curve: Vec<(u64, f64)>,
    /// Encoded upload per miner per window (bytes).
    pub upload_bytes_per_window: f64,
    /// Download per node per window (bytes).
    pub download_bytes_per_window: f64,
    /// Today's compression-300 slice object (bytes): the budget.
    pub budget_bytes_per_window: f64,
    /// Verification measurements (verifiable arms run with `--verify`).
    pub verify: Option<VerifyReport>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl ArmReport {
    /// The arm's label from its spec (reports keep the label of the binary that ran them).
    pub fn name(&self) -> String {
        self.spec.label()
    }

    /// Held-out loss after `w` windows (the last evaluation at or before `w`).
    pub fn loss_at(&self, w: u64) -> Option<f64> {
        self.curve.iter().rev().find(|(x, _)| *x <= w).map(|(_, l)| *l)
    }

    /// Held-out loss at the end.
    pub fn final_loss(&self) -> f64 {
        self.curve.last().map_or(f64::NAN, |c| c.1)
    }

    /// Whether the upload fits today's budget.
    pub fn within_budget(&self) -> bool {
        self.upload_bytes_per_window <= self.budget_bytes_per_window
    }

    /// Whether it passes the verification rule: zero honest inconsistencies at the chosen
    /// tolerance and every cheater detected there.
    pub fn verification_passes(&self) -> bool {
        let Some(v) = self.verify.as_ref().filter(|v| !v.honest.is_empty()) else { return false };
        let Some(i) = v.chosen() else { return false };
        v.honest_inconsistent(i) == 0 && v.all_detected(i)
    }

    fn is_r0(&self) -> bool {
        matches!(self.spec, ArmSpec::AdamW { .. })
    }
}

/// Every report of a lab run, grouped by page seed.
#[derive(Debug, Default)]
pub struct LabTable {
    by_network: BTreeMap<String, Vec<ArmReport>>,
}

/// The windows at which the table reports the loss.
pub const MARKS: [u64; 3] = [96, 192, 384];

fn kb(b: f64) -> String {
    if b == 0.0 { "—".into() } else { format!("{:.1}", b / 1000.0) }
}

impl LabTable {
    /// Group `reports`.
    pub fn new(reports: Vec<ArmReport>) -> Self {
        let mut by_network: BTreeMap<String, Vec<ArmReport>> = BTreeMap::new();
        for r in reports {
            by_network.entry(r.network.clone()).or_default().push(r);
        }
        LabTable { by_network }
    }

    /// The best R0 (lowest final loss) of `network`.
    pub fn r0(&self, network: &str) -> Option<&ArmReport> {
        self.by_network
            .get(network)?
            .iter()
            .filter(|r| r.is_r0())
            .min_by(|a, b| a.final_loss().total_cmp(&b.final_loss()))
    }

    /// The arm the rule picks on `network`: verifiable, within budget, passing verification,
    /// lowest final loss.
    pub fn choice(&self, network: &str) -> Option<&ArmReport> {
        self.by_network
            .get(network)?
            .iter()
            .filter(|r| r.verifiable && !r.is_r0() && r.within_budget() && r.verification_passes())
            .min_by(|a, b| a.final_loss().total_cmp(&b.final_loss()))
    }

    /// The Markdown report: per page seed the loss table and the verification table, then the choice.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for (net, arms) in &self.by_network {
            let r0 = self.r0(net);
            let r0_at = |w: u64| r0.and_then(|r| r.loss_at(w));
            let _ = writeln!(s, "### Page seed `{net}`\n");
            if let Some(r) = r0 {
                let _ = writeln!(
                    s,
                    "{} windows, {:.0} training tokens per window over 4 miners; R0 = {} (best of the sweep).\n",
                    r.windows,
                    r.tokens_per_window,
                    r.name()
                );
            }
            let _ = writeln!(
                s,
                "| arm | verifiable | L@96 | L@192 | L@384 | L/L_R0 @192 | L/L_R0 @384 | upload KB/window | within budget | download KB/window | wall s |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
            for a in arms {
                let ratio = |w: u64| match (a.loss_at(w), r0_at(w)) {
                    (Some(l), Some(b)) if w <= a.windows => format!("{:.4}", l / b),
                    _ => "—".into(),
                };
                let at = |w: u64| {
                    if w <= a.windows { a.loss_at(w).map_or("—".into(), |l| format!("{l:.4}")) } else { "—".into() }
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                    a.name(),
                    if a.verifiable { "yes" } else { "no" },
                    at(96),
                    at(192),
                    at(384),
                    ratio(192),
                    ratio(384),
                    kb(a.upload_bytes_per_window),
                    if a.is_r0() {
                        "—"
                    } else if a.within_budget() {
                        "yes"
                    } else {
                        "no"
                    },
                    kb(a.download_bytes_per_window),
                    a.seconds
                );
            }
            let checked: Vec<&ArmReport> =
                arms.iter().filter(|a| a.verify.as_ref().is_some_and(|v| !v.honest.is_empty())).collect();
            if !checked.is_empty() {
                let _ = writeln!(
                    s,
                    "\n| arm | honest checks | max honest deviation (bins) | max honest rel. error | tolerance (bins) | honest inconsistent | cheater room | replay / miner time | cheaters detected |"
                );
                let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
                for a in &checked {
                    let Some(v) = &a.verify else { continue };
                    let chosen = v.chosen();
                    let tol = chosen.map_or("none fits".into(), |i| format!("{:e}", v.tolerances[i]));
                    let inc = chosen.map_or("—".into(), |i| v.honest_inconsistent(i).to_string());
                    let room = chosen.map_or("—".into(), |i| format!("{:.2e}", v.room(i)));
                    let detected = chosen.map_or("—".into(), |i| {
                        v.adversaries
                            .iter()
                            .map(|x| {
                                let f = x.inconsistent_fraction.get(i).copied().unwrap_or(0.0);
                                format!("{} {:.1}%", x.name, 100.0 * f)
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    });
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.2e} | {:.2e} | {} | {} | {} | {:.2} | {} |",
                        a.name(),
                        v.honest.len(),
                        v.max_bin_deviation(),
                        v.max_rel_error(),
                        tol,
                        inc,
                        room,
                        v.replay_seconds / v.miner_seconds.max(1e-9),
                        detected
                    );
                }
            }
            let _ = writeln!(s);
            match (self.choice(net), r0) {
                (Some(c), Some(r)) => {
                    let _ = writeln!(
                        s,
                        "**Choice by rule on `{net}`:** {} at L/L_R0 = {:.4} after {} windows ({} KB/window upload).\n",
                        c.name(),
                        c.final_loss() / r.final_loss(),
                        c.windows,
                        kb(c.upload_bytes_per_window)
                    );
                }
                _ => {
                    let _ = writeln!(s, "**Choice by rule on `{net}`:** no arm passes every condition.\n");
                }
            }
        }
        s
    }

    /// SVG curves of held-out loss per page seed.
    pub fn svgs(&self) -> Vec<(String, String)> {
        const COLOURS: [&str; 12] = [
            "#000000", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8",
        ];
        self.by_network
            .iter()
            .map(|(net, all)| {
                // The best arm of each family, so that the chart stays readable.
                let mut best: BTreeMap<&str, &ArmReport> = BTreeMap::new();
                for a in all {
                    let e = best.entry(a.spec.family()).or_insert(a);
                    if a.final_loss() < e.final_loss() {
                        *e = a;
                    }
                }
                let arms: Vec<&ArmReport> = best.into_values().collect();
                let labels: Vec<String> = arms.iter().map(|a| a.spec.short()).collect();
                let series: Vec<crate::svg::Series> = arms
                    .iter()
                    .enumerate()
                    .map(|(i, a)| crate::svg::Series {
                        label: &labels[i],
                        color: COLOURS[i % COLOURS.len()],
                        points: a.curve.iter().map(|&(w, l)| (w as f64, l)).collect(),
                    })
                    .collect();
                let r0 = self.r0(net).map_or(f64::NAN, |r| r.final_loss());
                let genesis = arms.first().and_then(|a| a.curve.first()).map_or(f64::NAN, |c| c.1);
                // Bars: the fraction of genesis-to-R0 progress each arm made.
                let bars: Vec<(String, f64)> = arms
                    .iter()
                    .map(|a| (a.spec.short(), ((genesis - a.final_loss()) / (genesis - r0)).clamp(0.0, 1.0)))
                    .collect();
                let svg = crate::svg::chart(
                    &format!("held-out loss, page seed {net}"),
                    "windows (equal tokens)",
                    &series,
                    "progress relative to R0 (genesis = 0, R0 = 1), best of each family",
                    &bars,
                );
                (net.clone(), svg)
            })
            .collect()
    }
}
