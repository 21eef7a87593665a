//! Local node state (the model `theta_w`, the public optimizer state and the window they
//! belong to) that survives a restart, and checkpoints published to buckets for late joiners.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bistro_model::{ModelConfig, Params};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::lineage::Link;
use crate::protocol::CHECKPOINT_WINDOW_KEY;
use crate::public_adam::{AdamStep, PublicAdam, TENSOR_PREFIXES};
use crate::slices::SliceIndices;

/// Windows of updates a node keeps as a journal after a full save of its state, for a
/// state under [`CHEAP_FULL_SAVE_BYTES`]: the parameters and optimizer state (16 bytes per
/// parameter) are rewritten only every this many windows, and each window in between
/// writes only its update (the aggregate's values at its coordinates), which a restart
/// replays. Larger states journal longer ([`full_save_period`]).
pub const JOURNAL_WINDOWS: u64 = 8;

/// Most windows a journal may hold, whatever the state's size (a restart replays them all).
pub const MAX_JOURNAL_WINDOWS: u64 = 64;

/// A state this large or smaller is saved in full every [`JOURNAL_WINDOWS`] windows (a
/// gigabyte writes in about a second or two).
pub const CHEAP_FULL_SAVE_BYTES: u64 = 1 << 30;

/// Windows between two full saves of a state of `num_params` parameters whose journal
/// entries hold `coordinates` updated values each: [`JOURNAL_WINDOWS`] for a state of at
/// most [`CHEAP_FULL_SAVE_BYTES`]; above, as many windows as it takes the journal (8 bytes
/// per coordinate: index and value) to write as many bytes as one full save (16 bytes per
/// parameter), from [`JOURNAL_WINDOWS`] to [`MAX_JOURNAL_WINDOWS`]. So a `1b` node at 1/32
/// of the coordinates rewrites its 19.3 GB every 64 windows instead of every 8.
pub fn full_save_period(num_params: usize, coordinates: usize) -> u64 {
    let state = 16 * num_params as u64;
    if state <= CHEAP_FULL_SAVE_BYTES {
        return JOURNAL_WINDOWS;
    }
    (state / (8 * coordinates.max(1) as u64)).clamp(JOURNAL_WINDOWS, MAX_JOURNAL_WINDOWS)
}

/// The journal file of the update applied in `window`.
pub fn journal_file(window: u64) -> String {
    format!("journal-{window}.safetensors")
}

/// Metadata key of the saved state's identity in the weights file.
const STATE_KEY: &str = "bistro_state";

/// Metadata key of the saved state's full hash in the weights file.
const FULL_KEY: &str = "bistro_full";

/// One applied update: the public AdamW step of `window` with `values` at `indices`.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalEntry {
    /// The window whose aggregate it is.
    pub window: u64,
    /// The window's coordinates.
    pub indices: SliceIndices,
    /// The aggregate's combined gradient at them.
    pub values: Vec<Vec<f32>>,
    /// The step taken with them.
    pub step: AdamStep,
    /// Whether the aggregate included anything (an empty one takes no step; it is journaled
    /// only at an anchor, where it still moves the identity).
    pub included: bool,
    /// At an anchor window, the full-state hash after the update (checked on replay).
    pub full: Option<String>,
}

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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateInfo {
    /// The window whose start the saved state is (`theta_w`), journal replayed.
    pub window: u64,
    /// Hash of the hyper-parameters the state was built with.
    pub hparams_hash: String,
    /// Hash of the model config.
    pub model_hash: String,
    /// The window of the last full save (the parameters and optimizer files), when a
    /// journal follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// Windows since `base` whose updates are in journal files, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal: Vec<u64>,
    /// The state's identity ([`crate::lineage`]) after the journal is replayed (checked on
    /// load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The identity of the full save (`base`), from which the journal's links are replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_state: Option<String>,
    /// The full-state hash of the full save, when the node knew it (genesis, a checkpoint,
    /// an anchor): checked on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_full: Option<String>,
}

