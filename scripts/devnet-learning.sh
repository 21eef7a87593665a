#!/usr/bin/env bash
# The devnet's learning table under protocol v4 (issue 28): `tiny`, 4 honest miners, one
# validator, 384 windows on the learning lab's page seed (`devnet`) and its held-out set (32
# pages), the lab's D1 schedule (public AdamW, lr 1e-2 after 5 windows of warm-up, then
# constant). Writes docs/devnet-runs/learning-v4.{json,svg,txt}; compare its final held-out
# loss with the lab's D1 (6.3272) and R0 AdamW (5.6262) in docs/learning/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS="${WINDOWS:-384}"
mkdir -p .bistro
cat > .bistro/learning-v4.toml <<'TOML'
network = "devnet"
model = "tiny"
genesis_seed = 0
dataset = "embedded"
tokenizer = "embedded"
blocks_per_window = 3
pages_per_window = 2
rows_per_page = 2
seq_len = 128
compression = 24
code_bits = 2
code_tolerance_bins = 0.001
learning_rate = 0.01
min_learning_rate = 0.01
warmup_windows = 5
decay_windows = 20000
adam_beta1 = 0.9
adam_beta2 = 0.95
adam_eps = 1e-8
weight_decay = 0.1
outlier_norm_factor = 3.0
norm_history_windows = 8
max_slice_bytes = 268435456
upload_grace_secs = 2
windows_per_weights = 2
ema_alpha = 0.5
temperature = 10.0
honest_tolerance = 0.002
max_history = 10
collect_budget_ms = 1000
verify_budget_ms = 3000
aggregate_wait_ms = 7000
fallback_wait_ms = 2000
min_include_ema = 0.3
penalty_windows = 10
max_window_tokens = 4096

[aggregation]
rule = "mean"
TOML
cargo run --release --example devnet -- --miners 4 --validators 1 --windows "$WINDOWS" \
  --hparams .bistro/learning-v4.toml --heldout-pages 32 --dir .bistro/devnet-learning \
  --report docs/devnet-runs/learning-v4.json --plot docs/devnet-runs/learning-v4.svg \
  | tee docs/devnet-runs/learning-v4.txt
