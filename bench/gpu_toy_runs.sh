#!/usr/bin/env bash
# The toy-world trainer at GPU throughput, in one call on one GPU (issue 4): Flow-GRPO with the exact
# evaluator as reward (configs/toy_verifiable.yaml), 3 seeds, beside SOLACE's paper reward and the random-reward
# control, all five runs side by side on the same GPU with the same wall-clock budget.
# Each run: 32 prompts x G=16 = 512 samples per iteration (the CPU preset: 2 x 16), lr 1e-3, otherwise the
# preset; training stops after MINUTES (train.max_minutes), then evaluates the 67 held-out prompts x 16
# samples (40 steps, CFG 7, the same noise as its evaluation of the base).
#   bash bench/gpu_toy_runs.sh OUTDIR        (MINUTES, PROMPTS, DEVICE, EVAL_SAMPLES override; see below)
set -u
OUT_DIR=${1:-runs/gpu}
MINUTES=${MINUTES:-5}
PROMPTS=${PROMPTS:-32}
DEVICE=${DEVICE:-cuda}
EVAL_SAMPLES=${EVAL_SAMPLES:-16}
EVAL_LIMIT=${EVAL_LIMIT:-0}
ITERS=${ITERS:-100000}
BS=$((PROMPTS * 16))
mkdir -p "$OUT_DIR"
common=(sampling.prompts_per_step=$PROMPTS sampling.batch_size=$BS train.micro_batch_size=$BS
        reward.self_confidence.max_batch=1280 optim.lr=1e-3 train.iterations=$ITERS train.max_minutes=$MINUTES
        eval.every=25 eval.samples_per_prompt=$EVAL_SAMPLES eval.prompts_limit=$EVAL_LIMIT
        eval.image_every=25 train.checkpoint_every=25 train.threads=2 train.device=$DEVICE)
run() {  # name preset seed [extra overrides]
    local name=$1 preset=$2 seed=$3; shift 3
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 python -m solace train --config "$preset" "${common[@]}" \
        train.seed=$seed train.output_dir="$OUT_DIR/$name" "$@" > "$OUT_DIR/$name.log" 2>&1
    echo "$name exit $?"
}
run verifiable_s0 toy_verifiable 0 &
run verifiable_s1 toy_verifiable 1 &
run verifiable_s2 toy_verifiable 2 &
run solace_paper_s0 toy 0 &
run random_control_s0 toy 0 "reward.components=[{name: random, weight: 1.0}]" &
wait
python - "$OUT_DIR" <<'PY'
import json, sys, csv
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    ev = json.loads((run / "evals.json").read_text()) if (run / "evals.json").exists() else None
    hist = list(csv.DictReader(open(run / "log.csv"))) if (run / "log.csv").exists() else []
    mon = json.loads((run / "monitor.json").read_text()) if (run / "monitor.json").exists() else {}
    rows[run.name] = {"iterations": len(hist), "evals": ev, "monitor": mon.get("verdict"),
                      "reward_first5": [float(h["reward/mean"]) for h in hist[:5]],
                      "reward_last5": [float(h["reward/mean"]) for h in hist[-5:]],
                      "sec_per_it": sorted(float(h["time/sampling"]) + float(h["time/reward"]) + float(h["time/update"]) for h in hist)[len(hist)//2] if hist else None}
(out / "summary.json").write_text(json.dumps(rows, indent=1))
for k, v in rows.items():
    e = v["evals"] or []
    print(k, "its", v["iterations"], "s/it", v["sec_per_it"], "monitor", v["monitor"],
          "strict", [(x["iteration"], round(x["strict"], 3)) for x in e],
          "lenient", [round(x["lenient"], 3) for x in e])
PY
