#!/usr/bin/env bash
# The GPU benchmark in one run (under 8 minutes on one H100/H200), for a machine with the
# NVIDIA driver and PyTorch but no cargo and no internet.
#
# Build here (no GPU needed): `bash benches/gpu/build.sh` puts gpu_bench and the CUDA test
# binaries (fused ops vs the CPU kernels, the norm kernel) into benches/gpu/bin/.
# Run there (from the repository root):
#   bash benches/gpu/run.sh            # writes $OUT (default benches/gpu/out)/report.{json,md}
#
# It measures, in the same run: BISTRO's bf16 training step (125m, 1b: tokens/s, MFU, device
# memory), the gradient-difference-norm kernel against a device-to-device copy, validator
# throughput (1b miners per 24 s and 36 s window, with the device norm kernel, at the f32
# recompute the numeric contract requires and, for comparison, bf16), the honest `e` of a
# GPU-computed gradient (f32 and bf16) against the CPU validator on the same window
# (cross-hardware honesty), and PyTorch's step on the same configs and batches.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN="${GPU_BENCH_BIN:-benches/gpu/bin/gpu_bench}"
TORCH_PY="${TORCH_PY:-/opt/torch/.venv/bin/python}"
OUT="${OUT:-benches/gpu/out}"
SEQ="${SEQ:-2048}"; B125="${B125:-16}"; B1B="${B1B:-4}"
mkdir -p "$OUT"
RAW="$OUT/raw.jsonl"; : > "$RAW"

# The libraries a carried binary needs come from the PyTorch venv's CUDA 13 wheels.
CU13_LIB="$("$TORCH_PY" - <<'PY'
import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.exists(os.path.join(d, "libcublas.so.13")):
        print(d); break
PY
)"
[ -n "$CU13_LIB" ] && export LD_LIBRARY_PATH="$CU13_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
NVRTC_VER="$("$TORCH_PY" -c 'import importlib.metadata as m; print(m.version("nvidia-cuda-nvrtc"))' 2>/dev/null || echo unknown)"
case "$NVRTC_VER" in 13.0.*) ;; *) echo "warning: nvrtc $NVRTC_VER: run-time PTX may be newer than the driver accepts" >&2 ;; esac

GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
case "$GPU" in
  *H100*PCIe*) PEAK=756 ;;
  *H100*|*H200*) PEAK=989.4 ;;
  *A100*) PEAK=312 ;;
  *) PEAK="${PEAK_TFLOPS:-989.4}" ;;
esac
echo "{\"what\":\"machine\",\"gpu\":\"$GPU\",\"peak_bf16_tflops\":$PEAK,\"nvrtc\":\"$NVRTC_VER\"}" >> "$RAW"

echo "== correctness first: the CUDA kernels against the CPU kernels"
for t in benches/gpu/bin/test-*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  if timeout 120 "$t" --nocapture --test-threads 1 >> "$RAW.log" 2>&1; then ok=true; else ok=false; fi
  echo "{\"what\":\"test\",\"name\":\"$name\",\"passed\":$ok}" | tee -a "$RAW"
done

echo "== bistro (gpu_bench)"
if ldd "$BIN" | grep 'not found'; then echo "unresolved libraries (see above)" >&2; fi
timeout 300 "$BIN" --peak-tflops "$PEAK" --seq "$SEQ" --batch-125m "$B125" --batch-1b "$B1B" --steps 5 2>&1 | tee -a "$RAW.log" | grep '^{' >> "$RAW"
echo "== cross-hardware honesty: the miner's step on the GPU (f32, bf16) against the CPU validator"
PREC_BIN="${PRECISION_BIN:-benches/gpu/bin/precision}"
timeout 150 "$PREC_BIN" --device cuda --model tiny --windows 20 --every 10 2>&1 | tee -a "$RAW.log" | grep '^{' >> "$RAW"
echo "== torch (same configs and batches, bf16 autocast, f32 master weights)"
for m in "125m $B125" "1b $B1B"; do
  set -- $m
  timeout 120 "$TORCH_PY" benches/torch_reference.py --device cuda --dtype bf16 --model "$1" --batch "$2" --seq "$SEQ" --steps 5 --warmup 2 2>&1 | tee -a "$RAW.log" | grep '^{' >> "$RAW"
