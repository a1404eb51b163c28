"""Train a toy preset over several seeds and measure held-out accuracy before/after (issue 4's proofs).

    python bench/toy_training.py --config configs/toy_verifiable.yaml --seeds 0,1,2 --name verifiable
    python bench/toy_training.py --config configs/toy.yaml --seeds 0,1,2 --name solace_paper

Each seed runs ``solace train`` (in a subprocess, so timings are the CLI's own) into
``runs/bench/<name>/seed<k>``, then the final LoRA and the base are evaluated on the whole held-out set
(67 prompts x ``--samples``, ``--steps`` steps, CFG ``--cfg``, ODE sampler) with the *same* initial noise, so
before/after differences are paired. The base is evaluated once per settings and cached. Writes
``bench/results/toy_training_<name>.json`` and prints a Markdown table (per category strict, overall
strict/lenient, foreground fraction, training wall time, the collapse monitor's verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from solace.models.lora import load_lora
from solace.toy.adapter import ToyAdapter
from solace.toy.evaluate import evaluate_records
from solace.toy.evaluate import foreground as toy_foreground
from solace.toy.world import CATEGORIES, load_heldout

RESULTS = Path(__file__).parent / "results"


def run_trainer(cmd: list[str], run: Path, **popen: object) -> None:
    """Run ``solace train`` (``cmd``) into ``run`` and wait. SIGTERM to this script reaches the trainer, which
    stops after its iteration with a checkpoint; Ctrl-C reaches it from the terminal already (same process
    group), so here it only keeps this script waiting. A trainer that fails or stops ends the script."""
    child = subprocess.Popen(cmd, **popen)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
    }
    try:
        rc = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if rc:
        sys.exit(f"solace train exited with code {rc} ({run}); rerun the same command to continue it")


def evaluate(lora: str | None, samples: int, steps: int, cfg: float, seed: int) -> dict:
    adapter = ToyAdapter()
    if lora:
        load_lora(adapter.denoiser, lora, trainable=False)
    adapter.denoiser.eval()
    res = evaluate_records(
        adapter, list(load_heldout()), samples, steps, cfg, seed, progress=True, keep_images=True
    )
    imgs = res.pop("images")
    fg, nobj = toy_foreground(torch.as_tensor(imgs))
    summ = res["summary"]
    return {
        "strict": summ["overall"]["strict"],
        "lenient": summ["overall"]["lenient"],
        "categories": {c: summ["categories"][c]["strict"] for c in CATEGORIES},
        "categories_lenient": {c: summ["categories"][c]["lenient"] for c in CATEGORIES},
        "foreground": float(fg.mean()),
        "objects": float(nobj.float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--eval-seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true", help="only evaluate existing runs")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every seed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base_key = f"toy_base_eval_s{a.samples}_t{a.steps}_c{a.cfg}_seed{a.eval_seed}.json"
    base_path = RESULTS / base_key
    if base_path.exists():
        base = json.loads(base_path.read_text())
    else:
        base = evaluate(None, a.samples, a.steps, a.cfg, a.eval_seed)
        base_path.write_text(json.dumps(base, indent=1))
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        out = Path("runs/bench") / a.name / f"seed{seed}"
        wall = None
        if not a.skip_train:
            cmd = [
                sys.executable, "-m", "solace.cli.main", "train", "--config", a.config,
                f"train.seed={seed}", f"train.output_dir={out}", f"train.threads={a.threads}",
                "train.report=false", *a.overrides,
            ]  # fmt: skip
            print(" ".join(cmd), flush=True)
            t0 = time.perf_counter()
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
            run_trainer(cmd, out, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
        ev = evaluate(str(out / "lora"), a.samples, a.steps, a.cfg, a.eval_seed)
        log = (out / "log.csv").read_text().splitlines()
        ev.update(seed=seed, wall_s=wall, iterations=len(log) - 1, output_dir=str(out))
        verdict = (out / "monitor.json").read_text() if (out / "monitor.json").exists() else None
        ev["monitor"] = json.loads(verdict) if verdict else None
        rows.append(ev)
        print(f"seed {seed}: strict {base['strict']:.3f} -> {ev['strict']:.3f}", flush=True)
    res = {"config": a.config, "overrides": a.overrides, "settings": vars(a), "base": base, "runs": rows}
    (RESULTS / f"toy_training_{a.name}.json").write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    base, runs = res["base"], res["runs"]
    head = "| | base | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean change |"
    lines = [head, "|---" * (len(runs) + 3) + "|"]

    def row(label: str, b: float, vals: list[float]) -> str:
        d = sum(v - b for v in vals) / len(vals)
        return f"| {label} | {b:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {d:+.3f} |"

    for c in CATEGORIES:
        lines.append(row(c, base["categories"][c], [r["categories"][c] for r in runs]))
    lines.append(row("**overall strict**", base["strict"], [r["strict"] for r in runs]))
    lines.append(row("overall lenient", base["lenient"], [r["lenient"] for r in runs]))
    lines.append(row("foreground fraction", base["foreground"], [r["foreground"] for r in runs]))
    lines.append(row("objects per image", base["objects"], [r["objects"] for r in runs]))
    walls = [r["wall_s"] for r in runs]
    if all(w is not None for w in walls):
        lines.append("| training wall time (s) | | " + " | ".join(f"{w:.0f}" for w in walls) + " | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
