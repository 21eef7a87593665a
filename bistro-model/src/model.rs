//! The LLaMA-style causal language model, written for training.

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::ops;
use crate::params::Params;

/// A bias-free linear layer `y = x W^T` whose weight is cast to the compute dtype.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
}

impl Linear {
    /// Load `{prefix}.weight` of shape `[out, in]`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> CResult<Self> {
        Ok(Linear { weight: vb.get((out_dim, in_dim), "weight")? })
    }

    /// The weight tensor `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Linear {
    /// `x W^T` for `x: [.., in]`: one fused product ([`crate::fused::matmul`]) for
    /// `fused`, else Candle's matmul on a transposed view (the reference).
    pub fn forward_with(&self, x: &Tensor, fused: bool) -> CResult<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        if fused && x.rank() == 2 {
            return crate::fused::matmul(x, &w, false, true);
        }
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = w.dim(0)?;
        }
        y.reshape(out)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, true)
    }
}

/// RMSNorm with a learned gain, differentiable.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// Load `{prefix}.weight` of shape `[dim]`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> CResult<Self> {
        Ok(RmsNorm { weight: vb.get(dim, "weight")?, eps })
    }
}

impl RmsNorm {
    /// Normalise `x` with the fused op (`fused`) or the composed reference.
    pub fn forward_with(&self, x: &Tensor, fused: bool) -> CResult<Tensor> {
        if fused { crate::fused::rms_norm(x, &self.weight, self.eps) } else { ops::rms_norm(x, &self.weight, self.eps) }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, true)
    }
}

/// What all layers of one forward pass share: the batch geometry, rotary tables, and
/// whether to use the fused ops (else the composed reference, with a materialised mask).
#[derive(Clone, Debug)]
pub struct AttentionContext {
    batch: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
    /// The additive causal mask; only built for the composed path.
    mask: Option<Tensor>,
    fused: bool,
}

impl AttentionContext {
    /// The context of a pass over `batch` sequences of `seq` tokens computing in `dtype`:
    /// the rotary tables in the dtype the rope kernels take (`dtype` on the CPU, f32 on
    /// CUDA) and, for the composed path (`!fused`), the additive causal mask.
    pub(crate) fn new(
        cfg: &ModelConfig,
        (batch, seq): (usize, usize),
        dtype: DType,
        fused: bool,
        device: &Device,
    ) -> Result<Self> {
        if seq == 0 || seq > cfg.max_position_embeddings {
            return Err(ModelError::OutOfRange(format!(
                "sequence length {seq} (must be 1..={})",
                cfg.max_position_embeddings
            )));
        }
        let (cos, sin) = ops::rope_tables(cfg.head_dim(), cfg.rope_theta, seq, device)?;
        let table = if device.is_cpu() { dtype } else { DType::F32 };
        let mask = if fused { None } else { Some(ops::causal_mask(seq, seq, DType::F32, device)?) };
        Ok(AttentionContext { batch, seq, cos: cos.to_dtype(table)?, sin: sin.to_dtype(table)?, mask, fused })
    }

    /// Tokens per sequence.
    pub(crate) fn seq(&self) -> usize {
        self.seq
    }

    /// The rotary tables `(cos, sin)`.
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }
}

/// A projection `x Wᵀ` through one of a layer's linear layers: with the weight as the model
/// holds it (tracked by Candle's autograd) or detached (the model's own backward pass).
pub(crate) type Project<'a> = &'a dyn Fn(&Tensor, &Linear) -> CResult<Tensor>;

/// The fused attention's intermediates: what its output projection and its backward pass
/// need.
pub(crate) struct AttentionCore {
    /// Queries, head-major `[B, heads, T, D]`.
    pub(crate) q: Tensor,
    /// Keys and values, head-major and repeated to the query heads.
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    /// Attention probabilities `[B, heads, T, T]`.
    pub(crate) p: Tensor,
    /// The heads merged back, `[B*T, H]`: the input of `o_proj`.
    pub(crate) y: Tensor,
}

