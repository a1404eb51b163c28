#!/usr/bin/env bash
# Everything worth measuring on one H100/H200, in one call of <= 8 minutes (issue 16), one JSON of results.
#   bash bench/gpu_suite.sh OUT_DIR          -> OUT_DIR/gpu_suite.json (+ each stage's log and JSON)
#   TINY=1 bash bench/gpu_suite.sh OUT_DIR   -> the same stages on tiny models on the CPU (a smoke test)
#   SKIP_TOY=1 leaves out stage 5 (the test suite runs TINY=1 SKIP_TOY=1)
# Stages (each under its own timeout, so one failure or overrun keeps the others' results):
#   1. sd35m:            the paper's iteration (SOLACE on Flow-GRPO) on an SD3.5-Medium-sized random MMDiT,
#                        512 px, G=16, T=10, CFG 7, K=8: seconds, peak memory, TFLOP/s per stage (2 iterations)
#   2. sd35m_encoders:   the same with CLIP-L + CLIP-G + T5-XXL of SD3.5's sizes resident on the GPU (1 iteration)
#   3. sd35m_offloaded:  the same, text encoders moved to the CPU after encoding (model.offload_text_encoders)
#   4. flux_memory:      a FLUX.1-dev-sized transformer: weights, sampling / reward / training peaks
#   5. toy_runs:         the toy world's NFT verifiable preset and SOLACE main job, 1 minute each, side by side
set -u
OUT=${1:-runs/gpu_suite}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
if [ "${TINY:-0}" = 1 ]; then
    SMALL=(--tiny --iters 1 --group-size 2 --steps 2 --probes 2 --train-batch 2); FLUX=(--tiny); DEV=cpu
    TOY_MIN=0.1; T_MODEL=300; T_TOY=300
    TOY_EXTRA="sampling.prompts_per_step=1 sampling.group_size=2 sampling.batch_size=2 grpo.micro_batch_size=2 nft.micro_batch_size=2"
    TOY_EXTRA="$TOY_EXTRA sampling.eval_num_steps=2 data.eval_prompts_limit=1 train.eval_samples_per_prompt=1"
else
    SMALL=(); FLUX=(); DEV=cuda; TOY_MIN=1; T_MODEL=150; T_TOY=150; TOY_EXTRA=""
fi
stage() {  # name timeout command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" > "$OUT/$name.status.json"
    echo "$name: exit $rc in $((SECONDS - t0)) s"
}
stage sd35m "$T_MODEL" $PY "$HERE/gpu_check.py" "${SMALL[@]}" --json "$OUT/sd35m.json"
stage sd35m_encoders "$T_MODEL" $PY "$HERE/gpu_check.py" "${SMALL[@]}" --iters 1 --text-encoders \
    --json "$OUT/sd35m_encoders.json"
stage sd35m_offloaded "$T_MODEL" $PY "$HERE/gpu_check.py" "${SMALL[@]}" --iters 1 --text-encoders \
    --offload-text-encoders cpu --json "$OUT/sd35m_offloaded.json"
stage flux_memory "$T_MODEL" $PY "$HERE/flux_memory.py" "${FLUX[@]}" --json "$OUT/flux_memory.json"
toy() {  # name preset
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 $PY -m solace train --config "$2" train.device=$DEV train.seed=0 \
        train.max_minutes=$TOY_MIN train.iterations=100000 train.output_dir="$OUT/$1" train.checkpoint_every=1000 \
        train.image_every=0 train.threads=2 $TOY_EXTRA > "$OUT/$1.log" 2>&1
}
export -f toy; export OUT DEV TOY_MIN PY TOY_EXTRA
[ "${SKIP_TOY:-0}" = 1 ] || stage toy_runs "$T_TOY" bash -c "toy toy_nft_verifiable toy_nft_verifiable & toy toy_main toy & wait"
$PY "$HERE/gpu_suite_collect.py" "$OUT"
