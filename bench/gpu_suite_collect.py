"""Gather ``bench/gpu_suite.sh``'s stage outputs into one ``gpu_suite.json`` and print a summary.

python bench/gpu_suite_collect.py OUT_DIR
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

MODEL_STAGES = ("sd35m", "sd35m_encoders", "sd35m_offloaded", "flux_memory")
TRAINER_STAGES = (
    "sd35m",
    "sd35m_encoders",
    "sd35m_offloaded",
)  # bench/gpu_check.py: the trainer's iterations
TOY_RUNS = ("toy_nft_verifiable", "toy_main")


def read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def toy_run(folder: Path) -> dict:
    """Iterations done, median seconds per logged ``time/*`` column, evaluations (strict) of one toy run."""
    try:
        with open(folder / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {"iterations": 0}
    times = {
        k: statistics.median(float(r[k]) for r in rows if r.get(k) not in (None, ""))
        for k in (rows[0] if rows else {})
        if k.startswith("time/")
    }
    evals = read_json(folder / "evals.json") or []
    return {
        "iterations": len(rows),
        "median_seconds": times,
        "evals_strict": [(e.get("iteration"), e.get("strict")) for e in evals if isinstance(e, dict)],
    }


def collect(out: Path) -> dict:
    res: dict = {"stages": {}}
    for name in ("build", *MODEL_STAGES, "toy_runs"):
        res["stages"][name] = {"status": read_json(out / f"{name}.status.json")}
        if name in MODEL_STAGES:
            res["stages"][name]["result"] = read_json(out / f"{name}.json")
    res["stages"]["toy_runs"]["runs"] = {r: toy_run(out / r) for r in TOY_RUNS}
    return res


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_suite")
    res = collect(out)
    (out / "gpu_suite.json").write_text(json.dumps(res, indent=2))
    for name, st in res["stages"].items():
        status = st["status"] or {}
        line = f"{name}: rc {status.get('rc')} in {status.get('seconds')} s"
        r = st.get("result") or {}
        if r.get("iterations"):
            last = r["iterations"][-1]
            stages = last["stages"]
            line += f"; iteration {last['seconds']:.1f} s (" + ", ".join(
                f"{k} {v['seconds']:.1f} s" + (f" MFU {v['mfu']:.1%}" if v.get("mfu") is not None else "")
                for k, v in stages.items()
            )
            line += f"), peak {max(v['peak_gib'] for v in stages.values()):.1f} GiB"
        if name in TRAINER_STAGES and r.get("allocated_gib_after_setup") is not None:
            line += f"; allocated after setup {r['allocated_gib_after_setup']:.1f} GiB"
        if "train" in r:
            line += f"; FLUX weights {r['weights_gib']:.1f} GiB, train peak {r['train']['peak_gib']:.1f} GiB"
        print(line)
    for run, v in res["stages"]["toy_runs"]["runs"].items():
        print(f"  {run}: {v['iterations']} iterations, {v.get('median_seconds', {})}")
    print(f"wrote {out / 'gpu_suite.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
