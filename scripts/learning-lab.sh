#!/usr/bin/env bash
# The learning lab (docs/learning/): every arm on two page seeds, then the tables, the
# curves and the choice. One arm takes 3-8 minutes on two cores (`tiny`, 384 windows).
#
#   scripts/learning-lab.sh                 # everything (about 1.5 hours per page seed on 2 cores)
#   ARMS="r0:lr=3e-3 d2:h=32,bits=2" NETWORKS=devnet scripts/learning-lab.sh
#
# Reports go to docs/learning/runs/<network>--<arm>.json; an existing report is kept
# (delete it to rerun that arm). WINDOWS overrides the 384 windows; LR is the inner AdamW
# learning rate of D2/D3 where the arm names none.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/bistro/target}"
# SKIP_BUILD=1 uses the binary already built (e.g. while another build holds the target dir).
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p bistro-examples --example learning
BIN="$CARGO_TARGET_DIR/release/examples/learning"
RUNS="${RUNS:-docs/learning/runs}"
WINDOWS="${WINDOWS:-384}"
NETWORKS="${NETWORKS:-devnet devnet-b}"
# The inner AdamW learning rate of D2/D3 where the arm names none (3e-3: the best R0 rate at
# 128 windows, used by the probes; arms that name lr=1e-3 use R0's best at 384).
LR="${LR:-3e-3}"
# Every arm of docs/learning/ (the eps probes of the README are 16-window runs by hand).
DEFAULT_ARMS="r0:lr=3e-4 r0:lr=1e-3 r0:lr=3e-3 r0:lr=1e-2 r1 r2
  d1:bits=2,lr=3e-3 d1:bits=2,lr=1e-2 d1:bits=2,lr=3e-2 d1:bits=1,lr=1e-2
  d2:h=32,bits=2 d2:h=32,bits=2,lr=1e-3 d2:h=32,bits=2,lr=1e-3,eps=1e-5 d2:h=48,bits=4
  d2:h=48,bits=4,lr=1e-3,eps=1e-5 d2:h=16,bits=1 d2:h=8,bits=2 d2:h=32,bits=0
  d2:h=32,bits=2,keep=1 d3:h=8,bits=2,e=8 d3:h=8,bits=2,e=0"
ARMS="${ARMS:-$DEFAULT_ARMS}"
mkdir -p "$RUNS"
for net in $NETWORKS; do
  for arm in $ARMS; do
    out="$RUNS/$net--${arm//[:=,]/_}.json"
    if [ -s "$out" ]; then echo "keep $out"; continue; fi
    verify=()
    case "$arm" in d1*|d2*|d3*) verify=(--verify) ;; esac
    "$BIN" run --arm "$arm" --lr "$LR" --network "$net" --windows "$WINDOWS" "${verify[@]}" --out "$out" >/dev/null
  done
done
"$BIN" report "$RUNS" --out docs/learning
