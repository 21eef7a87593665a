//! What a node records for operators, through the [`metrics`] facade: the library only
//! records; a binary that installs a recorder (the Prometheus exporter in
//! `bistro_train::cli::status`) decides where it goes. Without one every call is a no-op.
//!
//! Every series name lives here, so the dashboard (`docs/grafana/bistro.json`), the status
//! page and the tests name the same things.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Newest chain block seen.
pub const BLOCK: &str = "bistro_block";
/// The window the node's state belongs to.
pub const WINDOW: &str = "bistro_window";
/// The chain's current window.
pub const CHAIN_WINDOW: &str = "bistro_chain_window";
/// 1 for the phase the node is in (`phase` label), 0 for the others.
pub const PHASE: &str = "bistro_phase";
/// Windows the node is behind the chain.
pub const CATCHUP_LAG: &str = "bistro_catchup_lag_windows";
/// Mean training loss of the last window (miners).
pub const LOSS: &str = "bistro_loss";
/// Held-out loss of the shared model (validators).
pub const HELDOUT_LOSS: &str = "bistro_heldout_loss";
/// Training throughput of the last window.
pub const TOKENS_PER_SECOND: &str = "bistro_tokens_per_second";
/// Seconds per phase (`phase` label: step, upload, collect, verify, follow).
pub const PHASE_SECONDS: &str = "bistro_phase_seconds";
/// Bytes uploaded to the node's own bucket.
pub const BYTES_UP: &str = "bistro_bytes_uploaded_total";
/// Bytes downloaded from peers' buckets.
pub const BYTES_DOWN: &str = "bistro_bytes_downloaded_total";
/// Slices collected (`outcome`: `valid` or a rejection code).
pub const SLICES: &str = "bistro_slices_total";
/// Accepted-set decisions per miner (`decision`: `included` or an exclusion reason).
pub const DECISIONS: &str = "bistro_decisions_total";
/// Windows by what happened to their accepted set (`result`: applied, fallback, missing, forked).
pub const AGGREGATES: &str = "bistro_aggregates_total";
/// Forks detected.
pub const FORKS: &str = "bistro_forks_total";
/// Forks repaired.
pub const REPAIRS: &str = "bistro_repairs_total";
/// Slices uploaded / failed (`result` label).
pub const UPLOADS: &str = "bistro_uploads_total";
/// A scored miner's relative error `e` (`hotkey` label; validators).
pub const MINER_E: &str = "bistro_miner_e";
/// A scored miner's window score.
pub const MINER_SCORE: &str = "bistro_miner_score";
/// A scored miner's score EMA.
pub const MINER_EMA: &str = "bistro_miner_ema";
/// A scored miner's weight share.
pub const MINER_WEIGHT: &str = "bistro_miner_weight";
/// Miners recomputed in the last window (validators).
pub const RECOMPUTED: &str = "bistro_recomputed_miners";

/// Always 1, labelled with what the node is: `version`, `git`, `protocol`, `cuda`, `role`.
pub const BUILD_INFO: &str = "bistro_build_info";
/// Always 1, labelled with the network's settings: `hash`, `network`, `model`.
pub const HPARAMS_INFO: &str = "bistro_hparams_info";

/// Publish [`BUILD_INFO`] and [`HPARAMS_INFO`] (Prometheus' info-metric pattern: join on
/// them to tell versions and networks apart across a fleet).
pub fn record_build_info(role: &str, hparams_hash: &str, network: &str, model: &str) {
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "git" => crate::GIT_HASH,
        "protocol" => crate::protocol::PROTOCOL_VERSION.to_string(),
        "cuda" => if cfg!(feature = "cuda") { "on" } else { "off" },
        "role" => role.to_string()
    )
    .set(1.0);
    gauge!(HPARAMS_INFO, "hash" => hparams_hash.to_string(), "network" => network.to_string(), "model" => model.to_string())
        .set(1.0);
}

/// The phases of a window, in order.
pub const PHASES: [&str; 6] = ["train", "upload", "collect", "verify", "follow", "idle"];

