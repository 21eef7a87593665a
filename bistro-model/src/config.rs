//! Model configuration: presets, serde (TOML/JSON) and Hugging Face `config.json` compatibility.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Domain-separation tag of [`ModelConfig::hash`].
pub const CONFIG_HASH_TAG: &[u8] = b"bistro/model-config/v1";

/// Shape and numerics of the LLaMA-style model.
///
/// Field names are those of Hugging Face's `LlamaConfig`, so a Hugging Face `config.json`
/// deserialises into this type (unknown fields are ignored) and [`ModelConfig::to_hf_json`]
/// writes one that `transformers` and candle-transformers' Llama accept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ModelConfig {
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Longest sequence the rotary tables cover.
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Scale of the genesis initialisation (standard deviation of the weights).
    pub initializer_range: f64,
    /// Beginning-of-sequence token, when the tokenizer has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, when the tokenizer has one.
    pub eos_token_id: Option<u32>,
}

/// What is accepted on input: our own TOML/JSON and Hugging Face `config.json` (old and new layouts).
#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    initializer_range: Option<f64>,
    head_dim: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

fn single_token(v: Option<serde_json::Value>, field: &str) -> Result<Option<u32>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| format!("{field} must be a token id")),
        // A list of EOS ids: the first is the one we append.
        Some(serde_json::Value::Array(a)) => single_token(a.into_iter().next(), field),
        Some(other) => Err(format!("{field} must be a number, got {other}")),
    }
}

impl TryFrom<RawConfig> for ModelConfig {
    type Error = String;

    fn try_from(r: RawConfig) -> Result<Self, String> {
        if r.tie_word_embeddings == Some(true) {
            return Err("tie_word_embeddings = true is not supported: BISTRO's model has an untied LM head".into());
        }
        if r.attention_bias == Some(true) || r.mlp_bias == Some(true) {
            return Err("attention_bias / mlp_bias are not supported: BISTRO's model has no biases".into());
        }
        if let Some(act) = &r.hidden_act
            && act != "silu"
            && act != "swiglu"
        {
            return Err(format!("hidden_act `{act}` is not supported (only silu)"));
        }
        if let Some(scaling) = &r.rope_scaling
            && !scaling.is_null()
        {
            return Err("rope_scaling is not supported".into());
        }
        let rope_from_params = match &r.rope_parameters {
            Some(p) => {
                if let Some(t) = &p.rope_type
                    && t != "default"
                {
                    return Err(format!("rope_type `{t}` is not supported (only default)"));
                }
                p.rope_theta
            }
            None => None,
        };
        let cfg = ModelConfig {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            num_key_value_heads: r.num_key_value_heads.unwrap_or(r.num_attention_heads),
            max_position_embeddings: r.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: r.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: r.rope_theta.or(rope_from_params).unwrap_or(10_000.0),
            initializer_range: r.initializer_range.unwrap_or(0.02),
            bos_token_id: single_token(r.bos_token_id, "bos_token_id")?,
            eos_token_id: single_token(r.eos_token_id, "eos_token_id")?,
        };
        if let Some(hd) = r.head_dim
            && (cfg.num_attention_heads == 0 || hd * cfg.num_attention_heads != cfg.hidden_size)
        {
            return Err(format!("head_dim {hd} must equal hidden_size / num_attention_heads"));
        }
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

/// The names of the built-in presets, in size order.
pub const PRESETS: [&str; 4] = ["tiny", "small", "125m", "1b"];

impl ModelConfig {
    /// A built-in preset by name: `tiny`, `small`, `125m` or `1b`.
    ///
    /// * `tiny` (7.4M parameters, vocab 8192, seq 256): the CPU default and the tests' model.
    /// * `small` (33.7M, vocab 8192): a CPU-sized model that still learns visibly.
    /// * `125m` (vocab 32000, seq 2048): a GPU-sized model.
    /// * `1b` (1.2B): the 2024 original's shape (16 layers, hidden 2048, 8 heads, FFN 8192,
    ///   vocab 32000, seq 2048).
    pub fn preset(name: &str) -> Result<Self> {
        let c = match name {
            "tiny" => Self::new(8192, 256, 688, 4, 4, 4, 256, 1e-5),
            "small" => Self::new(8192, 512, 1376, 8, 8, 8, 1024, 1e-5),
            "125m" => Self::new(32000, 768, 2048, 12, 12, 12, 2048, 1e-5),
            "1b" => Self::new(32000, 2048, 8192, 16, 8, 8, 2048, 1e-6),
            _ => {
                return Err(ModelError::UnknownPreset { name: name.to_string(), known: PRESETS.join(", ") });
            }
        };
        Ok(c)
    }

    /// A config with the given shape and the defaults for everything else.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        rms_norm_eps: f64,
    ) -> Self {
        ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta: 10_000.0,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Resolve a model spec: a preset name, or a path to a TOML/JSON config
    /// (our own format or a Hugging Face `config.json`).
    pub fn resolve(spec: &str) -> Result<Self> {
        if PRESETS.contains(&spec) {
            return Self::preset(spec);
        }
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_file(path);
        }
        Self::preset(spec)
    }

    /// Read a config from a `.toml` or `.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str::<ModelConfig>(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str::<ModelConfig>(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|reason| ModelError::ConfigParse { path: path.to_path_buf(), reason })
    }

