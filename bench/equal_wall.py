"""The velocity drift of each run of the equal-wall-clock comparison: how far each update moved
the model from the base, measured the same way for both.

    solace ablate --experiment bench/experiments/equal_wall.yaml --conditions nft &
    solace ablate --experiment bench/experiments/equal_wall.yaml --conditions flow_grpo
    solace ablate --experiment bench/experiments/equal_wall.yaml --collect-only     # the budget table
    python bench/equal_wall.py runs/equal_wall                                       # this column

For every finished run ``OUT/<condition>/seed<S>`` (its ``lora``): the mean squared velocity difference
E||v_lora - v_base||^2 on the same inputs for both updates (x_t = (1 - t) x0 + t eps, x0 the base's own
samples for the training-distribution prompts, 20-step ODE at CFG 3, t on the 10-step grid, conditional
velocity; Flow-GRPO's logged SDE KL has no NFT counterpart with an ODE sampler). Prints a table and writes
``OUT/velocity_drift.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from solace.models.base import adapters_disabled
from solace.models.lora import load_lora
from solace.sampling.generate import generate
from solace.toy.evaluate import eval_records
from solace.trainer.config import load_config
from solace.trainer.model_setup import load_model


@torch.no_grad()
def velocity_drift(run: Path, seed: int, samples: int = 2, steps: int = 10) -> float:
    """E||v_lora(x_t, t, c) - v_base(x_t, t, c)||^2 (mean over elements) on the training-distribution
    prompts, x0 the base's 20-step ODE samples at CFG 3, t each of the ``steps``-step grid's timesteps; the
    run's model (its ``config.yaml``) with its LoRA."""
    ad = load_model(load_config(str(run / "config.yaml")).model, "cpu")
    load_lora(ad.denoiser, str(run / "lora"), trainable=False)
    ad.denoiser.eval()
    prompts = [r.prompt for r in eval_records("toy_train_eval")]
    with adapters_disabled(ad.denoiser):
        # decoded images (clamped to [0, 1]) back to the model's latent range
        x0 = ad.encode_images(generate(ad, prompts, samples, 20, 3.0, seed + 4242, 64, progress=False))
    cond = ad.encode_prompts([p for p in prompts for _ in range(samples)])
    g = torch.Generator().manual_seed(seed + 4243)
    total, n = 0.0, 0
    for t in ad.sigmas(steps)[:-1].tolist():
        eps = torch.randn(x0.shape, generator=g)
        tt = torch.full((x0.shape[0],), t)
        x_t = (1 - t) * x0 + t * eps
        v = ad.velocity(x_t, tt, cond)
        with adapters_disabled(ad.denoiser):
            v0 = ad.velocity(x_t, tt, cond)
        total += float((v - v0).square().mean())
        n += 1
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/equal_wall"), help="the grid's folder")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for done in sorted(a.out.glob("*/seed*/ablate_run.json")):
        rec = json.loads(done.read_text())
        drift = velocity_drift(done.parent, rec["seed"])
        rows.append({"condition": rec["condition"], "seed": rec["seed"], "velocity_drift": drift})
    lines = ["| seed | condition | velocity drift E‖Δv‖² |", "|---|---|---|"]
    lines += [f"| {r['seed']} | {r['condition']} | {r['velocity_drift']:.2e} |" for r in rows]
    (a.out / "velocity_drift.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
