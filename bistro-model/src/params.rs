//! The parameter set: canonical order, deterministic genesis, flat gather/scatter.
//!
//! The canonical order is Hugging Face `LlamaForCausalLM.named_parameters()` order.
//! Slices, checkpoints and aggregation all walk parameters in this order, so it is part
//! of the wire protocol.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, backprop::GradStore};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Domain-separation tag of the genesis key (see [`genesis_values`]).
pub const GENESIS_TAG: &[u8] = b"bistro/genesis/v1";

/// The kind of a parameter tensor, which decides its genesis initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Token embedding table `[vocab, hidden]`.
    Embedding,
    /// A projection matrix `[out, in]` (attention, MLP, LM head).
    Linear,
    /// An RMSNorm gain vector `[hidden]`.
    Norm,
}

/// Name, shape and kind of one parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Initialisation kind.
    pub kind: ParamKind,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every parameter of `cfg` in canonical (Hugging Face `named_parameters()`) order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let h = cfg.hidden_size;
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let i = cfg.intermediate_size;
    let spec = |name: String, shape: Vec<usize>, kind| ParamSpec { name, shape, kind };
    let mut v = vec![spec("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h], ParamKind::Embedding)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push(spec(format!("{p}.self_attn.q_proj.weight"), vec![h, h], ParamKind::Linear));
        v.push(spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], ParamKind::Linear));
        v.push(spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], ParamKind::Linear));
        v.push(spec(format!("{p}.self_attn.o_proj.weight"), vec![h, h], ParamKind::Linear));
        v.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![i, h], ParamKind::Linear));
        v.push(spec(format!("{p}.mlp.up_proj.weight"), vec![i, h], ParamKind::Linear));
        v.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, i], ParamKind::Linear));
        v.push(spec(format!("{p}.input_layernorm.weight"), vec![h], ParamKind::Norm));
        v.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![h], ParamKind::Norm));
    }
    v.push(spec("model.norm.weight".into(), vec![h], ParamKind::Norm));
    v.push(spec("lm_head.weight".into(), vec![cfg.vocab_size, h], ParamKind::Linear));
    v
}

/// Elements drawn from one ChaCha20 stream before genesis moves to the next stream.
pub const GENESIS_CHUNK: usize = 1 << 20;