/// Save `params` and `adam` as the state of `window` in `dir` (optimizer state, parameters
/// and `config.json` next, then the small JSON, each written atomically; the older optimizer
/// file is deleted last, so a process killed at any moment leaves a pair that resumes).
pub fn save(dir: &Path, params: &Params, adam: &PublicAdam, info: &StateInfo) -> Result<(), StateError> {
    let info =
        &StateInfo { base: Some(info.window), journal: Vec::new(), base_state: info.state.clone(), ..info.clone() };
    let mut meta = BTreeMap::new();
    meta.insert(CHECKPOINT_WINDOW_KEY.to_string(), info.window.to_string());
    // The identity and full hash travel inside the weights file too, atomic with the
    // parameters: a process killed before `state.json` is rewritten still knows them.
    if let Some(id) = &info.state {
        meta.insert(STATE_KEY.to_string(), id.clone());
    }
    if let Some(full) = &info.base_full {
        meta.insert(FULL_KEY.to_string(), full.clone());
    }
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
            let old_optimizer = name.starts_with("optimizer-") && name != own;
            if (old_optimizer || name.starts_with("journal-")) && name.ends_with(".safetensors") {
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
    let in_weights = weights_meta(&weights, CHECKPOINT_WINDOW_KEY).and_then(|w| w.parse().ok());
    let journaled = info.base.is_some() && info.base == in_weights && info.window != info.base.unwrap_or_default();
    let target = info.window;
    if journaled {
        // The full save is the base; the journal brings it to `target` below.
        info.window = info.base.unwrap_or(target);
    } else if let Some(w) = in_weights
        && w != info.window
    {
        tracing::warn!(
            state_json = info.window,
            weights = w,
            "state.json lags the saved weights; using the weights' window"
        );
        info.window = w;
        info.state = weights_meta(&weights, STATE_KEY);
        info.base_state = info.state.clone();
        info.base_full = weights_meta(&weights, FULL_KEY);
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
    let mut adam = adam;
    if let Some(full) = &info.base_full
        && &crate::accepted::state_hash(&params, &adam)? != full
    {
        tracing::warn!(dir = %dir.display(), "the saved state does not hash to what was saved; rejoining from the network");
        return Ok(None);
    }
    let mut id = info.base_state.clone();
    if journaled {
        for &w in &info.journal {
            let path = dir.join(journal_file(w));
            let entry = match read_journal(&path, &params) {
                Ok(e) if e.window == w => e,
                Ok(e) => {
                    tracing::warn!(path = %path.display(), found = e.window, "journal entry of another window; rejoining from the network");
                    return Ok(None);
                }
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "unusable journal entry; rejoining from the network");
                    return Ok(None);
                }
            };
            if entry.included {
                adam.apply(&params, &entry.indices, &entry.values, &entry.step)?;
            }
            if let Some(full) = &entry.full
                && &crate::accepted::state_hash(&params, &adam)? != full
            {
                tracing::warn!(path = %path.display(), "the replayed journal misses an anchor's full hash; rejoining from the network");
                return Ok(None);
            }
            // The replayed lineage must reach `state`.
            id = id.map(|parent| {
                crate::lineage::produce(&parent, w, entry.included, &entry.values, entry.full.clone()).id
            });
        }
        info.window = target;
    }
    if id.is_none() || id != info.state {
        tracing::warn!(dir = %dir.display(), "the saved state's identity does not replay; rejoining from the network");
        return Ok(None);
    }
    Ok(Some((info, params, adam)))
}

/// Record the update of `entry.window` after the state in `dir` (whose `state.json` will
/// say `info`: its `journal` already listing the entry): the entry first, then the small
/// JSON, each atomically. A process killed between them resumes from the previous JSON.
pub fn append_journal(dir: &Path, entry: &JournalEntry, info: &StateInfo) -> Result<(), StateError> {
    use safetensors::tensor::{Dtype, TensorView};
    let bad = |reason: String| StateError::File { path: dir.join(journal_file(entry.window)), reason };
    let idx: Vec<Vec<u8>> =
        entry.indices.all().iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let val: Vec<Vec<u8>> = entry.values.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    if idx.len() != val.len() {
        return Err(bad("indices and values differ in tensors".into()));
    }
    let mut views = Vec::with_capacity(2 * idx.len());
    for (k, (i, v)) in idx.iter().zip(&val).enumerate() {
        views.push((
            format!("i.{k}"),
            TensorView::new(Dtype::U32, vec![i.len() / 4], i).map_err(|e| bad(e.to_string()))?,
        ));
        views.push((
            format!("g.{k}"),
            TensorView::new(Dtype::F32, vec![v.len() / 4], v).map_err(|e| bad(e.to_string()))?,
        ));
    }
    let st = &entry.step;
    let mut meta: std::collections::HashMap<String, String> = [
        (CHECKPOINT_WINDOW_KEY.to_string(), entry.window.to_string()),
        ("step".to_string(), format!("{:?},{:?},{:?},{:?},{:?}", st.lr, st.beta1, st.beta2, st.eps, st.weight_decay)),
        ("included".to_string(), entry.included.to_string()),
    ]
    .into_iter()
    .collect();
    if let Some(full) = &entry.full {
        meta.insert(FULL_KEY.to_string(), full.clone());
    }
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))?;
    bistro_model::checkpoint::write_atomic(&dir.join(journal_file(entry.window)), &bytes)?;
    write_info(dir, info)
}

