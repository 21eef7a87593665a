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

use crate::error::Result;
use crate::fused::{self, Causal, backward as bwd};
use crate::model::{AttentionContext, AttentionCore, DecoderLayer, Linear, Llama};

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
    /// The attention's intermediates.
    att: AttentionCore,
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
    fn forward_saving(&self, x: Tensor, ctx: &AttentionContext) -> candle_core::Result<(Tensor, Saved)> {
        let a = fused::rms_norm(&x, &self.input_layernorm.weight.detach(), self.input_layernorm.eps)?;
        let att = self.self_attn.fused_core(&a, ctx, &linear)?;
        let h = (&x + linear(&att.y, &self.self_attn.o_proj)?)?;
        let post = &self.post_attention_layernorm;
        let b = fused::rms_norm(&h, &post.weight.detach(), post.eps)?;
        let g = linear(&b, &self.mlp.gate_proj)?;
        let u = linear(&b, &self.mlp.up_proj)?;
        let m = fused::swiglu(&g, &u)?;
        let out = (&h + linear(&m, &self.mlp.down_proj)?)?;
        Ok((out, Saved { x, a, att, h, b, g, u, m }))
    }

    /// The gradient of the layer's input from its output's `dout`, with every weight's
    /// gradient put in `store`.
    fn backward(
        &self,
        s: Saved,
        dout: Tensor,
        ctx: &AttentionContext,
        store: &mut GradStore,
    ) -> candle_core::Result<Tensor> {
        let (att, mlp) = (&self.self_attn, &self.mlp);
        let (t, (cos, sin)) = (ctx.seq(), ctx.tables());
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
        let c = &s.att;
        let (dy, dw_o) = linear_backward(&c.y, &att.o_proj, &dh)?;
        let dyh = bwd::merge_heads(&dy, t, att.n_heads)?;
        let dp = fused::causal_matmul(&dyh, &c.v, false, true, Causal::OutLower)?;
        let dv = self.repeat_kv_backward(fused::causal_matmul(&c.p, &dyh, true, false, Causal::AUpper)?)?;
        let dscores = bwd::causal_softmax(&c.p, &dp, att.scale())?;
        let dq = fused::causal_matmul(&dscores, &c.k, false, false, Causal::ALower)?;
        let dk = self.repeat_kv_backward(fused::causal_matmul(&dscores, &c.q, true, false, Causal::AUpper)?)?;
        let dq = bwd::rope_to_heads(&dq, t, att.n_heads, cos, sin)?;
        let dk = bwd::rope_to_heads(&dk, t, att.n_kv_heads, cos, sin)?;
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
    /// otherwise it is `(scale * loss_sum).backward()`. On the CPU it runs on a thread of
    /// Rayon's global pool, whose threads run the kernels' parallel parts.
    pub fn loss_grads(&self, input_ids: &Tensor, labels: &Tensor, scale: f64) -> Result<LossGrads> {
        if self.device.is_cpu() {
            return fused::on_pool(|| self.loss_grads_here(input_ids, labels, scale));
        }
        self.loss_grads_here(input_ids, labels, scale)
    }

    /// [`Self::loss_grads`] on the calling thread.
    fn loss_grads_here(&self, input_ids: &Tensor, labels: &Tensor, scale: f64) -> Result<LossGrads> {
        if !self.own_backward() {
            let (sum, count) = self.loss_sum(input_ids, labels)?;
            let loss_sum = sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = (sum * scale)?.backward()?;
            return Ok(LossGrads { loss_sum, count, grads });
        }
        let ctx = AttentionContext::new(&self.config, input_ids.dims2()?, self.compute_dtype, true, &self.device)?;
        let (targets, count) = fused::loss_targets(labels, self.config.vocab_size, &self.device)?;

        // Forward, keeping what the backward needs.
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed_tokens.detach().index_select(&ids, 0)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (next, s) = layer.forward_saving(x, &ctx)?;
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
            dx = layer.backward(s, dx, &ctx, &mut store)?;
        }
        let d_embed = bwd::embedding(&ids, &dx, self.config.vocab_size)?;
        store.insert(&self.embed_tokens, d_embed);
        Ok(LossGrads { loss_sum, count, grads: store })
    }
}