/// Deterministic genesis values of one parameter.
///
/// Documented, platform-independent recipe (protocol version 1):
/// * RMSNorm gains are exactly `1.0`.
/// * Every other tensor is uniform on `(-a, a)` with `a = initializer_range * sqrt(3)`
///   (so its standard deviation is `initializer_range`, as Hugging Face's normal init).
/// * The key is `sha256("bistro/genesis/v1" || seed as u64 LE || name as UTF-8)`, used as a
///   ChaCha20 key. Element `j` comes from stream `j / 2^20`, as the `(j mod 2^20)`-th
///   `u32` of that stream (`next_u32`, little-endian words as `rand_chacha` 0.9 emits).
/// * A `u32` `u` maps to `((u >> 8) as f32 + 0.5) * 2^-24`, uniform in `(0, 1)` on a grid
///   of 2^24 points; then `x = (2u - 1) * a` in f32. All steps but the last multiply are
///   exact, and that one is a single IEEE-754 rounding, so every platform gets the same bits.
pub fn genesis_values(spec: &ParamSpec, seed: u64, initializer_range: f64) -> Vec<f32> {
    let n = spec.numel();
    if spec.kind == ParamKind::Norm {
        return vec![1.0; n];
    }
    let a = (initializer_range * 3f64.sqrt()) as f32;
    let mut h = Sha256::new();
    h.update(GENESIS_TAG);
    h.update(seed.to_le_bytes());
    h.update(spec.name.as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(GENESIS_CHUNK).enumerate().for_each(|(chunk, dst)| {
        let mut rng = ChaCha20Rng::from_seed(key);
        rng.set_stream(chunk as u64);
        for x in dst.iter_mut() {
            let u = ((rng.next_u32() >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0);
            *x = (2.0 * u - 1.0) * a;
        }
    });
    out
}

/// The model's parameters: one [`Var`] per [`ParamSpec`], in canonical order.
///
/// Values are f32 master weights. `Params` is cheap to clone (vars share storage).
#[derive(Clone, Debug)]
pub struct Params {
    config: ModelConfig,
    specs: Vec<ParamSpec>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    device: Device,
}

impl Params {
    /// Deterministic genesis parameters from `seed` (see [`genesis_values`]).
    pub fn genesis(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let specs = param_specs(config);
        let tensors = specs
            .iter()
            .map(|s| {
                let v = genesis_values(s, seed, config.initializer_range);
                Tensor::from_vec(v, s.shape.as_slice(), device).map_err(ModelError::from)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_tensors(config, tensors, device)
    }

    /// Build from tensors given in canonical order (shapes are checked; values are copied to f32 on `device`).
    pub fn from_tensors(config: &ModelConfig, tensors: Vec<Tensor>, device: &Device) -> Result<Self> {
        let specs = param_specs(config);
        if tensors.len() != specs.len() {
            return Err(ModelError::OutOfRange(format!("expected {} tensors, got {}", specs.len(), tensors.len())));
        }
        let mut vars = Vec::with_capacity(specs.len());
        for (s, t) in specs.iter().zip(tensors) {
            if t.dims() != s.shape.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    path: "<memory>".into(),
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    found: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            vars.push(Var::from_tensor(&t)?);
        }
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Ok(Params { config: config.clone(), specs, vars, index, device: device.clone() })
    }

    /// The config these parameters belong to.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameter specs in canonical order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The variables in canonical order (for optimisers and gradients).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when there are no parameters (never for a valid config).
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(|s| s.numel()).sum()
    }

    /// Canonical position of a parameter name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The variable with this Hugging Face name.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.position(name).map(|i| &self.vars[i])
    }

    /// A [`VarBuilder`] over these parameters, with Hugging Face names. Tensors it hands out
    /// are the variables themselves, so gradients flow back to them.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> =
            self.specs.iter().zip(&self.vars).map(|(s, v)| (s.name.clone(), v.as_tensor().clone())).collect();
        VarBuilder::from_tensors(map, DType::F32, &self.device)
    }

    /// A deep copy (new storage) of these parameters.
    pub fn deep_clone(&self) -> Result<Self> {
        let tensors = self.vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
        Self::from_tensors(&self.config, tensors, &self.device)
    }

    /// The gradient of every parameter from `grads`, in canonical order; an error names
    /// the first parameter that received none.
    pub fn gradients(&self, grads: &GradStore) -> Result<Vec<Tensor>> {
        self.specs
            .iter()
            .zip(&self.vars)
            .map(|(s, v)| grads.get(v.as_tensor()).cloned().ok_or_else(|| ModelError::NoGradient(s.name.clone())))
            .collect()
    }

    fn check_indices(&self, param: usize, indices: &[u32]) -> Result<usize> {
        let spec = self
            .specs
            .get(param)
            .ok_or_else(|| ModelError::OutOfRange(format!("parameter {param} of {}", self.specs.len())))?;
        let n = spec.numel();
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= n) {
            return Err(ModelError::OutOfRange(format!("flat index {bad} in `{}` with {n} elements", spec.name)));
        }
        Ok(n)
    }

    /// Values of parameter `param` (canonical position) at the given flat row-major indices.
    ///
    /// On the CPU this reads the storage directly (no copy of the tensor).
    pub fn gather(&self, param: usize, indices: &[u32]) -> Result<Vec<f32>> {
        self.check_indices(param, indices)?;
        gather_flat(self.vars[param].as_tensor(), indices)
    }

    /// Overwrite parameter `param` at the given flat indices with `values`, in place.
    pub fn scatter(&self, param: usize, indices: &[u32], values: &[f32]) -> Result<()> {
        self.check_indices(param, indices)?;
        if indices.len() != values.len() {
            return Err(ModelError::OutOfRange(format!("{} indices but {} values", indices.len(), values.len())));
        }
        if indices.is_empty() {
            return Ok(());
        }
        let t = self.vars[param].as_tensor();
        let flat = t.flatten_all()?;
        let idx = Tensor::from_slice(indices, indices.len(), &self.device)?;
        let src = Tensor::from_slice(values, values.len(), &self.device)?;
        flat.scatter_set(&idx, &src, 0)?;
        Ok(())
    }

    /// All values of parameter `param`, flattened (a copy).
    pub fn to_vec(&self, param: usize) -> Result<Vec<f32>> {
        Ok(self.vars[param].as_tensor().flatten_all()?.to_vec1::<f32>()?)
    }

    /// Replace every value with those of `other` (same config), in place.
    pub fn assign(&self, other: &Params) -> Result<()> {
        if other.config != self.config {
            return Err(ModelError::InvalidConfig("assign between different configs".into()));
        }
        for (a, b) in self.vars.iter().zip(&other.vars) {
            a.set(&b.as_tensor().to_device(&self.device)?)?;
        }
        Ok(())
    }
}