/// Register every series' description with the installed recorder.
pub fn describe() {
    describe_gauge!(BLOCK, "Newest chain block seen");
    describe_gauge!(WINDOW, "Window the node's model state belongs to");
    describe_gauge!(CHAIN_WINDOW, "The chain's current window");
    describe_gauge!(PHASE, "1 for the window phase the node is in");
    describe_gauge!(BUILD_INFO, "1, labelled with the build: version, git commit, protocol, cuda, role");
    describe_gauge!(HPARAMS_INFO, "1, labelled with the network's hparams hash, name and model");
    describe_gauge!(CATCHUP_LAG, "Windows the node's state is behind the chain");
    describe_gauge!(LOSS, "Mean training loss of the last window");
    describe_gauge!(HELDOUT_LOSS, "Held-out loss of the shared model");
    describe_gauge!(TOKENS_PER_SECOND, "Training tokens per second in the last window");
    describe_histogram!(PHASE_SECONDS, metrics::Unit::Seconds, "Duration of each window phase");
    describe_counter!(BYTES_UP, metrics::Unit::Bytes, "Bytes uploaded to the node's bucket");
    describe_counter!(BYTES_DOWN, metrics::Unit::Bytes, "Bytes downloaded from peers' buckets");
    describe_counter!(SLICES, "Slices collected, by outcome (valid or the rejection code)");
    describe_counter!(DECISIONS, "Accepted-set decisions per miner, by decision");
    describe_counter!(AGGREGATES, "Windows by what happened to their accepted set");
    describe_counter!(FORKS, "Forks detected (an aggregate's parent was not this node's state)");
    describe_counter!(REPAIRS, "Forks repaired from a validator's verified history");
    describe_counter!(UPLOADS, "Slice uploads, by result");
    describe_gauge!(MINER_E, "Relative gradient error e of a scored miner");
    describe_gauge!(MINER_SCORE, "Window score of a scored miner");
    describe_gauge!(MINER_EMA, "Score EMA of a scored miner");
    describe_gauge!(MINER_WEIGHT, "Weight share of a scored miner");
    describe_gauge!(RECOMPUTED, "Miners recomputed in the last window");
}

/// Record the phase the node enters.
pub fn phase(now: &str) {
    for p in PHASES {
        gauge!(PHASE, "phase" => p).set(if p == now { 1.0 } else { 0.0 });
    }
}

/// Record how long a phase took.
pub fn phase_seconds(phase: &'static str, seconds: f64) {
    histogram!(PHASE_SECONDS, "phase" => phase).record(seconds);
}

/// Record the node's window, the chain's and the lag between them.
pub fn windows(state_window: u64, chain_window: u64) {
    gauge!(WINDOW).set(state_window as f64);
    gauge!(CHAIN_WINDOW).set(chain_window as f64);
    gauge!(CATCHUP_LAG).set(chain_window.saturating_sub(state_window) as f64);
}

/// Count one collected slice by outcome.
pub fn slice(outcome: &'static str, bytes: usize) {
    counter!(SLICES, "outcome" => outcome).increment(1);
    counter!(BYTES_DOWN).increment(bytes as u64);
}

/// Count what happened to a window's accepted set.
pub fn aggregate(result: &'static str) {
    counter!(AGGREGATES, "result" => result).increment(1);
}

/// Count one decision about a miner.
pub fn decision(decision: &str) {
    counter!(DECISIONS, "decision" => decision.to_string()).increment(1);
}

/// A forked node, and whether it repaired.
pub fn fork(repaired: bool) {
    counter!(FORKS).increment(1);
    if repaired {
        counter!(REPAIRS).increment(1);
    }
}

/// A miner's figures as a validator scored them.
pub fn miner_score(hotkey: &str, e: f64, score: f64, ema: f64, weight: f64) {
    let h = hotkey.to_string();
    gauge!(MINER_E, "hotkey" => h.clone()).set(if e.is_finite() { e } else { f64::MAX });
    gauge!(MINER_SCORE, "hotkey" => h.clone()).set(score);
    gauge!(MINER_EMA, "hotkey" => h.clone()).set(ema);
    gauge!(MINER_WEIGHT, "hotkey" => h).set(weight);
}

#[cfg(test)]
mod tests {
    /// Every series the Grafana dashboard queries is one this module records.
    #[test]
    fn dashboard_names_recorded_series() {
        let dash = include_str!("../../docs/grafana/bistro.json");
        let known = [
            super::BLOCK,
            super::WINDOW,
            super::CHAIN_WINDOW,
            super::PHASE,
            super::CATCHUP_LAG,
            super::LOSS,
            super::HELDOUT_LOSS,
            super::TOKENS_PER_SECOND,
            super::PHASE_SECONDS,
            super::BYTES_UP,
            super::BYTES_DOWN,
            super::SLICES,
            super::DECISIONS,
            super::AGGREGATES,
            super::FORKS,
            super::REPAIRS,
            super::UPLOADS,
            super::MINER_E,
            super::MINER_SCORE,
            super::MINER_EMA,
            super::MINER_WEIGHT,
            super::RECOMPUTED,
        ];
        let mut used = 0;
        for (i, _) in dash.match_indices("bistro_") {
            let name: String =
                dash[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            let base = name.trim_end_matches("_bucket");
            if base == "bistro_" || base == "bistro_node" {
                continue;
            }
            assert!(known.contains(&base), "the dashboard queries {name}, which nothing records");
            used += 1;
        }
        assert!(used >= 15, "the dashboard queries only {used} series");
    }
}
