//! # bistro-model
//!
//! The shared LLaMA-style causal language model of BISTRO, written for training on
//! [Candle](https://github.com/huggingface/candle):
//!
//! * [`ModelConfig`]: presets (`tiny`, `small`, `125m`, `1b`), TOML/JSON and Hugging Face
//!   `config.json` compatible.
//! * [`Params`]: f32 master weights in the **canonical order** (Hugging Face
//!   `LlamaForCausalLM.named_parameters()`), deterministic genesis from a seed, flat
//!   gather/scatter for slices.
//! * [`Llama`]: forward over `[B, T]` token batches, causal-LM cross-entropy that ignores
//!   `-100` labels, gradients for every parameter through the model's own backward pass
//!   ([`Llama::loss_grads`]) or Candle's autograd.
//! * [`checkpoint`]: safetensors with Hugging Face names that open in `transformers` and
//!   candle-transformers.
//!
//! This crate knows nothing of networks, chains or buckets.
//!
//! ```
//! use bistro_model::{Llama, ModelConfig, Params};
//! use candle_core::{Device, Tensor};
//!
//! let cfg = ModelConfig::new(64, 16, 32, 1, 2, 1, 8, 1e-5);
//! let params = Params::genesis(&cfg, 42, &Device::Cpu)?;
//! let model = Llama::new(&params)?;
//! let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
//! let labels = Tensor::new(&[[1i64, 2, 3, 4]], &Device::Cpu)?;
//! // The summed loss and the gradient of the mean loss (scale 1 / 3 targets) for every
//! // parameter, through the model's own backward pass.
//! let out = model.loss_grads(&ids, &labels, 1.0 / 3.0)?;
//! assert_eq!(out.count, 3);
//! assert_eq!(params.gradients(&out.grads)?.len(), params.len());
//! // The same gradient through Candle's autograd.
//! let grads = model.loss(&ids, &labels)?.backward()?;
//! assert_eq!(params.gradients(&grads)?.len(), params.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backward;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod fused;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;

pub use backward::LossGrads;
pub use checkpoint::{load_checkpoint, load_safetensors, save_checkpoint_dir, save_safetensors};
pub use config::{ModelConfig, PRESETS};
pub use device::{device_name, parse_device};
pub use error::{ModelError, Result};
pub use model::Llama;
pub use ops::IGNORE_INDEX;
pub use params::{ParamKind, ParamSpec, Params, param_specs};

/// Re-export of the Candle core crate this model is built on.
pub use candle_core;
