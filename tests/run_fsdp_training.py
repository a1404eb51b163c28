"""Subprocess entry: ``torchrun --nproc_per_node 2 run_fsdp_training.py WEIGHTS OUT BACKEND PIPE PROMPTS
CLIP``. The tiny toy training of the trainer tests, under DDP (``BACKEND=ddp``: accelerate's own choice on
CPU) or under accelerate's FSDP (``BACKEND=fsdp``), for each algorithm of :data:`PLAN`:
``OUT/<algorithm>/full`` trains 2 iterations with an evaluation and an image grid after each; under FSDP
``OUT/<algorithm>/resumed`` also trains 1 iteration (a checkpoint), then a new Trainer continues it to 2 with
``--resume``. Then ``OUT/sd3`` trains the tiny SD3 pipeline saved in ``PIPE`` on ``PROMPTS`` (its
transformer blocks wrapped as ``configs/accelerate/fsdp_sd3.yaml`` says; CLIPScore evaluations with the tiny
CLIP in ``CLIP``). Last, ``OUT/bf16/<precision>/{flow_grpo,sd3}`` (:func:`bf16`): the toy flow_grpo run and
the SD3 run again with AdamW's eps at 1e-2, under DDP in fp32 and in bf16 (autocast), under FSDP in bf16 (its
mixed precision, as the shipped configs' ``mixed_precision: bf16`` asks). Each run folder gets
``fsdp_rank{r}.json`` (the FSDP units, the local and whole sizes of the LoRA parameters, FSDP's mixed
precision policy, the dtypes of the LoRA and AdamW's moments after training) and ``probe.safetensors``
(:func:`probe`: the initial LoRA and one velocity forward before training). One launch, one process group,
several Trainers in turn (as ``solace ablate`` runs them), to keep the test short.

accelerate picks FSDP only from a GPU-like distributed type (``state.py``: never from MULTI_CPU), so for
``fsdp`` the Accelerator is built on CPU with an FSDP plugin and its state is then set to what
``accelerate launch --config_file configs/accelerate/fsdp_sd3.yaml`` gives on GPUs: distributed type FSDP,
the plugin, and the device ``cpu`` (accelerate's ``cpu:0`` is refused by torch's FSDP as a ``device_id``
differing from the compute device ``cpu``). The plugin takes the shipped config's settings (version 1,
FULL_SHARD, use_orig_params, FULL_STATE_DICT; for SD3 its block classes, for the toy model its own block
class, ``JointAttention``, which holds its LoRA layers), and no ``sync_module_states`` (accelerate's plugin
needs a GPU-like device for it; every process loads the same weights and seeds the same LoRA here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from trainer_helpers import bf16_attention, tiny_overrides  # noqa: E402

from solace.trainer.config import load_config  # noqa: E402
from solace.trainer.distributed import finish  # noqa: E402
from solace.trainer.precision import ACCELERATE_NAME  # noqa: E402
from solace.trainer.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp_sd3.yaml"


def fsdp_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    f = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=f["fsdp_version"],
        reshard_after_forward=f["fsdp_sharding_strategy"],
        auto_wrap_policy=f["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=["JointAttention"],
        use_orig_params=f["fsdp_use_orig_params"],
        state_dict_type=f["fsdp_state_dict_type"],
        sync_module_states=False,
    )
    acc = Accelerator(cpu=True, fsdp_plugin=plugin, mixed_precision=mixed_precision)
    patch = {"distributed_type": DistributedType.FSDP, "device": torch.device("cpu")}
    PartialState._shared_state.update(patch)  # AcceleratorState copies PartialState's when re-created
    acc.state.__dict__.update(patch)
    acc.state.fsdp_plugin = plugin
    return acc


def describe(tr: Trainer) -> dict:
    """What the wrapping did on this process: FSDP units, local vs whole LoRA sizes."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    local = [p.numel() for p in tr.params]
    doc = {"world": tr.acc.num_processes, "fsdp": tr.ctx.sharded is not None, "local_numel": sum(local)}
    if tr.ctx.sharded is not None:
        doc["units"] = sum(isinstance(m, FSDP) for m in tr.ctx.wrapped.modules())
        with tr.ctx.sharded.summoned():
            doc["whole_numel"] = sum(p.numel() for p in tr.params)
        doc["empty_pieces"] = sum(n == 0 for n in local)
        mp = tr.ctx.wrapped.mixed_precision  # FSDP's policy (every unit shares the root's)
        doc["policy"] = {k: str(getattr(mp, k)) for k in ("param_dtype", "reduce_dtype", "buffer_dtype")}
        doc["policy"]["cast_root_forward_inputs"] = mp.cast_root_forward_inputs
    return doc


def stored_dtypes(tr: Trainer) -> dict:
    """After training: the dtypes of the LoRA parameters (the shards: master weights) and AdamW's moments."""
    moments = {
        str(v.dtype)
        for s in tr.ctx.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.ndim
    }
    return {"lora": sorted({str(p.dtype) for p in tr.params}), "moments": sorted(moments)}


NFT = ["train.algorithm=nft", "sampling.noise_level=0", "nft.ema_decay=0.5", "train.micro_batch_size=4"]
# flow_grpo with the report on: the evaluation before training and the final one run too; nft with a
# gradient norm limit below its norms, so that every step is clipped (by the norm over the shards)
PLAN = {"flow_grpo": ["train.report=true"], "nft": [*NFT, "optim.max_grad_norm=0.001"]}
LINEAR_EPS = 1e-2  # AdamW's eps in the bf16 comparison: its steps are lr * g / (|g| + eps), linear in g
EVERY = ["eval.every=1", "eval.image_every=1", "eval.prompts_limit=8"]


