"""Subprocess entry: ``python run_ddp_matrix.py OUT WEIGHTS SD3 FLUX PROMPTS CLIP`` (one process) or the same
under ``torchrun --nproc_per_node 2`` (two gloo processes, DDP). Trains every model x update of :data:`PLAN`
(the tiny toy model, the tiny SD3 and FLUX pipelines saved in ``SD3`` / ``FLUX``; Flow-GRPO with
``grpo.beta=0`` and ``0.04``, NFT with ``nft.kl_beta=0``) for 2 iterations, with an evaluation and an image
grid after every iteration and the report at the end, into ``OUT/<model>_<update>``; one Trainer after
another in one process group, to keep the test short.

The toy and FLUX runs build their own Accelerator (the trainer's: its process-group timeout,
``train.process_group_timeout_minutes``, applies when the first one creates the group). The SD3 runs get a
plain ``Accelerator(cpu=True)``, whose DDP broadcasts buffers (torch's default): SD3 is the model with a
buffer (``pos_embed``), so they check that no forward the main process runs alone reaches DDP. Each run
folder gets ``ddp_rank{r}.json``: the world size, the process group's timeout, whether DDP broadcasts
buffers, and how many samples of the evaluations and of the image grids this process sampled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_pipelines import train_overrides  # noqa: E402
from trainer_helpers import TINY_NFT, tiny_overrides  # noqa: E402

from solace.trainer.config import load_config  # noqa: E402
from solace.trainer.distributed import finish  # noqa: E402
from solace.trainer.trainer import Trainer  # noqa: E402

# two logged self-confidence forms (premise): scored on every process's first group, never trained on
PREMISE = (
    "premise.components=[{name: self_confidence, label: paper}, "
    "{name: self_confidence, label: contrastive, kwargs: {contrastive: true}}]"
)
TIMEOUT_MINUTES = 7  # not torch's default (30): the test sees that the setting reached the process group
UPDATES = {
    "grpo0": {"grpo.beta": 0.0},
    "grpo004": {"grpo.beta": 0.04},
    "nft0": {**TINY_NFT, "nft.kl_beta": 0.0},
}
PLAN = [(m, u) for m in ("toy", "sd3", "flux") for u in UPDATES]
EVERY = {
    "eval.every": 1,
    "eval.image_every": 1,
    "train.report": True,
    "eval.samples_per_prompt": 1,
    "train.process_group_timeout_minutes": TIMEOUT_MINUTES,
}


def config(model: str, update: str, out: Path, weights: str, pipes: dict[str, str], prompts: str, clip: str):
    extra = {**EVERY, **UPDATES[update]}
    if model == "toy":  # with the premise logged: each process scores its first group (a collective path)
        extra.update({"eval.prompts_limit": 4, "premise.groups": 2})
        return load_config("toy", [*tiny_overrides(weights, out, **extra), PREMISE])
    extra.update(
        {
            "eval.metrics": "[clip_score]",
            "eval.metric_args": f"{{clip_score: {{model: '{clip}', device: cpu, clamp: false}}}}",
            "eval.metric_grid_rows": 2,
        }
    )
    if model == "sd3":
        extra["model.text_encoder_3"] = False
    else:
        extra["sampling.cfg_scale"] = 1.0  # FLUX.1-dev: its guidance embedding, no CFG
    return load_config(None, train_overrides(Path(pipes[model]), out, Path(prompts), **extra))


def describe(tr: Trainer) -> dict:
    import torch.distributed as dist

    doc = {"world": tr.acc.num_processes, "rank": tr.rank, "timeout_s": None, "broadcast_buffers": None}
    doc["sampled"] = dict(tr.shards.sampled)  # this process's samples of the evaluations and grids
    if dist.is_initialized():
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        doc["timeout_s"] = backend.options._timeout.total_seconds()
        doc["broadcast_buffers"] = getattr(tr.ctx.wrapped, "broadcast_buffers", None)
    return doc


def main() -> None:
    out, weights, sd3, flux, prompts, clip = sys.argv[1:]
    from accelerate import Accelerator

    for model, update in PLAN:
        folder = Path(out) / f"{model}_{update}"
        cfg = config(model, update, folder, weights, {"sd3": sd3, "flux": flux}, prompts, clip)
        tr = Trainer(cfg, accelerator=Accelerator(cpu=True) if model == "sd3" else None)
        tr.train()
        (folder / f"ddp_rank{tr.rank}.json").write_text(json.dumps(describe(tr)))
    finish()


if __name__ == "__main__":
    main()
