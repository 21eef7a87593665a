#!/usr/bin/env python3
"""Compare BISTRO's loss and gradients with Hugging Face transformers on the same checkpoint.

    cargo run --release --example checkpoint -- genesis --model tiny --out /tmp/ckpt
    cargo run --release --example checkpoint -- grad --checkpoint /tmp/ckpt \\
        --text "The hacker wrote a kludge." --out /tmp/grads.safetensors
    python3 scripts/compare_hf.py /tmp/ckpt /tmp/grads.safetensors

Needs torch, transformers and safetensors (see shared research torch-cpu.md for a CPU-only
install). Loads the checkpoint directory with LlamaForCausalLM.from_pretrained, runs the
same token ids as inputs and labels, and prints the loss of both and, per parameter, the
relative difference ||g_hf - g_bistro|| / ||g_hf||. Exits 1 when any exceeds --tol.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from safetensors import safe_open
from transformers import LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("grads")
ap.add_argument("--tol", type=float, default=1e-4)
args = ap.parse_args()

torch.manual_seed(0)
model = LlamaForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
model.train()
ours = load_file(args.grads)
with safe_open(args.grads, "pt") as f:
    our_loss = float(f.metadata()["loss"])
ids = ours.pop("input_ids").round().long()[None, :]
out = model(input_ids=ids, labels=ids)
out.loss.backward()
print(f"loss: transformers {out.loss.item():.7f}  bistro {our_loss:.7f}  |diff| {abs(out.loss.item() - our_loss):.2e}")
worst = 0.0
for name, p in model.named_parameters():
    g = p.grad
    o = ours[name].reshape(g.shape)
    rel = ((g - o).norm() / g.norm().clamp_min(1e-30)).item()
    worst = max(worst, rel)
    print(f"{rel:10.3e}  {name}")
print(f"worst relative gradient difference: {worst:.3e} over {len(list(model.parameters()))} tensors")
sys.exit(0 if worst <= args.tol and abs(out.loss.item() - our_loss) <= args.tol * max(1.0, abs(our_loss)) else 1)
