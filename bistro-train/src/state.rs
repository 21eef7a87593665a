//! Local node state (the model `theta_w` and the window it belongs to) that survives a
//! restart, and checkpoints published to buckets for late joiners.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bistro_model::{ModelConfig, Params};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::protocol::CHECKPOINT_WINDOW_KEY;

/// Errors of state persistence.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The model checkpoint failed.
    #[error(transparent)]
    Model(#[from] bistro_model::ModelError),
    /// The state file failed.
    #[error("node state {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What `state.json` records next to the parameters (`model.safetensors` and a Hugging Face
/// `config.json`, so a node's state directory opens in `transformers` as it is).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateInfo {
    /// The window whose start the saved parameters are (`theta_w`).
    pub window: u64,
    /// Hash of the hyper-parameters the state was built with.
    pub hparams_hash: String,
    /// Hash of the model config.
    pub model_hash: String,
}

/// Save `params` as `theta_window` in `dir` (parameters and `config.json` first, then the
/// small JSON, each written atomically).
pub fn save(dir: &Path, params: &Params, info: &StateInfo) -> Result<(), StateError> {
    let mut meta = BTreeMap::new();
    meta.insert(CHECKPOINT_WINDOW_KEY.to_string(), info.window.to_string());
    bistro_model::save_safetensors(params, &dir.join(bistro_model::checkpoint::WEIGHTS_FILE), &meta)?;
    let hf = serde_json::to_vec_pretty(&params.config().to_hf_json())
        .map_err(|e| StateError::File { path: dir.join("config.json"), reason: e.to_string() })?;
    bistro_model::checkpoint::write_atomic(&dir.join(bistro_model::checkpoint::HF_CONFIG_FILE), &hf)?;
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| StateError::File { path: dir.join("state.json"), reason: e.to_string() })?;
    bistro_model::checkpoint::write_atomic(&dir.join("state.json"), &json)?;
    Ok(())
}

/// Load the state in `dir` if it exists and matches `hparams_hash` and `config`.
/// `Ok(None)` when there is no state; an error when it exists but cannot be used.
pub fn load(
    dir: &Path,
    config: &ModelConfig,
    hparams_hash: &str,
    device: &Device,
) -> Result<Option<(StateInfo, Params)>, StateError> {
    let json_path = dir.join("state.json");
    if !json_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&json_path)
        .map_err(|e| StateError::File { path: json_path.clone(), reason: e.to_string() })?;
    let info: StateInfo = serde_json::from_str(&text)
        .map_err(|e| StateError::File { path: json_path.clone(), reason: format!("corrupt: {e}") })?;
    if info.hparams_hash != hparams_hash || info.model_hash != config.hash()? {
        return Err(StateError::File {
            path: json_path,
            reason: "saved with other hyper-parameters or another model; move it away to start fresh".into(),
        });
    }
    let weights = dir.join(bistro_model::checkpoint::WEIGHTS_FILE);
    let params = bistro_model::load_safetensors(&weights, config, device)?;
    // The window written inside the weights file is atomic with the parameters; a process
    // killed between writing the weights and `state.json` leaves the latter one behind.
    let mut info = info;
    if let Some(w) = window_in_weights(&weights)
        && w != info.window
    {
        tracing::warn!(
            state_json = info.window,
            weights = w,
            "state.json lags the saved weights; using the weights' window"
        );
        info.window = w;
    }
    Ok(Some((info, params)))
}

/// The window recorded in a weights file's metadata, if readable.
fn window_in_weights(path: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut len).ok()?;
    let n = u64::from_le_bytes(len).min(16 << 20) as usize;
    let mut header = vec![0u8; n];
    std::io::Read::read_exact(&mut f, &mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?.get(CHECKPOINT_WINDOW_KEY)?.as_str()?.parse().ok()
}

/// Serialise `params` as a checkpoint of `theta_window` (bytes for a bucket).
pub fn checkpoint_bytes(params: &Params, window: u64) -> Result<Vec<u8>, StateError> {
    let tensors = params
        .specs()
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((s.name.clone(), s.shape.clone(), params.to_vec(i)?)))
        .collect::<Result<Vec<_>, bistro_model::ModelError>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(CHECKPOINT_WINDOW_KEY.to_string(), window.to_string());
    let cfg = serde_json::to_string(params.config())
        .map_err(|source| bistro_model::ModelError::Serialize { what: "model config", source })?;
    meta.insert(bistro_model::checkpoint::CONFIG_METADATA_KEY.to_string(), cfg);
    Ok(bistro_model::checkpoint::to_safetensors_bytes(&tensors, meta)?)
}

/// Parse a downloaded checkpoint for `config` (strict names, shapes and dtypes).
pub fn params_from_checkpoint(bytes: &[u8], config: &ModelConfig, device: &Device) -> Result<Params, StateError> {
    Ok(bistro_model::checkpoint::params_from_bytes(bytes, Path::new("<downloaded checkpoint>"), config, device)?)
}