done

python3 - "$RAW" "$OUT" "$PEAK" <<'PY'
import json, statistics, sys
raw, out, peak = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [json.loads(l) for l in open(raw) if l.startswith("{")]
report = {"rows": rows, "summary": {}}
md = ["# BISTRO GPU benchmark", ""]
tests = [r for r in rows if r.get("what") == "test"]
if tests:
    md += ["CUDA kernel tests: " + ", ".join(f"{t['name']} {'passed' if t['passed'] else 'FAILED'}" for t in tests), ""]
mach = [r for r in rows if r.get("what") == "machine"]
if mach:
    md += [f"GPU: {mach[0]['gpu']} (bf16 peak {mach[0]['peak_bf16_tflops']} TFLOPS), NVRTC {mach[0]['nvrtc']}", ""]
md += ["| model | batch x seq | bistro tok/s | MFU | torch tok/s | torch MFU | ratio | bistro mem GB | torch peak GB |", "|---|---|---|---|---|---|---|---|---|"]
for m in ["125m", "1b"]:
    b = [r for r in rows if r.get("what") == "train_step" and r.get("model") == m]
    t = [r for r in rows if r.get("impl", "").startswith("torch") and r.get("model") == m]
    if not b:
        md.append(f"| {m} | | (no result) | | | | | | |"); continue
    b = b[0]
    tt = statistics.median(r["tokens"] / r["wall_s"] for r in t) if t else float("nan")
    # Training FLOPs per token as gpu_bench reports them (the same model for torch).
    tm = tt * b["flops_per_token"] / (peak * 1e12)
    ratio = b["tokens_per_s"] / tt if t else float("nan")
    report["summary"][m] = {"bistro_tok_s": b["tokens_per_s"], "mfu": b["mfu"], "torch_tok_s": tt, "torch_mfu": tm, "ratio": ratio}
    md.append(f"| {m} | {b['batch']}x{b['seq']} | {b['tokens_per_s']:.0f} | {b['mfu']:.1%} | {tt:.0f} | {tm:.1%} | {ratio:.2f} | {b['device_mem_in_use_gb']:.1f} | {t[0].get('peak_mem_gb', float('nan')) if t else float('nan')} |")
for r in rows:
    if r.get("what") == "diff_norm":
        md += ["", f"Gradient-difference norm, {r['miners']} miners x {r['params']} params: kernel reads {r['kernel_read_gb_per_s']} GB/s, device-to-device copy {r['d2d_copy_gb_per_s']} GB/s (read + write), ratio {r['ratio']:.2f}."]
    if r.get("what") == "validator":
        md += ["", f"Validator ({r.get('dtype', 'bf16')}{', the numeric contract' if r.get('contract') else ', not the contract: bf16 gradients land above the honest tolerance'}): one 1b miner costs {r['recompute_s']:.3f} s (forward+backward on its batch) + {r['norm_s']*1e3:.2f} ms (norm): {r['miners_per_24s_window']:.1f} miners per 24 s window, {r.get('miners_per_36s_window', 0):.1f} per 36 s window."]
prec = [r for r in rows if r.get("what") == "honest_e_max"]
if prec:
    p = prec[0]
    report["summary"]["honest_e_max"] = p
    md += ["", f"Honest `e` against the CPU f32 validator ({p['model']}, {p['windows']} windows, largest seen): "
           + ", ".join(f"{k} {v:.2e}" for k, v in p.items() if k not in ("what", "model", "windows"))
           + " (tolerance 0.002)."]
json.dump(report, open(f"{out}/report.json", "w"), indent=1)
open(f"{out}/report.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
