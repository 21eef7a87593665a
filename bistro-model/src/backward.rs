//! The model's own backward pass: the loss and every parameter's gradient in one call,
//! without Candle's autograd.
//!
//! Candle's `backward` walks the recorded graph and, for every input of every node, starts
//! the input's gradient as a zero-filled tensor and adds the node's contribution to it: a
//! memset and an addition per node, most of them on one thread. Here the forward pass keeps
//! the activations the backward needs, and the backward runs the same fused kernels
//! ([`crate::fused`]) in reverse, writing each gradient once; only the residual stream and
//! the three uses of each normalised input are summed. The result is the same gradient
//! (`tests/backward.rs` checks it against Candle's autograd on the composed reference ops).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::fused::{self, Causal, backward as bwd};
use crate::model::{DecoderLayer, Linear, Llama};
use crate::ops;

/// The loss and gradient of one batch, from [`Llama::loss_grads`].
#[derive(Debug)]
pub struct LossGrads {
    /// Sum of the token cross-entropies (not scaled).
    pub loss_sum: f64,
    /// Number of counted targets.
    pub count: usize,
    /// The gradient of `scale * loss_sum` for every parameter tensor of the model, keyed as
    /// Candle's autograd keys them (by the parameters' variables).
    pub grads: GradStore,
}

/// A Candle gradient store with nothing in it but a throwaway scalar's own entry (Candle
/// offers no public constructor; `backward` of a fresh scalar is the way to get one).
fn empty_store() -> Result<GradStore> {
    Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.backward()?)
}

/// What one decoder layer's backward needs from its forward.
struct Saved {
    /// The layer's input (residual stream).
    x: Tensor,
    /// `input_layernorm(x)`.
    a: Tensor,
    /// Queries, keys and values, head-major `[B, heads, T, D]` (keys and values repeated to
    /// the query heads).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities `[B, heads, T, T]`.
    p: Tensor,
    /// The heads merged back, `[B*T, H]` (the input of `o_proj`).
    y: Tensor,
    /// `x + attention`.
    h: Tensor,
    /// `post_attention_layernorm(h)`.
    b: Tensor,
    /// Gate and up projections, and `silu(gate) * up`.
    g: Tensor,
    u: Tensor,
    m: Tensor,
}

/// `x Wᵀ` of a bias-free linear layer.
fn linear(x: &Tensor, l: &Linear) -> candle_core::Result<Tensor> {
    fused::matmul(x, &l.weight.detach(), false, true)
}

/// The backward of [`linear`] at input `x`: `(dx, dW) = (dy W, dyᵀ x)`.
fn linear_backward(x: &Tensor, l: &Linear, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let dx = fused::matmul(dy, &l.weight.detach(), false, false)?;
    let dw = fused::matmul(dy, x, true, false)?;
    Ok((dx, dw))
}

/// What every layer of one pass shares: the batch shape and the rotary tables (in the
/// dtype the rope kernel takes on this device).
struct Geometry {
    batch: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
}

impl DecoderLayer {
    /// The gradient of the attention's `repeat_kv` input: the repeated heads' gradients
    /// summed.
    fn repeat_kv_backward(&self, dx: Tensor) -> candle_core::Result<Tensor> {
        let (nh, nkv) = (self.self_attn.n_heads, self.self_attn.n_kv_heads);
        if nh == nkv {
            return Ok(dx);
        }
        let (b, _, t, hd) = dx.dims4()?;
        dx.reshape((b, nkv, nh / nkv, t, hd))?.sum(2)
    }