/// Write `state.json` alone (a window without an update after a journaled save).
pub fn write_info(dir: &Path, info: &StateInfo) -> Result<(), StateError> {
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| StateError::File { path: dir.join("state.json"), reason: e.to_string() })?;
    bistro_model::checkpoint::write_atomic(&dir.join("state.json"), &json)?;
    Ok(())
}

/// Read a journal entry for `params`' tensors: every index in range, one value per index.
fn read_journal(path: &Path, params: &Params) -> Result<JournalEntry, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    let meta = header.metadata().clone().unwrap_or_default();
    let window = meta.get(CHECKPOINT_WINDOW_KEY).and_then(|w| w.parse().ok()).ok_or("no window")?;
    let nums: Vec<f64> = meta
        .get("step")
        .ok_or("no step")?
        .split(',')
        .map(|x| x.parse::<f64>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let [lr, beta1, beta2, eps, weight_decay] = nums[..] else { return Err("a step has five numbers".into()) };
    let specs = params.specs();
    let (mut indices, mut values) = (Vec::with_capacity(specs.len()), Vec::with_capacity(specs.len()));
    for (k, spec) in specs.iter().enumerate() {
        let read = |name: String| st.tensor(&name).map(|t| t.data().to_vec()).map_err(|e| format!("{name}: {e}"));
        let i: Vec<u32> =
            read(format!("i.{k}"))?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let g: Vec<f32> =
            read(format!("g.{k}"))?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let numel: usize = spec.shape.iter().product();
        if i.len() != g.len() || i.iter().any(|&x| x as usize >= numel) || g.iter().any(|x| !x.is_finite()) {
            return Err(format!("tensor {k} ({}): indices out of range or values not finite", spec.name));
        }
        indices.push(i);
        values.push(g);
    }
    let included = match meta.get("included").map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        _ => return Err("no included flag".into()),
    };
    let full = meta.get(FULL_KEY).cloned();
    if full.as_deref().is_some_and(|f| f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err("the full hash is not a hex sha256".into());
    }
    Ok(JournalEntry {
        window,
        indices: SliceIndices::from_lists(indices),
        values,
        step: AdamStep { lr, beta1, beta2, eps, weight_decay },
        included,
        full,
    })
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

/// A value of a weights file's metadata, if readable.
fn weights_meta(path: &Path, key: &str) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut len).ok()?;
    let n = u64::from_le_bytes(len).min(16 << 20) as usize;
    let mut header = vec![0u8; n];
    std::io::Read::read_exact(&mut f, &mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v.get("__metadata__")?.get(key)?.as_str()?.to_string())
}

/// Metadata key of a checkpoint's [`Link`]: the anchored link that names its state.
pub const CHECKPOINT_LINK_KEY: &str = "bistro_link";

/// Serialise `params` and `adam` as a checkpoint of the state of `window` (bytes for a
/// bucket: the parameters under their names, the optimizer state under
/// [`TENSOR_PREFIXES`]), with the anchored `link` that names the state (none at genesis).
pub fn checkpoint_bytes(
    params: &Params,
    adam: &PublicAdam,
    window: u64,
    link: Option<&Link>,
) -> Result<Vec<u8>, StateError> {
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
    if let Some(l) = link {
        let json = serde_json::to_string(l)
            .map_err(|e| StateError::File { path: "<checkpoint>".into(), reason: e.to_string() })?;
        meta.insert(CHECKPOINT_LINK_KEY.to_string(), json);
    }
    serialize(tensors, params, adam, &meta)
}

/// The [`Link`] a checkpoint's metadata names its state by, if any (well-formed: hex
/// hashes of the right length).
pub fn checkpoint_link(bytes: &[u8]) -> Option<Link> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let link: Link = serde_json::from_str(header.metadata().as_ref()?.get(CHECKPOINT_LINK_KEY)?).ok()?;
    let is_hash = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (is_hash(&link.parent) && is_hash(&link.update) && link.full.as_deref().is_some_and(is_hash)).then_some(link)
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
