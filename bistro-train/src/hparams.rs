//! The protocol's hyper-parameters: one versioned TOML file that every node of a network
//! must share. Its hash goes into every slice's metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::protocol::PROTOCOL_VERSION;

/// How accepted slices are combined, coordinate by coordinate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Aggregation {
    /// The plain mean (with SGD this reproduces the original's "average the weight slices").
    Mean,
    /// Drop the `trim` fraction of lowest and of highest values, average the rest.
    TrimmedMean {
        /// Fraction trimmed from each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// The coordinate-wise median.
    Median,
}

/// Every constant of the protocol (see `docs/PROTOCOL.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HParams {
    /// Network name; part of the page-assignment key.
    pub network: String,
    /// Model preset name or config file.
    pub model: String,
    /// Seed of the genesis parameters.
    pub genesis_seed: u64,
    /// Dataset spec (`embedded`, a local path).
    pub dataset: String,
    /// Tokenizer spec (`embedded` or a `tokenizer.json` path).
    pub tokenizer: String,
    /// Chain blocks per window.
    pub blocks_per_window: u64,
    /// Pages each miner trains on per window.
    pub pages_per_window: usize,
    /// Rows (documents) per page.
    pub rows_per_page: usize,
    /// Tokens per training row.
    pub seq_len: usize,
    /// Slice compression: a slice holds `max(1, numel / compression)` codes per tensor.
    pub compression: usize,
    /// Bits per code of a slice (1, 2, 4 or 8): each gradient value at the window's
    /// coordinates is sent as a dithered code on a grid of `2^code_bits` levels with one f32
    /// scale per 64 values ([`crate::slices::quant`]).
    pub code_bits: u8,
    /// How far, in bins of the grid, a miner's code may be from the validator's own dithered
    /// position and still count as the same computation (measured honest drift across f32
    /// paths: about 2e-5 bins; `docs/learning/README.md`).
    pub code_tolerance_bins: f64,
    /// Peak learning rate of the public AdamW step.
    pub learning_rate: f64,
    /// Final learning rate of the cosine schedule.
    pub min_learning_rate: f64,
    /// Windows of linear warm-up.
    pub warmup_windows: u64,
    /// Window at which the cosine schedule reaches `min_learning_rate`.
    pub decay_windows: u64,
    /// First-moment decay of the public AdamW step.
    pub adam_beta1: f64,
    /// Second-moment decay of the public AdamW step.
    pub adam_beta2: f64,
    /// Epsilon of the public AdamW step.
    pub adam_eps: f64,
    /// Decoupled weight decay of the public AdamW step (applied at the window's coordinates).
    pub weight_decay: f64,
    /// How accepted slices are combined.
    pub aggregation: Aggregation,
    /// The lead leaves out an unscored slice whose implied update norm exceeds this multiple
    /// of the median norm of the slices it recomputed and found honest in the last
    /// `norm_history_windows` windows (with no history, unscored slices are left out).
    pub outlier_norm_factor: f64,
    /// Windows of included slice norms the lead keeps for the outlier bound.
    pub norm_history_windows: u64,
    /// Largest slice object accepted, in bytes.
    pub max_slice_bytes: u64,
    /// Seconds after the first block of the next window during which uploads still count.
    pub upload_grace_secs: u64,
    /// Windows between two `set_weights` of a validator.
    pub windows_per_weights: u64,
    /// Weight of the history in the score EMA: `ema = alpha * ema + (1 - alpha) * new`.
    pub ema_alpha: f64,
    /// Softmax temperature of the weights.
    pub temperature: f64,
    /// Relative gradient error below which a slice counts as honest recomputation.
    pub honest_tolerance: f64,
    /// Windows after which an owner deletes its old objects.
    pub max_history: u64,
    /// The lead's total download budget per window, from the upload deadline on (ms): a
    /// stalling endpoint costs at most this once.
    pub collect_budget_ms: u64,
    /// The lead's recomputation budget per window (ms): it scores miners in a random order
    /// until the budget is spent, then decides the accepted set.
    pub verify_budget_ms: u64,
    /// How long after the upload deadline nodes wait for the lead's aggregate (ms) before
    /// turning to the fallback validators; the lead publishes only before this cut-off.
    pub aggregate_wait_ms: u64,
    /// Extra wait for a fallback validator's aggregate (ms); after it, the window has no update.
    pub fallback_wait_ms: u64,
    /// A hotkey whose score EMA (at the lead) is below this is not included unless it was
    /// scored honest in the same window.
    pub min_include_ema: f64,
    /// Windows during which a hotkey whose recomputed slice proved dishonest scores 0.
    pub penalty_windows: u64,
    /// Tokens of a window's pages that are trained on (the first ones, in page order): one
    /// recomputation costs at most this, whatever documents the pages hold (red team 3,
    /// F10: pages are public in advance, and a hotkey could upload only in windows whose
    /// pages are long, to overrun the validators' budget).
    #[serde(default = "default_max_window_tokens")]
    pub max_window_tokens: usize,
    /// Validators that recompute each miner every window (`r`, shared verification): after
    /// the deadline a public draw assigns every miner to `r` validators, each recomputes
    /// only its share and publishes signed verdicts, and slices are included on them. 0:
    /// every validator recomputes what its own budget allows, in a private order.
    #[serde(default)]
    pub verifiers_per_miner: u32,
    /// Under shared verification, the share of the other validators' assigned miners the
    /// deciding validator recomputes itself, in a private random sample (audits of verdicts).
    #[serde(default = "default_audit_share")]
    pub audit_share: f64,
}