    /// The layer's output for input `x` (the fused forward of [`DecoderLayer::forward`]),
    /// with what its backward needs.
    fn forward_saving(&self, x: Tensor, geo: &Geometry) -> candle_core::Result<(Tensor, Saved)> {
        let att = &self.self_attn;
        let t = geo.seq;
        let a = fused::rms_norm(&x, &self.input_layernorm.weight.detach(), self.input_layernorm.eps)?;
        let q = fused::rope_to_heads(&linear(&a, &att.q_proj)?, t, att.n_heads, &geo.cos, &geo.sin)?;
        let k = fused::rope_to_heads(&linear(&a, &att.k_proj)?, t, att.n_kv_heads, &geo.cos, &geo.sin)?;
        let v = fused::split_heads(&linear(&a, &att.v_proj)?, t, att.n_kv_heads)?;
        let (k, v) = (att.repeat_kv(k)?, att.repeat_kv(v)?);
        let scale = 1.0 / (att.head_dim as f64).sqrt();
        let p = fused::causal_softmax(&fused::causal_matmul(&q, &k, false, true, Causal::OutLower)?, scale)?;
        let y = fused::merge_heads(&fused::causal_matmul(&p, &v, false, false, Causal::ALower)?)?;
        let h = (&x + linear(&y, &att.o_proj)?)?;
        let post = &self.post_attention_layernorm;
        let b = fused::rms_norm(&h, &post.weight.detach(), post.eps)?;
        let g = linear(&b, &self.mlp.gate_proj)?;
        let u = linear(&b, &self.mlp.up_proj)?;
        let m = fused::swiglu(&g, &u)?;
        let out = (&h + linear(&m, &self.mlp.down_proj)?)?;
        Ok((out, Saved { x, a, q, k, v, p, y, h, b, g, u, m }))
    }

    /// The gradient of the layer's input from its output's `dout`, with every weight's
    /// gradient put in `store`.
    fn backward(&self, s: Saved, dout: Tensor, geo: &Geometry, store: &mut GradStore) -> candle_core::Result<Tensor> {
        let (att, mlp) = (&self.self_attn, &self.mlp);
        let t = geo.seq;
        // out = h + down(m): the MLP branch.
        let (dm, dw_down) = linear_backward(&s.m, &mlp.down_proj, &dout)?;
        let (dg, du) = bwd::swiglu(&s.g, &s.u, &dm)?;
        let (db_g, dw_gate) = linear_backward(&s.b, &mlp.gate_proj, &dg)?;
        let (db_u, dw_up) = linear_backward(&s.b, &mlp.up_proj, &du)?;
        let post = &self.post_attention_layernorm;
        let (dh_norm, dw_post) = bwd::rms_norm(&s.h, &post.weight.detach(), post.eps, &(db_g + db_u)?)?;
        let dh = (dout + dh_norm)?;
        store.insert(&mlp.down_proj.weight, dw_down);
        store.insert(&mlp.gate_proj.weight, dw_gate);
        store.insert(&mlp.up_proj.weight, dw_up);
        store.insert(&post.weight, dw_post);
        // h = x + o_proj(merge(p v)): the attention branch.
        let (dy, dw_o) = linear_backward(&s.y, &att.o_proj, &dh)?;
        let dyh = bwd::merge_heads(&dy, t, att.n_heads)?;
        let dp = fused::causal_matmul(&dyh, &s.v, false, true, Causal::OutLower)?;
        let dv = self.repeat_kv_backward(fused::causal_matmul(&s.p, &dyh, true, false, Causal::AUpper)?)?;
        let scale = 1.0 / (att.head_dim as f64).sqrt();
        let dscores = bwd::causal_softmax(&s.p, &dp, scale)?;
        let dq = fused::causal_matmul(&dscores, &s.k, false, false, Causal::ALower)?;
        let dk = self.repeat_kv_backward(fused::causal_matmul(&dscores, &s.q, true, false, Causal::AUpper)?)?;
        let dq = bwd::rope_to_heads(&dq, t, att.n_heads, &geo.cos, &geo.sin)?;
        let dk = bwd::rope_to_heads(&dk, t, att.n_kv_heads, &geo.cos, &geo.sin)?;
        let dv = bwd::split_heads(&dv, t, att.n_kv_heads)?;
        let (da_q, dw_q) = linear_backward(&s.a, &att.q_proj, &dq)?;
        let (da_k, dw_k) = linear_backward(&s.a, &att.k_proj, &dk)?;
        let (da_v, dw_v) = linear_backward(&s.a, &att.v_proj, &dv)?;
        let inl = &self.input_layernorm;
        let da = ((da_q + da_k)? + da_v)?;
        let (dx_norm, dw_in) = bwd::rms_norm(&s.x, &inl.weight.detach(), inl.eps, &da)?;
        store.insert(&att.o_proj.weight, dw_o);
        store.insert(&att.q_proj.weight, dw_q);
        store.insert(&att.k_proj.weight, dw_k);
        store.insert(&att.v_proj.weight, dw_v);
        store.insert(&inl.weight, dw_in);
        dh + dx_norm
    }
}