def run(acc, weights: str, out: Path, overrides: list[str], resume: bool = False) -> None:
    train(acc, load_config("toy", tiny_overrides(weights, out) + EVERY + overrides), out, resume)


def probe(tr: Trainer, out: Path) -> None:
    """Before training: the initial LoRA (whole) and one velocity forward on fixed inputs (every process
    runs it: under FSDP a collective), written by the main process to ``OUT/probe.safetensors``."""
    from safetensors.torch import save_file

    from solace.models.lora import lora_state_dict

    g = torch.Generator().manual_seed(7)
    z = torch.randn((2, *tr.adapter.latent_shape()), generator=g).to(tr.acc.device)
    cond = tr.encode([p.text for p in tr.source.for_iteration(0, 2)]).to(tr.acc.device)
    with torch.no_grad():
        v = tr.adapter.velocity(z, torch.tensor([0.9, 0.4]), cond).float().cpu()
    with tr.ctx.whole_lora():
        init = {
            f"init.{k}": t.detach().clone().cpu() for k, t in lora_state_dict(tr.adapter.denoiser).items()
        }
    if tr.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({"velocity": v.contiguous(), **init}, str(out / "probe.safetensors"))


def train(acc, cfg, out: Path, resume: bool = False) -> None:
    tr = Trainer(cfg, accelerator=acc)
    doc = describe(tr)
    probe(tr, out)
    tr.train(resume=resume)
    doc["stored"] = stored_dtypes(tr)
    doc["sampled"] = dict(tr.shards.sampled)  # this process's samples of the evaluations and grids
    (out / f"fsdp_rank{tr.rank}.json").write_text(json.dumps(doc))


def wrap_classes(acc, names: list[str]) -> None:
    """Wrap these block classes from now on (accelerate turns the plugin's policy into a callable bound to
    the first model's classes on its first use: it is set afresh)."""
    if acc is not None:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = acc.state.fsdp_plugin
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = transformer_auto_wrap_policy, names


def run_sd3(acc, pipe: str, prompts: str, clip: str, out: Path, **extra) -> None:
    """The tiny SD3 pipeline (no T5) with the block classes of configs/accelerate/fsdp_sd3.yaml, evaluated
    with CLIPScore from the tiny CLIP saved in ``clip``."""
    from tiny_pipelines import train_overrides

    f = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    wrap_classes(acc, f["fsdp_transformer_layer_cls_to_wrap"].split(","))
    every = {
        "eval.every": 1,
        "eval.image_every": 1,
        "model.text_encoder_3": False,
        "eval.samples_per_prompt": 1,
        "eval.metrics": "[clip_score]",
        "eval.metric_args": f"{{clip_score: {{model: '{clip}', device: cpu, clamp: false}}}}",
        "eval.metric_grid_rows": 2,
        **extra,
    }
    train(acc, load_config(None, train_overrides(Path(pipe), out, Path(prompts), **every)), out)


def root_unit_error(acc, weights: str, out: Path) -> str:
    """The trainer's error when the wrapped blocks (the toy's ResBlocks) leave the LoRA in the root unit."""
    from solace.errors import ConfigError

    wrap_classes(acc, ["ResBlock"])
    try:
        Trainer(load_config("toy", tiny_overrides(weights, out)), accelerator=acc)
    except ConfigError as e:
        return str(e)
    return ""


def main() -> None:
    weights, out, backend, pipe, prompts, clip = sys.argv[1:]
    acc = fsdp_accelerator() if backend == "fsdp" else None
    for algorithm, extra in PLAN.items():
        run(acc, weights, Path(out) / algorithm / "full", extra)
        if backend == "fsdp":
            resumed = Path(out) / algorithm / "resumed"
            run(acc, weights, resumed, [*extra, "train.iterations=1"])
            run(acc, weights, resumed, extra, resume=True)
    run_sd3(acc, pipe, prompts, clip, Path(out) / "sd3")
    if backend == "fsdp":
        error = root_unit_error(acc, weights, Path(out) / "root_unit")
        (Path(out) / f"root_unit_error_rank{acc.process_index}.txt").write_text(error)
    with bf16_attention():  # the math attention where the simulated kernel set refuses bf16 flash attention
        bf16(backend, weights, Path(out) / "bf16", pipe, prompts, clip)
    finish()


def bf16(backend: str, weights: str, out: Path, pipe: str, prompts: str, clip: str) -> None:
    """``OUT/bf16/<precision>/{flow_grpo,sd3}``: the toy flow_grpo run and the SD3 run with AdamW's eps at
    1e-2 (see tests/test_fsdp_training.py), each with a probe (:func:`probe`): under DDP in fp32 and bf16
    (autocast), under FSDP in bf16 (its mixed precision). accelerate sets its precision once a process: its
    state is reset before the bf16 runs (the process group stays)."""
    from accelerate.state import AcceleratorState

    for precision in ["fp32", "bf16"] if backend == "ddp" else ["bf16"]:
        if precision == "bf16":
            AcceleratorState._reset_state(reset_partial_state=False)
        acc = fsdp_accelerator(ACCELERATE_NAME[precision]) if backend == "fsdp" else None
        extra = {"train.mixed_precision": precision, "optim.eps": LINEAR_EPS}
        wrap_classes(acc, ["JointAttention"])
        over = [*PLAN["flow_grpo"], *(f"{k}={v}" for k, v in extra.items())]
        run(acc, weights, out / precision / "flow_grpo", over)
        run_sd3(acc, pipe, prompts, clip, out / precision / "sd3", **extra)


if __name__ == "__main__":
    main()
