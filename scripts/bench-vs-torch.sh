#!/usr/bin/env bash
# Side by side on the CPU: BISTRO's training step (forward, backward, AdamW) against
# PyTorch's on the same config, batch and optimizer, interleaved (A B A B) so that host load
# hits both alike. Keeps only steps that mostly had both cores (cpu/wall >= 1.5) and prints the
# machine, the median tokens/s of each, the ratio bistro / torch and the achieved GFLOP/s
# against the CPU's nominal f32 peak.
#
#   TORCH_PY=$HOME/.cache/torch-ref/bin/python bash scripts/bench-vs-torch.sh
#
# TORCH_PY must have torch and transformers (a CPU-only install is described in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PY="${TORCH_PY:-$HOME/.cache/torch-ref/bin/python}"
ROUNDS="${ROUNDS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/bistro/target}"
cargo build --release -p bistro-benches --bin train_step >/dev/null
BIN="$CARGO_TARGET_DIR/release/train_step"
OUT=$(mktemp)
# The machine: results differ by CPU (gemm and MKL pick AVX-512 or AVX2 kernels at run time).
CPU_MODEL=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
CPU_FAMILY=$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
CPU_MODEL_NO=$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
CPU_MHZ=$(grep -m1 '^cpu MHz' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
SIMD=$(grep -qw avx512f /proc/cpuinfo && echo avx512f || (grep -qw avx2 /proc/cpuinfo && echo avx2 || echo sse))
echo "machine: $CPU_MODEL (family $CPU_FAMILY, model $CPU_MODEL_NO), $(nproc) cores, $SIMD, ${CPU_MHZ} MHz; $(date -u +%F)"
echo "torch: $("$TORCH_PY" -c 'import torch; print(torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())' 2>/dev/null || echo unavailable)"
for round in $(seq "$ROUNDS"); do
  for m in "tiny 8" "small 4"; do
    set -- $m
    "$BIN" --model "$1" --batch "$2" --seq 256 --steps 4 --warmup 2 >> "$OUT"
    THREADS=$(nproc) "$TORCH_PY" benches/torch_reference.py --model "$1" --batch "$2" --seq 256 --steps 4 --warmup 2 >> "$OUT"
  done
done
python3 - "$OUT" "$SIMD" "$CPU_MHZ" "$(nproc)" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
simd, mhz, cores = sys.argv[2], float(sys.argv[3] or 0), int(sys.argv[4])
# Training FLOPs per token of each model, as train_step reports them (the same for torch).
def flops_per_token(model):
    return next(r["flops_per_token"] for r in rows if r["impl"] == "bistro" and r["model"] == model)
lanes = {"avx512f": 16, "avx2": 8}.get(simd, 4)
# Nominal f32 peak: cores x 2 FMA units x lanes x 2 flops x clock (the clock /proc reports).
peak = cores * 2 * lanes * 2 * mhz / 1e3
def med(impl, model):
    xs = [r["tokens"] / r["wall_s"] for r in rows if r["impl"].startswith(impl) and r["model"] == model and r["cpu_s"] / r["wall_s"] >= 1.5]
    return (statistics.median(xs), len(xs)) if xs else (float("nan"), 0)
print(f"{'model':<6} {'bistro tok/s':>13} {'torch tok/s':>12} {'ratio':>6} {'bistro GFLOP/s':>15} {'torch GFLOP/s':>14}  (steps kept: bistro/torch)")
for model in ["tiny", "small"]:
    (b, nb), (t, nt) = med("bistro", model), med("torch", model)
    f = flops_per_token(model) / 1e9
    print(f"{model:<6} {b:>13.0f} {t:>12.0f} {b / t:>6.2f} {b * f:>15.0f} {t * f:>14.0f}  ({nb}/{nt})")
print(f"nominal f32 peak: {peak:.0f} GFLOP/s ({cores} cores x 2 FMA units x {lanes} lanes x 2 x {mhz:.0f} MHz)")
PY