impl Llama {
    /// Whether [`Self::loss_grads`] runs the model's own backward pass (the fused ops on a
    /// device and dtype they support, computing in the parameters' dtype); otherwise it
    /// runs Candle's autograd.
    fn own_backward(&self) -> bool {
        self.fused && fused::supported(&self.embed_tokens) && self.compute_dtype == self.embed_tokens.dtype()
    }

    /// The summed causal-LM loss of `input_ids: [B, T]` against `labels: [B, T]` (as
    /// [`Self::loss_sum`]) and the gradient of `scale * loss_sum` for every parameter.
    ///
    /// With the fused ops (the default) this runs the model's own backward pass, which
    /// is faster than Candle's autograd and gives the same gradient up to rounding;
    /// otherwise it is `(scale * loss_sum).backward()`.
    pub fn loss_grads(&self, input_ids: &Tensor, labels: &Tensor, scale: f64) -> Result<LossGrads> {
        if !self.own_backward() {
            let (sum, count) = self.loss_sum(input_ids, labels)?;
            let loss_sum = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = (sum * scale)?.backward()?;
            return Ok(LossGrads { loss_sum, count, grads });
        }
        let (batch, seq) = input_ids.dims2()?;
        if seq == 0 || seq > self.config.max_position_embeddings {
            return Err(ModelError::OutOfRange(format!(
                "sequence length {seq} (must be 1..={})",
                self.config.max_position_embeddings
            )));
        }
        let dtype = self.embed_tokens.dtype();
        let vocab = self.config.vocab_size;
        let (targets, count) = ops::shifted_targets(labels, vocab)?;
        let targets: Vec<u32> = targets.into_iter().map(|x| x.unwrap_or(fused::NO_TARGET)).collect();
        let targets = Tensor::from_vec(targets, batch * seq, &self.device)?;
        let (cos, sin) = ops::rope_tables(self.config.head_dim(), self.config.rope_theta, seq, &self.device)?;
        let table_dtype = if self.device.is_cpu() { dtype } else { DType::F32 };
        let geo = Geometry { batch, seq, cos: cos.to_dtype(table_dtype)?, sin: sin.to_dtype(table_dtype)? };
        debug_assert_eq!(geo.batch * geo.seq, targets.elem_count());

        // Forward, keeping what the backward needs.
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed_tokens.detach().index_select(&ids, 0)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (next, s) = layer.forward_saving(x, &geo)?;
            saved.push(s);
            x = next;
        }
        let f = fused::rms_norm(&x, &self.norm.weight.detach(), self.norm.eps)?;
        let logits = linear(&f, &self.lm_head)?;
        // The loss and its gradient in one pass over the logits.
        let (per_row, dlogits) = bwd::cross_entropy_with_loss(&logits, &targets, scale)?;
        drop(logits);
        let loss_sum = per_row.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;

        // Backward.
        let mut store = empty_store()?;
        let (df, dw_head) = linear_backward(&f, &self.lm_head, &dlogits)?;
        drop(dlogits);
        store.insert(&self.lm_head.weight, dw_head);
        let (mut dx, dw_norm) = bwd::rms_norm(&x, &self.norm.weight.detach(), self.norm.eps, &df)?;
        store.insert(&self.norm.weight, dw_norm);
        for (layer, s) in self.layers.iter().zip(saved).rev() {
            dx = layer.backward(s, dx, &geo, &mut store)?;
        }
        let d_embed = bwd::embedding(&ids, &dx, self.config.vocab_size)?;
        store.insert(&self.embed_tokens, d_embed);
        Ok(LossGrads { loss_sum, count, grads: store })
    }
}