fn default_audit_share() -> f64 {
    0.125
}

fn default_max_window_tokens() -> usize {
    4096
}

impl Default for HParams {
    /// The embedded devnet defaults: a tiny model that visibly learns on a CPU in minutes.
    fn default() -> Self {
        HParams {
            network: "devnet".into(),
            model: "tiny".into(),
            genesis_seed: 0,
            dataset: "embedded".into(),
            tokenizer: "embedded".into(),
            blocks_per_window: 3,
            pages_per_window: 2,
            rows_per_page: 2,
            seq_len: 128,
            compression: 24,
            code_bits: 2,
            code_tolerance_bins: 1e-3,
            learning_rate: 0.01,
            min_learning_rate: 0.001,
            warmup_windows: 5,
            decay_windows: 20_000,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            aggregation: Aggregation::Mean,
            outlier_norm_factor: 3.0,
            norm_history_windows: 8,
            max_slice_bytes: 256 * 1024 * 1024,
            upload_grace_secs: 2,
            windows_per_weights: 2,
            ema_alpha: 0.5,
            temperature: 10.0,
            honest_tolerance: 0.002,
            max_history: 10,
            collect_budget_ms: 2_000,
            verify_budget_ms: 3_000,
            aggregate_wait_ms: 7_000,
            fallback_wait_ms: 2_000,
            min_include_ema: 0.3,
            penalty_windows: 10,
            max_window_tokens: default_max_window_tokens(),
            verifiers_per_miner: 0,
            audit_share: default_audit_share(),
        }
    }
}

/// Errors reading hyper-parameters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HParamsError {
    /// The file could not be read.
    #[error("cannot read hparams file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`HParams`].
    #[error("invalid hparams file {path}: {source}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// What the parser said.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The hyper-parameters could not be serialised (for their hash).
    #[error("cannot serialise hparams: {0}")]
    Serialize(#[source] Box<toml::ser::Error>),
    /// A value is out of range.
    #[error("invalid hparams: {0}")]
    Invalid(String),
}

impl HParams {
    /// The token rows a window of `pages` trains on under this network's rules: packed into
    /// rows of `seq_len`, the first `max_window_tokens` tokens. Miners and validators read
    /// every window through this.
    pub fn window_batch(
        &self,
        dataset: &crate::data::Dataset,
        tokenizer: &crate::data::TextTokenizer,
        pages: &[crate::data::Page],
    ) -> crate::data::Result<crate::data::WindowBatch> {
        dataset.window_batch_capped(tokenizer, pages, self.seq_len, self.max_window_tokens)
    }

