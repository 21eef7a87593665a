//! Safetensors checkpoints with Hugging Face names.
//!
//! A checkpoint directory holds `model.safetensors` (f32 tensors in canonical order,
//! metadata `format = "pt"` as `transformers` requires, plus `bistro_config`, the model
//! config as JSON) and a Hugging Face `config.json`, so it opens unchanged in
//! `transformers.LlamaForCausalLM.from_pretrained(dir)` and candle-transformers' Llama.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::params::{Params, param_specs};

/// Metadata key holding the model config JSON inside a checkpoint.
pub const CONFIG_METADATA_KEY: &str = "bistro_config";
/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the Hugging Face config inside a checkpoint directory.
pub const HF_CONFIG_FILE: &str = "config.json";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Serialise named f32 tensors (in the given order) to safetensors bytes with `metadata`.
pub fn to_safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::BadCheckpoint { path: "<memory>".into(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| ModelError::BadCheckpoint { path: "<memory>".into(), reason: e.to_string() })
}

/// Save `params` as a safetensors file at `path` (atomic), with `extra` metadata.
pub fn save_safetensors(params: &Params, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
    let tensors = params
        .specs()
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((s.name.clone(), s.shape.clone(), params.to_vec(i)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = extra.clone();
    meta.insert("format".into(), "pt".into());
    let cfg = serde_json::to_string(params.config()).map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
    meta.insert(CONFIG_METADATA_KEY.into(), cfg);
    write_atomic(path, &to_safetensors_bytes(&tensors, meta)?)
}

/// Save a Hugging Face-style checkpoint directory (`model.safetensors` + `config.json`).
pub fn save_checkpoint_dir(params: &Params, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let weights = dir.join(WEIGHTS_FILE);
    save_safetensors(params, &weights, &BTreeMap::new())?;
    let cfg = serde_json::to_vec_pretty(&params.config().to_hf_json())
        .map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
    write_atomic(&dir.join(HF_CONFIG_FILE), &cfg)?;
    Ok(weights)
}

/// A memory-mapped safetensors file.
pub struct MappedSafetensors {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for MappedSafetensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedSafetensors").field("path", &self.path).field("bytes", &self.mmap.len()).finish()
    }
}

impl MappedSafetensors {
    /// Map `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; a checkpoint changed underneath us would at worst
        // give wrong values, which the caller's validation and hashes catch.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        Ok(MappedSafetensors { path: path.to_path_buf(), mmap })
    }

    /// Parse the header (validates offsets and lengths).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| ModelError::BadCheckpoint { path: self.path.clone(), reason: e.to_string() })
    }

    /// The `__metadata__` map of the file (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| ModelError::BadCheckpoint { path: self.path.clone(), reason: e.to_string() })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }
}

/// A checkpoint's header may hold this many bytes, plus [`MAX_HEADER_PER_TENSOR`] per
/// tensor (the metadata carries the model config).
pub const MAX_HEADER_BASE: u64 = 64 * 1024;

/// Header bytes allowed per tensor of the model.
pub const MAX_HEADER_PER_TENSOR: u64 = 512;

/// Load parameters for `config` from a safetensors file, checking every name, shape and
/// dtype (errors name the tensor). Extra tensors are an error.
pub fn load_safetensors(path: &Path, config: &ModelConfig, device: &Device) -> Result<Params> {
    let mapped = MappedSafetensors::open(path)?;
    params_from_bytes(&mapped.mmap, path, config, device)
}

/// Like [`load_safetensors`] for a file held in memory; `origin` names it in errors.
pub fn params_from_bytes(bytes: &[u8], origin: &Path, config: &ModelConfig, device: &Device) -> Result<Params> {
    params_from_bytes_with(bytes, origin, config, device, None)
}

/// Tensors a file may hold besides the parameters (a training state stored beside them):
/// names starting with `prefix`, at most `count` of them. [`params_from_bytes_with`] only
/// allows them and counts them into the header bound; the caller reads and checks them.
#[derive(Clone, Copy, Debug)]
pub struct Extras<'a> {
    /// The names' prefix.
    pub prefix: &'a str,
    /// How many there may be.
    pub count: usize,
}

/// [`params_from_bytes`] for a file that may also hold `extras`.
pub fn params_from_bytes_with(
    bytes: &[u8],
    origin: &Path,
    config: &ModelConfig,
    device: &Device,
    extras: Option<Extras<'_>>,
) -> Result<Params> {
    config.validate()?;
    let path = origin;
    let specs = param_specs(config);
    let extra_count = extras.map_or(0, |e| e.count);
    // The header is bounded before it is parsed (red team 3, F13: safetensors alone allows
    // 100 MB of JSON): a name, a dtype, a shape and offsets per tensor, and the metadata.
    let limit = MAX_HEADER_BASE + MAX_HEADER_PER_TENSOR * (specs.len() + extra_count) as u64;
    let header = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if let Some(n) = header
        && n > limit
    {
        return Err(ModelError::BadCheckpoint {
            path: path.to_path_buf(),
            reason: format!("header of {n} bytes, over the {limit} a checkpoint of this model needs"),
        });
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::BadCheckpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    let expected: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let allowed = |n: &str| extras.is_some_and(|e| n.starts_with(e.prefix));
    if let Some(extra) = names.iter().find(|n| !expected.contains(n.as_str()) && !allowed(n)) {
        return Err(ModelError::UnexpectedTensor { path: path.to_path_buf(), name: extra.clone() });
    }
    if names.iter().filter(|n| !expected.contains(n.as_str())).count() > extra_count {
        return Err(ModelError::BadCheckpoint {
            path: path.to_path_buf(),
            reason: format!("more than the {extra_count} extra tensors this file may hold"),
        });
    }
    let mut tensors = Vec::with_capacity(specs.len());
    for s in &specs {
        let view = st
            .tensor(&s.name)
            .map_err(|_| ModelError::MissingTensor { path: path.to_path_buf(), name: s.name.clone() })?;
        if view.dtype() != Dtype::F32 {
            return Err(ModelError::DtypeMismatch {
                path: path.to_path_buf(),
                name: s.name.clone(),
                found: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != s.shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                name: s.name.clone(),
                expected: s.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        if let Some(i) =
            view.data().chunks_exact(4).position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
        {
            return Err(ModelError::BadCheckpoint {
                path: path.to_path_buf(),
                reason: format!("`{}` holds a non-finite value at {i}", s.name),
            });
        }
        tensors.push(Tensor::from_raw_buffer(view.data(), DType::F32, &s.shape, device)?);
    }
    Params::from_tensors(config, tensors, device)
}

/// The model config stored in a checkpoint: the `bistro_config` metadata of the file, or
/// else a `config.json` beside it.
pub fn checkpoint_config(path: &Path) -> Result<ModelConfig> {
    let mapped = MappedSafetensors::open(path)?;
    if let Some(json) = mapped.metadata()?.get(CONFIG_METADATA_KEY) {
        return ModelConfig::from_json_str(json);
    }
    let beside = path.with_file_name(HF_CONFIG_FILE);
    if beside.exists() {
        return ModelConfig::from_file(&beside);
    }
    Err(ModelError::BadCheckpoint {
        path: path.to_path_buf(),
        reason: format!("no `{CONFIG_METADATA_KEY}` metadata and no {HF_CONFIG_FILE} beside it"),
    })
}

/// Load a checkpoint file or directory, reading its config from the checkpoint itself.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Params> {
    let file = if path.is_dir() { path.join(WEIGHTS_FILE) } else { path.to_path_buf() };
    let config = checkpoint_config(&file)?;
    load_safetensors(&file, &config, device)
}
