#!/usr/bin/env python3
"""The same training step as `benches/src/bin/train_step.rs`, in PyTorch (CPU, f32).

LlamaForCausalLM with the BISTRO preset's config (untied, rms_norm_eps 1e-5, rope 1e4),
a fixed random batch, loss with labels = inputs, backward, AdamW (lr 1e-4, betas
0.9/0.95, eps 1e-8, weight decay 0.1), zero_grad; torch.set_num_threads(THREADS).
Prints one JSON line per measured step, like the Rust binary.

Install (CPU-only torch from PyPI): see README "Performance".
"""
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
}


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


preset, batch, seq = arg("--model", "tiny"), int(arg("--batch", "8")), int(arg("--seq", "256"))
steps, warmup = int(arg("--steps", "5")), int(arg("--warmup", "2"))
attn = arg("--attn", "sdpa")
torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))
torch.manual_seed(0)
cfg = LlamaConfig(**PRESETS[preset], rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attn_implementation=attn)
model = LlamaForCausalLM(cfg)
model.train()
ids = torch.randint(0, cfg.vocab_size, (batch, seq))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
for i in range(warmup + steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if i >= warmup:
        print(json.dumps({"impl": f"torch-{attn}", "model": preset, "tokens": batch * seq, "wall_s": round(wall, 4), "cpu_s": round(cpu, 3)}), flush=True)
