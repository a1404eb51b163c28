#!/usr/bin/env bash
# Everything worth measuring on one H100/H200 in one call, one JSON of results.
#   bash bench/gpu_suite.sh OUT_DIR          -> OUT_DIR/gpu_suite.json (+ each stage's log and JSON)
#   TINY=1 bash bench/gpu_suite.sh OUT_DIR   -> the same stages on tiny models on the CPU (a smoke test)
#   SKIP_TOY=1 leaves out stage 6 (the test suite runs TINY=1 SKIP_TOY=1); PIPE=DIR keeps the pipeline folder
# Time: every stage runs under its own timeout (one failure or overrun keeps the others' results), and the
# timeouts add up to 540 s at most (checked below, before anything runs): the whole suite fits in 9 minutes.
# Stages (timeout):
#   1. build (75 s):           a random-weight SD3.5-Medium-sized pipeline folder, bf16 (bench/sd3_pipeline.py:
#                              the 2.243 B MMDiT, CLIP-L, CLIP-G, T5-XXL, the VAE), written once
#   2. sd35m (165 s):          `solace train`'s own Trainer on it (bench/gpu_check.py): the sd35m preset, one group
#                              of G=16, T=10, CFG 7, K=8, 512 px, T5 not loaded (model.text_encoder_3=false: its
#                              tokens are zeros, the same 333 text tokens); 2 iterations, the first a warm-up:
#                              the trainer's stage timers, synchronised seconds, peak memory, rows, FLOPs, MFU
#   3. sd35m_encoders (75 s):  the same with T5-XXL loaded, every encoder resident on the GPU (1 iteration, G=8:
#                              the peaks depend on the batch sizes, not on G)
#   4. sd35m_offloaded (75 s): the same, text encoders moved to the CPU after encoding (model.offload_text_encoders)
#   5. flux_memory (75 s):     a FLUX.1-dev-sized transformer: weights, sampling / reward / training peaks
#                              (bench/flux_memory.py: the adapter's forwards, not the trainer)
#   6. toy_runs (75 s):        the toy world's NFT verifiable preset and SOLACE main job, 30 s each, side by side
set -u
OUT=${1:-runs/gpu_suite}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
PIPE=${PIPE:-$OUT/pipeline}
T_BUILD=75; T_SD35M=165; T_VARIANT=75; T_FLUX=75; T_TOY=75
TOTAL=$((T_BUILD + T_SD35M + 2 * T_VARIANT + T_FLUX + T_TOY))
echo "stage timeouts: $TOTAL s in all (limit 540 s)"
[ "$TOTAL" -le 540 ] || { echo "the stage timeouts add up to more than 540 s" >&2; exit 1; }
if [ "${TINY:-0}" = 1 ]; then
    BUILD=(--size tiny --dtype fp32 --device cpu); SMALL=(--tiny); FLUX=(--tiny); DEV=cpu; VARIANT=(); TOY_MIN=0.1
    TOY_EXTRA="sampling.prompts_per_step=1 sampling.group_size=2 sampling.batch_size=2 train.micro_batch_size=2"
    TOY_EXTRA="$TOY_EXTRA eval.num_steps=2 eval.prompts_limit=1 eval.samples_per_prompt=1"
else
    BUILD=(--size sd35m --dtype bf16); SMALL=(); FLUX=(); DEV=cuda; VARIANT=(sampling.group_size=8); TOY_MIN=0.5
    TOY_EXTRA=""
fi
stage() {  # name timeout command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout\": $limit}" > "$OUT/$name.status.json"
    echo "$name: exit $rc in $((SECONDS - t0)) s (timeout $limit s)"
}
check() {  # name timeout gpu_check arguments...
    local name=$1 limit=$2; shift 2
    stage "$name" "$limit" $PY "$HERE/gpu_check.py" "${SMALL[@]}" --pipeline "$PIPE" --out "$OUT/$name" \
        --json "$OUT/$name.json" "$@"
}
stage build "$T_BUILD" $PY "$HERE/sd3_pipeline.py" "$PIPE" "${BUILD[@]}"
check sd35m "$T_SD35M" --no-t5 --iters 2
check sd35m_encoders "$T_VARIANT" --iters 1 "${VARIANT[@]}"
check sd35m_offloaded "$T_VARIANT" --iters 1 --offload-text-encoders cpu "${VARIANT[@]}"
stage flux_memory "$T_FLUX" $PY "$HERE/flux_memory.py" "${FLUX[@]}" --json "$OUT/flux_memory.json"
toy() {  # name preset
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 $PY -m solace train --config "$2" train.device=$DEV train.seed=0 \
        train.max_minutes=$TOY_MIN train.iterations=100000 train.output_dir="$OUT/$1" train.checkpoint_every=1000 \
        eval.image_every=0 train.threads=2 $TOY_EXTRA > "$OUT/$1.log" 2>&1
}
export -f toy; export OUT DEV TOY_MIN PY TOY_EXTRA
[ "${SKIP_TOY:-0}" = 1 ] || stage toy_runs "$T_TOY" bash -c "toy toy_nft_verifiable toy_nft_verifiable & toy toy_main toy & wait"
$PY "$HERE/gpu_suite_collect.py" "$OUT"