    /// Parse a Hugging Face `config.json` (or our JSON form) from a string.
    pub fn from_json_str(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| ModelError::ConfigParse { path: "<string>".into(), reason: e.to_string() })
    }

    /// Check that the shape is consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || self.max_position_embeddings == 0
        {
            return bad("every size must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad("rms_norm_eps must be positive".into());
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad("rope_theta must be positive".into());
        }
        if !(self.initializer_range > 0.0 && self.initializer_range.is_finite()) {
            return bad("initializer_range must be positive".into());
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        crate::params::param_specs(self).iter().map(|s| s.numel()).sum()
    }

    /// A Hugging Face `config.json` for `LlamaForCausalLM` (both the old top-level
    /// `rope_theta`/`torch_dtype` and the newer `rope_parameters`/`dtype` keys).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": null,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "dtype": "float32",
            "use_cache": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pretraining_tp": 1,
        })
    }

    /// A stable hash of everything that changes the parameters or the computation
    /// (hex sha256 of [`CONFIG_HASH_TAG`] and the canonical JSON). Goes into slice metadata.
    pub fn hash(&self) -> Result<String> {
        // serde_json writes struct fields in declaration order: stable across platforms.
        let bytes =
            serde_json::to_vec(self).map_err(|source| ModelError::Serialize { what: "model config", source })?;
        let mut h = Sha256::new();
        h.update(CONFIG_HASH_TAG);
        h.update(&bytes);
        Ok(hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_expected_sizes() {
        assert_eq!(ModelConfig::preset("tiny").unwrap().num_params(), 7_358_720);
        assert_eq!(ModelConfig::preset("1b").unwrap().num_params(), 1_204_881_408);
        assert!(ModelConfig::preset("nope").is_err());
    }

    #[test]
    fn hf_json_round_trip() {
        for p in PRESETS {
            let c = ModelConfig::preset(p).unwrap();
            let j = c.to_hf_json().to_string();
            assert_eq!(ModelConfig::from_json_str(&j).unwrap(), c);
        }
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let c = ModelConfig::preset("small").unwrap();
        let t = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<ModelConfig>(&t).unwrap(), c);
        let minimal = "vocab_size = 10\nhidden_size = 8\nintermediate_size = 16\nnum_hidden_layers = 1\nnum_attention_heads = 2\n";
        let m: ModelConfig = toml::from_str(minimal).unwrap();
        assert_eq!(m.num_key_value_heads, 2);
        assert_eq!(m.rope_theta, 10_000.0);
    }

    #[test]
    fn new_hf_layout_rope_parameters() {
        let j = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},
            "eos_token_id":[2,3]}"#;
        let c = ModelConfig::from_json_str(j).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.eos_token_id, Some(2));
    }

    #[test]
    fn invalid_configs_are_rejected_with_reason() {
        let j =
            r#"{"vocab_size":10,"hidden_size":9,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let e = ModelConfig::from_json_str(j).unwrap_err().to_string();
        assert!(e.contains("not divisible"), "{e}");
        let j = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"tie_word_embeddings":true}"#;
        assert!(ModelConfig::from_json_str(j).unwrap_err().to_string().contains("untied"));
    }

    /// Known answers: the model-config hash is sha256 over serde_json's output, part of
    /// every slice; a serialiser change in a dependency bump must fail here, not split a
    /// network (pin the old serialisation then; do not update these values).
    #[test]
    fn preset_hashes_are_known_answers() {
        for (name, want) in [
            ("tiny", "1e744713449ed878509fc0eee8483a090820713a41bfa784ef3a19411547df36"),
            ("small", "5cf3127fb96df708f95bb433334cd201d6ab8afe954bc0724a3f571737faa837"),
            ("125m", "7e9e13b44eb0416fa2b97751c7b6a78ce3263415e231ed7a522ee901f7479295"),
            ("1b", "b8293b6a6ddadcc0f9c6218360d1da78b7a4959f61716d1062c3cae12adaad4e"),
        ] {
            assert_eq!(ModelConfig::preset(name).unwrap().hash().unwrap(), want, "{name}");
        }
    }

    #[test]
    fn hash_changes_with_shape() {
        let a = ModelConfig::preset("tiny").unwrap();
        let mut b = a.clone();
        b.num_hidden_layers += 1;
        assert_ne!(a.hash().unwrap(), b.hash().unwrap());
        assert_eq!(a.hash().unwrap(), ModelConfig::preset("tiny").unwrap().hash().unwrap());
    }
}
