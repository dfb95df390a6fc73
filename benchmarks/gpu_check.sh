#!/usr/bin/env bash
# Benchmark hf-relearn on your GPU in one run of about 10 minutes: the per-step speed of a relearn against full
# training, the frozen-prefix cache against a plain Trainer on GPT-2 small, and one short relearn per GPU setting the
# cache must survive (bf16 + torch.compile + SDPA, FlashAttention-2, FSDP2 and DeepSpeed ZeRO-3 with one process).
# Every step has its own time limit and writes into $OUT (default /tmp/gpu-check), so one that fails or hangs costs
# only its own minutes; summary.txt lists each step's exit code and time.
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU at tiny sizes: checks the script itself
#   bash benchmarks/gpu_check.sh --prepare    # for a GPU machine without network: .gpu/ gets the corpus and the
#                                             # wheels it may lack; copy .gpu/ along with the checkout
set -uo pipefail
cd "$(dirname "$0")/.."

GPU_DIR=.gpu
# wheels a CUDA image with torch, accelerate and peft may lack (installed from .gpu/ when present)
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6 transformers==5.25.0"

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    mkdir -p "$GPU_DIR/whl" && cp ../shared/data/tinyshakespeare.txt "$GPU_DIR/" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$GPU_DIR/whl" $WHEELS || exit 1
    # deepspeed publishes no wheel; its pure-Python build (ops compiled just in time) travels as one, with the two
    # packages it needs that the image lacks (pydantic with its own pins, hjson)
    python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed -w "$GPU_DIR/whl" &&
        python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$GPU_DIR/whl" pydantic hjson ||
        echo "deepspeed: no wheel built; the ZeRO-3 step will say so" >&2
    du -sh "$GPU_DIR"
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls "$GPU_DIR"/whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$GPU_DIR"/whl/*.whl >"$OUT/install.txt" 2>&1 || { echo "wheel install failed"; cat "$OUT/install.txt"; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HOME=$PWD/.hf_home HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DATA=$GPU_DIR/tinyshakespeare.txt
[ -f "$DATA" ] || DATA=../shared/data/tinyshakespeare.txt

step() {  # step NAME SECONDS COMMAND...: run one check under its own limit, its output in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   -> exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| transformers', transformers.__version__,
      '| accelerate', accelerate.__version__)"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ $DRY = 1 ]; then
    DEV=cpu STEP_SIZE="--n-layer 4 --n-embd 64 --batch 4 --seq 64 --rounds 2"
    SPEED_SIZE="--n-layer 4 --n-embd 64 --batch 4 --seq 64 --rounds 2 --chars 60000"
    BASE_STEPS=40
else
    DEV=cuda STEP_SIZE="--n-layer 12 --n-embd 768 --batch 16 --seq 512"
    SPEED_SIZE="--gpt2-small --batch 8 --seq 1024"
    BASE_STEPS=300
fi

# 1. per-step speed of a relearn against full training (docs/benchmarks.md, first table)
step step 120 $PY benchmarks/relearn_step.py --device $DEV $STEP_SIZE
# 2. the prefix cache against a plain Trainer, GPT-2 small (docs/benchmarks.md, second table)
step speed 180 $PY benchmarks/relearn_speed.py --device $DEV $SPEED_SIZE --json "$OUT/speed.json"
# 3. a small base on the real corpus, then one short relearn per GPU setting the cache must survive, and one under
#    each sharded launcher with one process (the sharded reset and fingerprint paths on a GPU, docs/distributed.md)
BASE=/tmp/gpu-check-base
step base 90 $PY -m hf_relearn pretrain --model gpt2 --config_overrides n_layer=4,n_embd=128,n_head=4,n_positions=128 \
    --train_file "$DATA" --block_size 128 --max_eval_samples 256 --max_steps $BASE_STEPS --eval_steps $((BASE_STEPS / 3)) \
    --per_device_train_batch_size 32 --learning_rate 1e-3 --output_dir $BASE
RELEARN=(-m hf_relearn relearn --model $BASE --original_run $BASE --block decoder.2 --max_steps 40 --eval_steps 20
    --per_device_train_batch_size 32 --learning_rate 1e-3)
if [ $DRY = 0 ]; then
    step relearn_bf16_compile_sdpa 120 $PY "${RELEARN[@]}" --prefix_cache true --bf16 --torch_compile \
        --attn_implementation sdpa --output_dir /tmp/gpu-check-r1
    # refused with transformers' reason where the image has no flash-attn: that is an answer too
    step relearn_flash2 60 $PY "${RELEARN[@]}" --prefix_cache true --bf16 --attn_implementation flash_attention_2 \
        --output_dir /tmp/gpu-check-r2
    for cfg in fsdp2 deepspeed-zero3; do
        step "sharded_$cfg" 120 accelerate launch --config_file hf_relearn/recipes/accelerate/$cfg.yaml \
            --num_processes 1 "${RELEARN[@]}" --output_dir /tmp/gpu-check-$cfg
    done
else
    step relearn_cpu 120 $PY "${RELEARN[@]}" --prefix_cache true --use_cpu --attn_implementation sdpa \
        --output_dir /tmp/gpu-check-r1
fi
for r in /tmp/gpu-check-r1 /tmp/gpu-check-r2 /tmp/gpu-check-fsdp2 /tmp/gpu-check-deepspeed-zero3; do
    [ -f $r/relearn_result.json ] && cp $r/relearn_result.json "$OUT/$(basename $r).json"
done
cat "$OUT/summary.txt"
