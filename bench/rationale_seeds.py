"""Mean ± std over seeds of `solace analyze rationale` outputs (RESULTS.md, Fig. 6).

    for s in 0 1 2; do solace analyze rationale --prompts bench/data/heldout_2_per_category.jsonl \
        --samples 16 --seed $s --out bench/results/rationale_toy_base_seed$s; done
    python bench/rationale_seeds.py bench/results/rationale_toy_base_seed{0,1,2}
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(folders: list[str]) -> None:
    docs = [json.load(open(f"{f}/rationale.json")) for f in folders]
    print(f"{len(docs)} seeds: {[d['settings']['seed'] for d in docs]}")
    print("| regime | mean R | strict accuracy | within-group AUC of R |")
    print("|---|---:|---:|---:|")
    for regime in docs[0]["regimes"]:
        rows = [d["regimes"][regime] for d in docs]

        def ms(key: str, rows: list[dict] = rows) -> str:
            xs = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if len(xs) > 1 else f"{xs.mean():.3f}"

        print(f"| {regime} | {ms('R_mean')} | {ms('strict_accuracy')} | {ms('auc')} |")
    # the regime ordering of mean R within each seed
    for d in docs:
        order = sorted(d["regimes"], key=lambda k: -d["regimes"][k]["R_mean"])
        print(f"seed {d['settings']['seed']}: mean R highest to lowest: {' > '.join(order)}")


if __name__ == "__main__":
    main(sys.argv[1:])
