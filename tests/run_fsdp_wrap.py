"""Subprocess entry (``torchrun --nproc_per_node 2 run_fsdp_wrap.py OUT``): the wrapping of
``configs/accelerate/fsdp_{sd3,flux}.yaml`` applied with torch's FSDP on CPU processes (gloo), since
accelerate refuses FSDP without a GPU. For each tiny transformer with LoRA on a frozen base: the block classes
the config names become FSDP units, and the LoRA gradients of a batch split over the processes equal those of
one process on the whole batch. Writes ``OUT/fsdp_rank{r}.json``."""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import make_tiny_flux, make_tiny_sd3  # noqa: E402

from solace.models.flux import latent_image_ids  # noqa: E402
from solace.models.lora import add_lora, lora_parameters  # noqa: E402
from solace.models.sd3 import SD3_LORA_TARGETS  # noqa: E402
from solace.trainer.distributed import finish  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def inputs(kind: str) -> dict[str, torch.Tensor]:
    """A batch of 4 for the tiny transformer (fixed seed, the same on every process)."""
    g = torch.Generator().manual_seed(1)
    if kind == "sd3":
        return {
            "hidden_states": torch.randn(4, 16, 8, 8, generator=g),
            "timestep": torch.rand(4, generator=g) * 1000,
            "encoder_hidden_states": torch.randn(4, 20, 64, generator=g),
            "pooled_projections": torch.randn(4, 64, generator=g),
        }
    return {
        "hidden_states": torch.randn(4, 16, 64, generator=g),
        "timestep": torch.rand(4, generator=g),
        "guidance": torch.full((4,), 3.5),
        "encoder_hidden_states": torch.randn(4, 20, 64, generator=g),
        "pooled_projections": torch.randn(4, 32, generator=g),
        "txt_ids": torch.zeros(20, 3),
        "img_ids": latent_image_ids(8, 8),
    }


def lora_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    out = model(**batch, return_dict=False)[0]
    out.square().mean().backward()


def check(kind: str, rank: int, world: int) -> dict[str, float]:
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    fsdp = yaml.safe_load((CONFIGS / f"fsdp_{kind}.yaml").read_text())["fsdp_config"]
    pipe = make_tiny_sd3(0) if kind == "sd3" else make_tiny_flux(0)
    model = pipe.transformer
    model.requires_grad_(False)  # as the trainer: a frozen base, LoRA on top
    torch.manual_seed(0)
    add_lora(model, 4, 8, SD3_LORA_TARGETS)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)  # LoRA B starts at 0: give every LoRA weight a gradient
    batch = inputs(kind)
    single = copy.deepcopy(model)
    lora_grads(single, batch)
    ref = {n: p.grad for n, p in single.named_parameters() if p.requires_grad}
    names = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    classes = {get_module_class_from_name(model, n) for n in names}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    wrapped = FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=fsdp["fsdp_use_orig_params"],
        sharding_strategy=ShardingStrategy[fsdp["fsdp_sharding_strategy"]],
        device_id=torch.device("cpu"),
    )
    n = 4 // world
    lora_grads(wrapped, {k: (v[rank * n : rank * n + n] if v.shape[0] == 4 else v) for k, v in batch.items()})
    with FSDP.summon_full_params(wrapped, with_grads=True):
        got = {
            n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
            for n, p in wrapped.named_parameters()
            if p.requires_grad and p.grad is not None
        }
    blocks = sum(isinstance(m, FSDP) and type(m.module) in classes for m in wrapped.modules())
    return {
        "units": blocks,
        "expected_units": sum(type(m) in classes for m in single.modules()),
        "lora": len(ref),
        "lora_with_grad": len(set(got) & set(ref)),
        "max_err": max((got[k] - ref[k]).abs().max().item() for k in ref if k in got),
        "max_ref": max(g.abs().max().item() for g in ref.values()),
        "trainable_not_lora": len(set(got) - set(ref)),
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {kind: check(kind, rank, world) for kind in ("sd3", "flux")}
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps({"world": world, **res}))
    finish()  # barrier, leave the group, os._exit: no C++ static teardown (solace/trainer/distributed.py)


if __name__ == "__main__":
    main()
