"""Is the GRPO gradient signal or noise? Cosine similarity of policy gradients from independent batches.

    python bench/grad_snr.py --config configs/toy_verifiable.yaml --batches 4 [key=value ...]

For ``--batches`` iterations of the trainer (same prompts, fresh noise: by default the two fixed prompts of
``bench/data/overfit_two.jsonl``), it collects a batch exactly as ``solace train`` does, and computes the
policy-loss gradient (the trained window, on-policy, no KL: the KL gradient is zero at the LoRA-off start) of
the LoRA weights, or with ``--full`` of every weight (what full fine-tuning would follow), with the batch's
real advantages and with the same advantages shuffled within the batch. If the gradient
carried signal, two independent batches would point the same way (positive cosine); with shuffled advantages
they point the same way only by chance. Prints the pairwise cosines, their means, and the norms, and writes
``bench/results/grad_snr_<tag>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from solace.sampling.rollout import Rollout
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

HERE = Path(__file__).parent


def policy_grad(tr: Trainer, b: Rollout, adv: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of the trainer's own Flow-GRPO loss (its update's ``loss``, every window step, the whole
    batch as one micro-batch) with the advantages ``adv``, summed over the window steps. The KL term adds
    nothing here: every batch is collected at the LoRA-off start, where the policy equals the reference."""
    batch = tr.updater.micro_batch(b, torch.arange(len(b)), 0, 0)
    batch["adv"] = adv.to(batch["adv"])
    total = [torch.zeros_like(p) for p in params]
    for term in range(tr.updater.terms()):
        loss, _ = tr.updater.loss(batch, term)
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                acc += g
    return torch.cat([g.flatten() for g in total])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy_verifiable.yaml")
    ap.add_argument("--prompts", default=str(HERE / "data" / "overfit_two.jsonl"))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tag", default="default")
    ap.add_argument("--json", type=Path, help="result file (bench/results/grad_snr_TAG.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--full", action="store_true", help="gradient of every weight (what full fine-tuning sees)"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(
        a.config,
        [
            "train.output_dir=runs/grad_snr", f"train.threads={a.threads}", "train.report=false",
            f"data.train_prompts={a.prompts}", *a.overrides,
        ],
    )  # fmt: skip
    tr = Trainer(cfg)
    params = tr.params
    if a.full:
        params = [p for p in tr.adapter.denoiser.parameters()]
        for p in params:
            p.requires_grad_(True)
    real, shuf, rows = [], [], []
    for it in range(a.batches):
        b = tr.collect(it)
        perm = torch.randperm(len(b), generator=torch.Generator().manual_seed(it))
        real.append(policy_grad(tr, b, b.advantages, params))
        shuf.append(policy_grad(tr, b, b.advantages[perm], params))
        rows.append({"reward_mean": b.stats["reward/mean"], "norm": float(real[-1].norm())})
        print(f"batch {it}: reward {rows[-1]['reward_mean']:.3f}, |grad| {rows[-1]['norm']:.3g}", flush=True)

    def cosines(gs: list[torch.Tensor]) -> list[float]:
        out = []
        for i, j in itertools.combinations(range(len(gs)), 2):
            d = gs[i].norm() * gs[j].norm()
            if d > 0:  # a batch whose groups all tie has no gradient
                out.append(float(gs[i] @ gs[j] / d))
        return out

    res = {
        "config": a.config,
        "overrides": a.overrides,
        "window": tr.ctx.window,
        "parameters": "all" if a.full else "lora",
        "batches": rows,
        "cos_real": cosines(real),
        "cos_shuffled": cosines(shuf),
    }
    for k in ("cos_real", "cos_shuffled"):
        v = res[k]
        res[k + "_mean"] = sum(v) / len(v) if v else None
    out = a.json or HERE / "results" / f"grad_snr_{a.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    real, shuffled = res["cos_real_mean"], res["cos_shuffled_mean"]
    print(f"window {tr.ctx.window}: mean cosine real {real}, shuffled {shuffled}")
    print("real pairs", [round(x, 3) for x in res["cos_real"]])
    print("shuffled pairs", [round(x, 3) for x in res["cos_shuffled"]])


if __name__ == "__main__":
    main()
