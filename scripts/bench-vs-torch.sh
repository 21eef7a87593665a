#!/usr/bin/env bash
# Side by side on the CPU: BISTRO's training step (forward, backward, AdamW) against
# PyTorch's on the same config, batch and optimizer, interleaved (A B A B) so that host load
# hits both alike. Keeps only steps that mostly had both cores (cpu/wall >= 1.5) and prints the
# median tokens/s of each and the ratio bistro / torch.
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
for round in $(seq "$ROUNDS"); do
  for m in "tiny 8" "small 4"; do
    set -- $m
    "$BIN" --model "$1" --batch "$2" --seq 256 --steps 4 --warmup 2 >> "$OUT"
    THREADS=$(nproc) "$TORCH_PY" benches/torch_reference.py --model "$1" --batch "$2" --seq 256 --steps 4 --warmup 2 >> "$OUT"
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def med(impl, model):
    xs = [r["tokens"] / r["wall_s"] for r in rows if r["impl"].startswith(impl) and r["model"] == model and r["cpu_s"] / r["wall_s"] >= 1.5]
    return (statistics.median(xs), len(xs)) if xs else (float("nan"), 0)
print(f"{'model':<6} {'bistro tok/s':>13} {'torch tok/s':>12} {'ratio':>6}  (steps kept: bistro/torch)")
for model in ["tiny", "small"]:
    (b, nb), (t, nt) = med("bistro", model), med("torch", model)
    print(f"{model:<6} {b:>13.0f} {t:>12.0f} {b / t:>6.2f}  ({nb}/{nt})")
PY
