//! Local node state (the model `theta_w`, the public optimizer state and the window they
//! belong to) that survives a restart, and checkpoints published to buckets for late joiners.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bistro_model::{ModelConfig, Params};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::protocol::CHECKPOINT_WINDOW_KEY;
use crate::public_adam::{PublicAdam, TENSOR_PREFIXES};

/// The file of the public optimizer state of `window` in a state directory (beside
/// `model.safetensors`, which stays a plain Hugging Face checkpoint). Named by window, so a
/// process killed between writing it and the parameters still finds the pair it had.
pub fn optimizer_file(window: u64) -> String {
    format!("optimizer-{window}.safetensors")
}

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

/// Save `params` and `adam` as the state of `window` in `dir` (optimizer state, parameters
/// and `config.json` next, then the small JSON, each written atomically; the older optimizer
/// file is deleted last, so a process killed at any moment leaves a pair that resumes).
pub fn save(dir: &Path, params: &Params, adam: &PublicAdam, info: &StateInfo) -> Result<(), StateError> {
    let mut meta = BTreeMap::new();
    meta.insert(CHECKPOINT_WINDOW_KEY.to_string(), info.window.to_string());
    let opt = adam_bytes(params, adam, &meta)?;
    let own = optimizer_file(info.window);
    bistro_model::checkpoint::write_atomic(&dir.join(&own), &opt)?;
    bistro_model::save_safetensors(params, &dir.join(bistro_model::checkpoint::WEIGHTS_FILE), &meta)?;
    let hf = serde_json::to_vec_pretty(&params.config().to_hf_json())
        .map_err(|e| StateError::File { path: dir.join("config.json"), reason: e.to_string() })?;
    bistro_model::checkpoint::write_atomic(&dir.join(bistro_model::checkpoint::HF_CONFIG_FILE), &hf)?;
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| StateError::File { path: dir.join("state.json"), reason: e.to_string() })?;
    bistro_model::checkpoint::write_atomic(&dir.join("state.json"), &json)?;
    // Only now is the older optimizer state no longer needed to resume.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("optimizer-") && name.ends_with(".safetensors") && name != own {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Load the state in `dir` if it exists and matches `hparams_hash` and `config`.
/// `Ok(None)` when there is no state, or no optimizer state of the parameters' window
/// (logged: the node rejoins from the network); an
/// error when it exists but belongs to another network or model.
pub fn load(
    dir: &Path,
    config: &ModelConfig,
    hparams_hash: &str,
    device: &Device,
) -> Result<Option<(StateInfo, Params, PublicAdam)>, StateError> {
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
    let opt_path = dir.join(optimizer_file(info.window));
    let bad = |reason: String| StateError::File { path: opt_path.clone(), reason };
    if !opt_path.exists() {
        tracing::warn!(path = %opt_path.display(), "no optimizer state for the saved parameters; rejoining from the network");
        return Ok(None);
    }
    let bytes = std::fs::read(&opt_path).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let adam = PublicAdam::from_safetensors(&st, params.specs()).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let opt_window = header.metadata().as_ref().and_then(|m| m.get(CHECKPOINT_WINDOW_KEY)).and_then(|w| w.parse().ok());
    if opt_window != Some(info.window) {
        // Killed between the two writes: nothing here is lost that the network does not
        // hold; the node rejoins from the validators' attested checkpoints.
        tracing::warn!(
            optimizer = ?opt_window,
            parameters = info.window,
            dir = %dir.display(),
            "the saved parameters and optimizer state are of different windows; rejoining from the network"
        );
        return Ok(None);
    }
    Ok(Some((info, params, adam)))
}

/// The optimizer state as a safetensors file with `meta`.
fn adam_bytes(params: &Params, adam: &PublicAdam, meta: &BTreeMap<String, String>) -> Result<Vec<u8>, StateError> {
    serialize(Vec::new(), params, adam, meta)
}

/// Serialise f32 `model` tensors and `adam`'s tensors with `meta`.
fn serialize(
    model: Vec<(String, Vec<usize>, Vec<u8>)>,
    params: &Params,
    adam: &PublicAdam,
    meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>, StateError> {
    use safetensors::tensor::{Dtype, TensorView};
    let bad = |e: safetensors::SafeTensorError| {
        StateError::Model(bistro_model::ModelError::BadCheckpoint { path: "<memory>".into(), reason: e.to_string() })
    };
    let extra = adam.tensors(params.specs());
    let mut views = Vec::with_capacity(model.len() + extra.len());
    for (name, shape, bytes) in &model {
        views.push((name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(bad)?));
    }
    for (name, is_u32, bytes) in &extra {
        let dtype = if *is_u32 { Dtype::U32 } else { Dtype::F32 };
        views.push((name.clone(), TensorView::new(dtype, vec![bytes.len() / 4], bytes).map_err(bad)?));
    }
    let meta: std::collections::HashMap<String, String> = meta.clone().into_iter().collect();
    safetensors::serialize(views, Some(meta)).map_err(bad)
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

/// Serialise `params` and `adam` as a checkpoint of the state of `window` (bytes for a
/// bucket: the parameters under their names, the optimizer state under
/// [`TENSOR_PREFIXES`]).
pub fn checkpoint_bytes(params: &Params, adam: &PublicAdam, window: u64) -> Result<Vec<u8>, StateError> {
    let tensors = params
        .specs()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((s.name.clone(), s.shape.clone(), params.to_vec(i)?.iter().flat_map(|x| x.to_le_bytes()).collect()))
        })
        .collect::<Result<Vec<_>, bistro_model::ModelError>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(CHECKPOINT_WINDOW_KEY.to_string(), window.to_string());
    let cfg = serde_json::to_string(params.config())
        .map_err(|source| bistro_model::ModelError::Serialize { what: "model config", source })?;
    meta.insert(bistro_model::checkpoint::CONFIG_METADATA_KEY.to_string(), cfg);
    serialize(tensors, params, adam, &meta)
}

/// Parse a downloaded checkpoint for `config` (strict names, shapes and dtypes; the
/// optimizer state finite, with non-negative second moments).
pub fn params_from_checkpoint(
    bytes: &[u8],
    config: &ModelConfig,
    device: &Device,
) -> Result<(Params, PublicAdam), StateError> {
    let origin = Path::new("<downloaded checkpoint>");
    let specs = bistro_model::param_specs(config);
    let extras = bistro_model::checkpoint::Extras { prefix: "bistro.adam.", count: 3 * specs.len() };
    let params = bistro_model::checkpoint::params_from_bytes_with(bytes, origin, config, device, Some(extras))?;
    let bad = |reason: String| {
        StateError::Model(bistro_model::ModelError::BadCheckpoint { path: origin.to_path_buf(), reason })
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let adam = PublicAdam::from_safetensors(&st, &specs).map_err(|e| bad(e.to_string()))?;
    debug_assert!(TENSOR_PREFIXES.iter().all(|p| p.starts_with(extras.prefix)));
    Ok((params, adam))
}
