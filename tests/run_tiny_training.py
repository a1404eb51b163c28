"""Subprocess entry for trainer tests: ``python run_tiny_training.py WEIGHTS OUT MODE [overrides...]``.

MODE ``train`` runs training (``--resume`` semantics when the output folder has a checkpoint and
``resume=1`` is passed); MODE ``advantages`` runs one collect() and writes the gathered advantages and
rewards of iteration 0 to ``OUT/advantages_rank{r}.json`` (used for the 1- vs 2-process test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from trainer_helpers import tiny_overrides  # noqa: E402

from solace.trainer.config import load_config  # noqa: E402
from solace.trainer.distributed import finish  # noqa: E402
from solace.trainer.trainer import Trainer  # noqa: E402


def main() -> None:
    weights, out, mode, *rest = sys.argv[1:]
    resume = "resume=1" in rest
    rest = [r for r in rest if r != "resume=1"]
    cfg = load_config("toy", tiny_overrides(weights, out) + rest)
    if mode == "train":
        from solace.trainer.signals import RunInterrupted

        try:
            Trainer(cfg).train(resume=resume)
        except RunInterrupted as e:  # what `solace train` does: the message, the signal's exit code
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            finish()
            sys.exit(e.exit_code)
        return finish()
    tr = Trainer(cfg)
    ro = tr.collect(0)
    adv = tr.scoring.gather(ro.advantages.contiguous())
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"advantages_rank{tr.rank}.json").write_text(
        json.dumps(
            {
                "world": tr.acc.num_processes,
                "adv": adv.tolist(),
                "reward": ro.stats["reward/mean"],
                "final_latents_sum": float(tr.scoring.gather(ro.z0.sum((1, 2, 3)).contiguous()).sum()),
            }
        )
    )
    finish()


if __name__ == "__main__":
    main()
