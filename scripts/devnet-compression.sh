#!/usr/bin/env bash
# The README's compression study: 4 honest miners and 1 validator, `tiny` model, 50 windows,
# at compression 1, 4, 16 and 300. Writes docs/devnet-runs/compression-<c>.{json,svg,txt}
# (the committed ones were measured under protocol v1's SGD rule; this reruns them under v4).
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS="${WINDOWS:-50}"
for c in 1 4 16 300; do
  cargo run --release --example devnet -- --miners 4 --validators 1 --windows "$WINDOWS" \
    --compression "$c" --dir ".bistro/devnet-c$c" \
    --report "docs/devnet-runs/compression-$c.json" --plot "docs/devnet-runs/compression-$c.svg" \
    | tee "docs/devnet-runs/compression-$c.txt"
done
