"""Subprocess of bench/reliability.py: a tiny toy run whose registered reward returns NaN or inf.

    python bench/reliability_nonfinite.py WEIGHTS OUT [overrides...]

Prints the samples dropped per iteration and whether the final LoRA is finite; exits as `solace train` does
(2 when the run stops on persistent non-finite values)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch  # noqa: E402
from trainer_helpers import tiny_overrides  # noqa: E402

from solace.errors import SolaceError  # noqa: E402
from solace.rewards.registry import register_reward  # noqa: E402
from solace.trainer.config import load_config  # noqa: E402
from solace.trainer.trainer import Trainer  # noqa: E402


@register_reward("test_nonfinite")
def _nonfinite(value: str = "nan", every: bool = False):
    def fn(images, prompts, metadata=None):
        r = images.float().flatten(1).std(1)
        if every:
            return torch.full_like(r, float(value))
        r[0] = float(value)
        return r

    return fn


def main() -> int:
    weights, out, *extra = sys.argv[1:]
    cfg = load_config("toy", tiny_overrides(weights, out) + extra)
    try:
        Trainer(cfg).train()
    except SolaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    with open(Path(out) / "log.csv") as f:
        dropped = [float(r["guard/dropped"]) for r in csv.DictReader(f)]
    lora = load_file(str(Path(out) / "lora" / "pytorch_lora_weights.safetensors"))
    finite = all(bool(torch.isfinite(v).all()) for v in lora.values())
    print(f"dropped per iteration {dropped}; final LoRA finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
