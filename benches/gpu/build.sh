#!/usr/bin/env bash
# Builds what benches/gpu/run.sh carries to a GPU machine (run here; no GPU needed):
# the release gpu_bench and precision binaries and the CUDA test binaries, into benches/gpu/bin/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/bistro/target}"
mkdir -p benches/gpu/bin
bash scripts/cuda-build.sh cargo build --release -p bistro-benches --features cuda --bin gpu_bench --bin precision
cp "$CARGO_TARGET_DIR/release/gpu_bench" "$CARGO_TARGET_DIR/release/precision" benches/gpu/bin/
# Test binaries: cargo prints their paths with --message-format=json.
bash scripts/cuda-build.sh cargo test --release --features cuda -p bistro-model --test cuda_ops -p bistro-kernels --test cuda \
    --no-run --message-format=json \
  | python3 -c '
import json, os, shutil, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        crate_dir = os.path.basename(os.path.dirname(m["manifest_path"]))
        dst = "benches/gpu/bin/test-" + crate_dir + "-" + m["target"]["name"]
        shutil.copy(m["executable"], dst); print("copied", dst)
'
ls -la benches/gpu/bin