/// Grouped-query causal self-attention with rotary embeddings.
#[derive(Clone, Debug)]
pub struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    /// Load `{prefix}.{q,k,v,o}_proj`.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> CResult<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let kv = cfg.num_key_value_heads * hd;
        Ok(Attention {
            q_proj: Linear::load(vb.pp("q_proj"), h, h)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, kv)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, kv)?,
            o_proj: Linear::load(vb.pp("o_proj"), h, h)?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// Keys or values `[B, kv_heads, T, D]` repeated to `[B, heads, T, D]`.
    pub(crate) fn repeat_kv(&self, x: Tensor) -> CResult<Tensor> {
        let rep = self.n_heads / self.n_kv_heads;
        if rep == 1 {
            return Ok(x);
        }
        let (b, nkv, t, hd) = x.dims4()?;
        x.unsqueeze(2)?.expand((b, nkv, rep, t, hd))?.reshape((b, nkv * rep, t, hd))
    }

    /// `1 / sqrt(head_dim)`, the factor on the attention scores.
    pub(crate) fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The fused attention over the normalised stream `a: [B*T, H]` up to its output
    /// projection: rotary + head split in one pass, the causal products (only the blocks
    /// on and below the diagonal of `Q Kᵀ` and of `P`), scale + mask + softmax in one pass,
    /// heads merged back in one pass. `project` applies `q`/`k`/`v_proj`.
    pub(crate) fn fused_core(&self, a: &Tensor, ctx: &AttentionContext, project: Project) -> CResult<AttentionCore> {
        use crate::fused::{self, Causal};
        let t = ctx.seq;
        let q = fused::rope_to_heads(&project(a, &self.q_proj)?, t, self.n_heads, &ctx.cos, &ctx.sin)?;
        let k = fused::rope_to_heads(&project(a, &self.k_proj)?, t, self.n_kv_heads, &ctx.cos, &ctx.sin)?;
        let v = fused::split_heads(&project(a, &self.v_proj)?, t, self.n_kv_heads)?;
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let p = fused::causal_softmax(&fused::causal_matmul(&q, &k, false, true, Causal::OutLower)?, self.scale())?;
        let y = fused::merge_heads(&fused::causal_matmul(&p, &v, false, false, Causal::ALower)?)?;
        Ok(AttentionCore { q, k, v, p, y })
    }

    /// Attention over the flat residual stream `x: [B*T, H]`.
    pub fn forward(&self, x: &Tensor, ctx: &AttentionContext) -> CResult<Tensor> {
        let (b, t, f) = (ctx.batch, ctx.seq, ctx.fused);
        let h = x.dim(1)?;
        let split = |y: Tensor, heads: usize| -> CResult<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let Some(mask) = &ctx.mask else {
            let core = self.fused_core(x, ctx, &|x, l| l.forward_with(x, true))?;
            return self.o_proj.forward_with(&core.y, f);
        };
        // The composed reference: explicit transposes, RoPE, additive mask, softmax.
        let v = split(self.v_proj.forward_with(x, f)?, self.n_kv_heads)?;
        let v = self.repeat_kv(v)?.contiguous()?;
        let q = ops::apply_rope(&split(self.q_proj.forward_with(x, f)?, self.n_heads)?, &ctx.cos, &ctx.sin)?;
        let k = ops::apply_rope(&split(self.k_proj.forward_with(x, f)?, self.n_kv_heads)?, &ctx.cos, &ctx.sin)?;
        let k = self.repeat_kv(k)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * self.scale())?;
        let acc = ops::accum_dtype(scores.dtype());
        let scores = scores.to_dtype(acc)?.broadcast_add(&mask.to_dtype(acc)?)?;
        let probs = ops::softmax_last(&scores)?.to_dtype(q.dtype())?;
        let y = probs.matmul(&v)?; // [B, nh, T, hd]
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b * t, h))?;
        self.o_proj.forward_with(&y, f)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Mlp {
    /// Load `{prefix}.{gate,up,down}_proj`.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> CResult<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h)?,
        })
    }
}