/// Gather a tensor's values at flat indices (CPU fast path reads storage in place).
pub fn gather_flat(t: &Tensor, indices: &[u32]) -> Result<Vec<f32>> {
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            let data = &all[start..start + t.elem_count()];
            return Ok(indices.iter().map(|&i| data[i as usize]).collect());
        }
    }
    let flat = t.flatten_all()?.to_dtype(DType::F32)?;
    let idx = Tensor::from_slice(indices, indices.len(), t.device())?;
    Ok(flat.index_select(&idx, 0)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> ModelConfig {
        ModelConfig::new(32, 16, 24, 2, 4, 2, 16, 1e-5)
    }

    #[test]
    fn canonical_order_matches_hf() {
        let names: Vec<_> = param_specs(&micro()).into_iter().map(|s| s.name).collect();
        assert_eq!(names[0], "model.embed_tokens.weight");
        assert_eq!(names[1], "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(names[5], "model.layers.0.mlp.gate_proj.weight");
        assert_eq!(names[8], "model.layers.0.input_layernorm.weight");
        assert_eq!(names[9], "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(names[names.len() - 2], "model.norm.weight");
        assert_eq!(names[names.len() - 1], "lm_head.weight");
        assert_eq!(names.len(), 2 + 9 * 2 + 1);
        let tiny = param_specs(&ModelConfig::preset("1b").unwrap());
        assert_eq!(tiny.len(), 147);
    }

    #[test]
    fn genesis_is_deterministic_and_seed_dependent() {
        let d = Device::Cpu;
        let a = Params::genesis(&micro(), 7, &d).unwrap();
        let b = Params::genesis(&micro(), 7, &d).unwrap();
        let c = Params::genesis(&micro(), 8, &d).unwrap();
        for i in 0..a.len() {
            assert_eq!(a.to_vec(i).unwrap(), b.to_vec(i).unwrap());
        }
        assert_ne!(a.to_vec(0).unwrap(), c.to_vec(0).unwrap());
        assert!(a.to_vec(8).unwrap().iter().all(|&x| x == 1.0));
    }

    #[test]
    fn genesis_statistics_and_known_bits() {
        let spec = ParamSpec { name: "w".into(), shape: vec![3, GENESIS_CHUNK], kind: ParamKind::Linear };
        let v = genesis_values(&spec, 1, 0.02);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-4, "std {}", var.sqrt());
        let a = (0.02f64 * 3f64.sqrt()) as f32;
        assert!(v.iter().all(|&x| x.abs() < a));
        // Streams differ per chunk.
        assert_ne!(v[..16], v[GENESIS_CHUNK..GENESIS_CHUNK + 16]);
    }

    #[test]
    fn gather_scatter_round_trip() {
        let p = Params::genesis(&micro(), 1, &Device::Cpu).unwrap();
        let idx = [0u32, 5, 17, 3];
        let before = p.gather(1, &idx).unwrap();
        let all = p.to_vec(1).unwrap();
        assert_eq!(before, idx.iter().map(|&i| all[i as usize]).collect::<Vec<_>>());
        p.scatter(1, &idx, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(p.gather(1, &idx).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let after = p.to_vec(1).unwrap();
        assert_eq!(after[1], all[1]);
        assert!(p.gather(1, &[10_000]).is_err());
        assert!(p.scatter(1, &[0], &[]).is_err());
    }
}