    /// The slice codec of `code_bits` (validated hparams always have one; unvalidated ones
    /// with an unsupported width get 2-bit codes, which their hash still tells apart).
    pub fn codec(&self) -> crate::slices::quant::Codec {
        crate::slices::quant::Codec::new(self.code_bits).unwrap_or(crate::slices::quant::Codec::TWO_BIT)
    }

    /// The tolerance of the code check ([`crate::slices::quant::Codec::check`]).
    pub fn code_tolerance(&self) -> crate::slices::quant::Tolerance {
        self.codec().tolerance(self.code_tolerance_bins)
    }

    /// Read from a TOML file and validate.
    pub fn from_file(path: &Path) -> Result<Self, HParamsError> {
        let text = std::fs::read_to_string(path).map_err(|source| HParamsError::Io { path: path.into(), source })?;
        let h: HParams =
            toml::from_str(&text).map_err(|e| HParamsError::Parse { path: path.into(), source: Box::new(e) })?;
        h.validate()?;
        Ok(h)
    }

    /// Check ranges.
    pub fn validate(&self) -> Result<(), HParamsError> {
        let bad = |m: &str| Err(HParamsError::Invalid(m.to_string()));
        if self.blocks_per_window == 0 {
            return bad("blocks_per_window must be positive");
        }
        if self.pages_per_window == 0 || self.rows_per_page == 0 {
            return bad("pages_per_window and rows_per_page must be positive");
        }
        if self.seq_len < 2 {
            return bad("seq_len must be at least 2");
        }
        if self.compression == 0 {
            return bad("compression must be positive");
        }
        if crate::slices::quant::Codec::new(self.code_bits).is_err() {
            return bad("code_bits must be 1, 2, 4 or 8");
        }
        if !(self.code_tolerance_bins >= 0.0 && self.code_tolerance_bins < 0.5) {
            return bad("code_tolerance_bins must be in [0, 0.5)");
        }
        let betas_ok = (0.0..1.0).contains(&self.adam_beta1) && (0.0..1.0).contains(&self.adam_beta2);
        if !(betas_ok && self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            return bad("adam_beta1 and adam_beta2 must be in [0, 1) and adam_eps positive");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay must be finite and non-negative");
        }
        let rates_ok = self.learning_rate > 0.0 && self.learning_rate.is_finite() && self.min_learning_rate >= 0.0;
        if !rates_ok {
            return bad("learning rates must be positive and finite");
        }
        if let Aggregation::TrimmedMean { trim } = self.aggregation
            && !(0.0..0.5).contains(&trim)
        {
            return bad("trimmed_mean trim must be in [0, 0.5)");
        }
        if !(0.0..1.0).contains(&self.ema_alpha) {
            return bad("ema_alpha must be in [0, 1)");
        }
        if self.windows_per_weights == 0 {
            return bad("windows_per_weights must be positive");
        }
        if !(self.outlier_norm_factor > 1.0 && self.outlier_norm_factor.is_finite()) {
            return bad("outlier_norm_factor must be a finite number above 1");
        }
        if self.norm_history_windows == 0 {
            return bad("norm_history_windows must be positive");
        }
        if self.max_window_tokens < self.seq_len {
            return bad("max_window_tokens must be at least seq_len");
        }
        if self.aggregate_wait_ms < self.collect_budget_ms + self.verify_budget_ms {
            return bad("aggregate_wait_ms must cover collect_budget_ms + verify_budget_ms");
        }
        if !(0.0..=1.0).contains(&self.min_include_ema) {
            return bad("min_include_ema must be in [0, 1]");
        }
        if !(self.honest_tolerance > 0.0 && self.honest_tolerance.is_finite()) {
            return bad("honest_tolerance must be positive and finite");
        }
        if self.verifiers_per_miner > 16 {
            return bad("verifiers_per_miner must be at most 16");
        }
        if !(0.0..=1.0).contains(&self.audit_share) {
            return bad("audit_share must be in [0, 1]");
        }
        Ok(())
    }

