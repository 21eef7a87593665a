#!/usr/bin/env python3
"""The same training step as BISTRO's `train_step` (CPU) and `gpu_bench` (CUDA), in PyTorch.

Llama with the BISTRO preset's config (untied, rms_norm_eps from the preset, rope 1e4), a
fixed random batch, loss with labels = inputs, backward, AdamW (lr 1e-4, betas 0.9/0.95,
eps 1e-8, weight decay 0.1), zero_grad. Uses transformers' LlamaForCausalLM when installed,
else a compact equivalent written here (same layers, SDPA attention), so it also runs on a
machine with only torch. Prints one JSON line per measured step.

  --device cpu|cuda   --dtype f32|bf16 (bf16: autocast, f32 master weights)
  THREADS=N           torch.set_num_threads on the CPU

Install (CPU-only torch from PyPI): see README "Performance".
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, rms_norm_eps=1e-5),
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-6),
}


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = h // self.nh
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x, cos, sin):
        b, t, h = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(y).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, h))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    """A compact LlamaForCausalLM (used when transformers is not installed)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def loss(self, ids):
        t = ids.shape[1]
        hd = self.c["hidden_size"] // self.c["num_attention_heads"]
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=ids.device, dtype=torch.float32) / hd))
        f = torch.outer(torch.arange(t, device=ids.device, dtype=torch.float32), inv)
        emb = torch.cat((f, f), dim=-1)
        x = self.embed_tokens(ids)
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(preset, device):
    c = PRESETS[preset]
    try:
        if arg("--impl", "auto") == "compact":
            raise ImportError("compact implementation requested")
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**c, rope_theta=10000.0, tie_word_embeddings=False, attn_implementation=arg("--attn", "sdpa"))
        m = LlamaForCausalLM(cfg).to(device)
        return m, (lambda ids: m(input_ids=ids, labels=ids).loss), "transformers"
    except ImportError:
        m = Llama(c).to(device)
        return m, m.loss, "compact"


def main():
    preset, batch, seq = arg("--model", "tiny"), int(arg("--batch", "8")), int(arg("--seq", "256"))
    steps, warmup = int(arg("--steps", "5")), int(arg("--warmup", "2"))
    device, dtype = arg("--device", "cpu"), arg("--dtype", "f32")
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    model, loss_fn, impl = build(preset, device)
    model.train()
    ids = torch.randint(0, PRESETS[preset]["vocab_size"], (batch, seq), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            row = {"impl": f"torch-{impl}", "model": preset, "tokens": batch * seq, "wall_s": round(wall, 4), "cpu_s": round(cpu, 3), "device": device, "dtype": dtype}
            if device == "cuda":
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
