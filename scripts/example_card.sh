#!/usr/bin/env bash
# Renders cards/example.md: the model card `hf-relearn push` would upload for a small real run (a 3-layer GPT-2 on
# Tiny Shakespeare, decoder.1 reset and re-learned). Offline, about 10 minutes on 2 CPU cores.
# The base is trained until converged and every held-out row is evaluated, so the card carries no warning.
# Usage: scripts/example_card.sh [WORK_DIR]   (default: a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
data=../shared/data/tinyshakespeare.txt
[ -f "$data" ] || { echo "needs $data (Tiny Shakespeare)" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
hf-relearn pretrain --model gpt2 --config_overrides n_layer=3,n_embd=32,n_head=2,n_positions=64 \
    --train_file "$data" --block_size 64 --until_converged --max_steps 20000 --eval_steps 100 \
    --per_device_train_batch_size 16 --learning_rate 3e-3 --output_dir "$work/base" --report_to none
hf-relearn relearn --model "$work/base" --original_run "$work/base" --block decoder.1 \
    --max_steps 3000 --eval_steps 25 --learning_rate 3e-3 --output_dir "$work/relearn-d1" --report_to none
hf-relearn card "$work/relearn-d1" --repo-id your-name/gpt2-tinyshakespeare-relearn-decoder.1 -o cards/example.md
# the card names the run's local folders; show them as the folders the commands above name
sed -i "s#$work/#runs/#g" cards/example.md