    /// Learning rate of the reference step in `window`: linear warm-up over
    /// `warmup_windows`, then cosine decay to `min_learning_rate` at `decay_windows`.
    pub fn learning_rate_at(&self, window: u64) -> f64 {
        let (peak, floor) = (self.learning_rate, self.min_learning_rate.min(self.learning_rate));
        if window < self.warmup_windows {
            return peak * (window + 1) as f64 / self.warmup_windows as f64;
        }
        let span = self.decay_windows.saturating_sub(self.warmup_windows).max(1);
        let t = ((window - self.warmup_windows) as f64 / span as f64).min(1.0);
        floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// The window a block belongs to.
    pub fn window_of(&self, block: u64) -> u64 {
        block / self.blocks_per_window
    }

    /// First block of `window`.
    pub fn first_block(&self, window: u64) -> u64 {
        window * self.blocks_per_window
    }

    /// The fields whose values differ from `other`'s, as `name: ours vs theirs`, in name
    /// order.
    pub fn differences(&self, other: &HParams) -> Vec<String> {
        let table = |h: &HParams| match toml::Value::try_from(h) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::map::Map::new(),
        };
        let (ours, theirs) = (table(self), table(other));
        let names: std::collections::BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
        let shown = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into());
        names
            .into_iter()
            .filter(|n| ours.get(*n) != theirs.get(*n))
            .map(|n| format!("{n}: {} vs {}", shown(ours.get(n)), shown(theirs.get(n))))
            .collect()
    }

    /// Hex sha256 of the canonical TOML (field order is the struct's), with the protocol version.
    pub fn hash(&self) -> Result<String, HParamsError> {
        let text = toml::to_string(self).map_err(|e| HParamsError::Serialize(Box::new(e)))?;
        let mut h = Sha256::new();
        h.update(crate::protocol::tags::HPARAMS);
        h.update(PROTOCOL_VERSION.to_le_bytes());
        h.update(text.as_bytes());
        Ok(hex::encode(h.finalize()))
    }
}

/// The settings files shipped with BISTRO, by network name: `test` is BISTRO's testnet on
/// Bittensor's test chain (`hparams/testnet.toml`, timing derived from 12 s blocks and
/// GRANDPA finality). The devnet's are [`HParams::default`].
pub const SHIPPED_FILES: [(&str, &str); 1] = [("test", include_str!("../hparams/testnet.toml"))];

/// The shipped settings of `network` (`devnet`, `test`), parsed and validated; `None` for a
/// network without shipped settings (finney, a custom endpoint), which must name a file.
pub fn shipped(network: &str) -> Option<Result<HParams, HParamsError>> {
    if network == "devnet" {
        return Some(Ok(HParams::default()));
    }
    let (name, text) = SHIPPED_FILES.iter().find(|(n, _)| *n == network)?;
    let path = std::path::PathBuf::from(format!("<shipped {name} hparams>"));
    Some(
        toml::from_str::<HParams>(text)
            .map_err(|e| HParamsError::Parse { path, source: Box::new(e) })
            .and_then(|h| h.validate().map(|()| h)),
    )
}

/// The shipped settings of `network` as TOML text: the commented file for `test`, the
/// canonical serialisation of [`HParams::default`] for `devnet`.
pub fn shipped_text(network: &str) -> Option<Result<String, HParamsError>> {
    if network == "devnet" {
        return Some(toml::to_string(&HParams::default()).map_err(|e| HParamsError::Serialize(Box::new(e))));
    }
    SHIPPED_FILES.iter().find(|(n, _)| *n == network).map(|(_, t)| Ok(t.to_string()))
}