impl Mlp {
    /// The MLP with the fused SwiGLU (`fused`) or the composed reference.
    pub fn forward_with(&self, x: &Tensor, fused: bool) -> CResult<Tensor> {
        let g = self.gate_proj.forward_with(x, fused)?;
        let u = self.up_proj.forward_with(x, fused)?;
        let h = if fused { crate::fused::swiglu(&g, &u)? } else { (ops::silu(&g)? * u)? };
        self.down_proj.forward_with(&h, fused)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.forward_with(x, true)
    }
}

/// One pre-norm decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
}

impl DecoderLayer {
    /// Load `model.layers.{i}`.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> CResult<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    /// `x + attn(norm(x))`, then `h + mlp(norm(h))`, over the flat stream `x: [B*T, H]`.
    pub fn forward(&self, x: &Tensor, ctx: &AttentionContext) -> CResult<Tensor> {
        let f = ctx.fused;
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward_with(x, f)?, ctx)?)?;
        &h + self.mlp.forward_with(&self.post_attention_layernorm.forward_with(&h, f)?, f)?
    }
}

/// The causal LM (`LlamaForCausalLM` layout) over a [`Params`] set.
///
/// Its tensors are the parameters' variables, so `loss.backward()` yields a gradient for
/// every parameter; updating the variables in place updates the model.
#[derive(Clone, Debug)]
pub struct Llama {
    pub(crate) config: ModelConfig,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) compute_dtype: DType,
    pub(crate) fused: bool,
    pub(crate) device: Device,
}

impl Llama {
    /// Build the model from a [`VarBuilder`] with Hugging Face names.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let device = vb.device().clone();
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(m.pp("layers").pp(i), cfg))
            .collect::<CResult<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size)?;
        Ok(Llama {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            compute_dtype: DType::F32,
            fused: true,
            device,
        })
    }

    /// Build the model over `params` (f32 compute).
    pub fn new(params: &Params) -> Result<Self> {
        Self::load(params.var_builder(), params.config())
    }

    /// Use `dtype` (F32, or BF16 on CUDA) for matmuls and activations; master weights stay f32.
    /// RMSNorm statistics, softmax and the loss are always computed in f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Use the fused ops of [`crate::fused`] (the default) or the composed reference ops
    /// (slower; kept to check the fused ones against).
    pub fn with_fused_ops(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    /// The config of this model.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `[B, T, V]` (f32; f64 for an f64 model) for token ids `[B, T]` (u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let logits = self.flat_logits(input_ids)?;
        let v = logits.dim(1)?;
        Ok(logits.reshape((b, t, v))?)
    }

    /// Logits as `[B*T, V]`: the residual stream stays flat `[B*T, H]` through the layers.
    fn flat_logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ctx = AttentionContext::new(&self.config, (b, t), self.compute_dtype, self.fused, &self.device)?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let emb = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let mut x = emb.to_dtype(self.compute_dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, &ctx)?;
        }
        let x = self.norm.forward_with(&x, self.fused)?;
        let logits = self.lm_head.forward_with(&x, self.fused)?;
        Ok(logits.to_dtype(ops::accum_dtype(logits.dtype()))?)
    }

    /// Sum of the token cross-entropies and the number of counted targets (see
    /// [`ops::causal_lm_loss_sum`]); divide by a window's total count for the mean.
    pub fn loss_sum(&self, input_ids: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        if self.fused {
            Ok(crate::fused::causal_lm_loss_sum(&self.flat_logits(input_ids)?, labels)?)
        } else {
            Ok(ops::causal_lm_loss_sum(&self.forward(input_ids)?, labels)?)
        }
    }

    /// Mean causal-LM cross-entropy over the counted targets (Hugging Face's loss).
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (sum, n) = self.loss_sum(input_ids, labels)?;
        if n == 0 {
            return Err(ModelError::EmptyBatch);
        }
        Ok((sum / n as f64)?)
    }
}