/// A fast network for tests and demos: writes `model.toml` (a one-layer model over the
/// shipped 8192-token tokenizer, 64 positions) and `hparams.toml` (64-token rows, one page of
/// two documents per window, 3-block windows, a 1 s upload grace, short lead budgets, then
/// `tweak`) into `dir`; returns both.
pub fn write_test_network(
    dir: &Path,
    tweak: impl FnOnce(&mut HParams),
) -> std::io::Result<(HParams, bistro_model::ModelConfig)> {
    let model = bistro_model::ModelConfig::new(8192, 32, 64, 1, 2, 2, 64, 1e-5);
    let invalid = |e: toml::ser::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    std::fs::write(dir.join("model.toml"), toml::to_string(&model).map_err(invalid)?)?;
    let mut h = HParams {
        model: dir.join("model.toml").display().to_string(),
        seq_len: 64,
        pages_per_window: 1,
        rows_per_page: 2,
        blocks_per_window: 3,
        upload_grace_secs: 1,
        collect_budget_ms: 500,
        verify_budget_ms: 800,
        aggregate_wait_ms: 1_600,
        fallback_wait_ms: 500,
        ..HParams::default()
    };
    tweak(&mut h);
    std::fs::write(dir.join("hparams.toml"), toml::to_string(&h).map_err(invalid)?)?;
    Ok((h, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        let h = HParams::default();
        h.validate().unwrap();
        let t = toml::to_string(&h).unwrap();
        assert_eq!(toml::from_str::<HParams>(&t).unwrap(), h);
        assert_eq!(h.hash().unwrap(), HParams::default().hash().unwrap());
        let mut g = h.clone();
        g.compression = 9;
        assert_ne!(g.hash().unwrap(), h.hash().unwrap());
    }

    /// Known answers. Every node of a network must compute the same hash from the same
    /// settings; the hash is sha256 over `toml::to_string`, so a dependency bump that
    /// changes the serialiser (quoting, float formatting, field order) would split running
    /// networks silently. It fails here instead: then pin the old serialisation, do not
    /// update these values. (They change with the protocol version, which the hash covers:
    /// these are protocol 6's.)
    #[test]
    fn hashes_are_known_answers() {
        assert_eq!(
            HParams::default().hash().unwrap(),
            "a7c19d605671e547dcaa1a7cc58705dbb38bef40a5492fbebc1634ac290e0086"
        );
        assert_eq!(
            shipped("test").unwrap().unwrap().hash().unwrap(),
            "3a42c61570732d63e1285c32bd291e0afb54339b6d40d4edd3608bc90fd4a7e8"
        );
    }

    #[test]
    fn shipped_files_parse_and_fit_their_chain() {
        assert!(shipped("finney").is_none() && shipped_text("finney").is_none());
        assert_eq!(shipped("devnet").unwrap().unwrap(), HParams::default());
        let t = shipped("test").unwrap().unwrap();
        assert_eq!(t.network, "bistro-test");
        assert_eq!(toml::from_str::<HParams>(&shipped_text("test").unwrap().unwrap()).unwrap(), t);
        // 12 s blocks, final 2-3 blocks behind the head: the grace exceeds 36 s, and a
        // window holds the aggregate wait plus a step and an upload.
        let block_ms = 12_000;
        assert!(t.upload_grace_secs * 1000 > 3 * block_ms);
        assert!(t.blocks_per_window * block_ms >= t.aggregate_wait_ms + 10_000);
        // set_weights at most once per 100 blocks (subtensor's usual WeightsSetRateLimit).
        assert!(t.windows_per_weights * t.blocks_per_window >= 100);
    }

    #[test]
    fn differences_name_the_fields() {
        let a = HParams::default();
        let mut b = a.clone();
        b.compression = 12;
        b.aggregation = Aggregation::Median;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0], r#"aggregation: { rule = "mean" } vs { rule = "median" }"#);
        assert_eq!(d[1], "compression: 24 vs 12");
        assert!(a.differences(&a).is_empty());
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let h = HParams::default();
        assert!(h.learning_rate_at(0) < h.learning_rate_at(4));
        assert!((h.learning_rate_at(h.warmup_windows) - h.learning_rate).abs() < 1e-12);
        assert!((h.learning_rate_at(h.decay_windows * 2) - h.min_learning_rate).abs() < 1e-12);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.toml");
        std::fs::write(&p, "compression = 0\n").unwrap();
        let e = HParams::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("h.toml"), "{e}");
        let mut t = toml::to_string(&HParams::default()).unwrap();
        t = t.replace("compression = 24", "compression = 0");
        std::fs::write(&p, t).unwrap();
        assert!(HParams::from_file(&p).unwrap_err().to_string().contains("compression"));
    }
}
