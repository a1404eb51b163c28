"""Everything a run sets up before its first iteration, built from the config:

* :func:`make_accelerator`: accelerate's Accelerator on the configured device, precision and process group;
* :func:`make_layout`: how the iteration's ``P x G`` samples split over the processes;
* :func:`trainable`: the LoRA on the denoiser, AdamW, and the DDP / FSDP wrapping;
* :func:`build_context`: the :class:`~solace.trainer.context.UpdateContext` the policy update works with;
* :func:`make_lora_ema`: the EMA of the LoRA that evaluations and the export use (``lora_ema``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from solace.errors import ConfigError
from solace.grpo.window import parse_steps, train_window
from solace.models.lora import add_lora, lora_parameters
from solace.nft.ema import EMAPolicy, ema_decay
from solace.sampling.rollout import GroupLayout
from solace.trainer.context import UpdateContext
from solace.trainer.distributed import accelerator_kwargs, check_backend
from solace.trainer.fsdp import ShardedParams, check_lora_units, check_uniform_dtype, prepare_plugin
from solace.trainer.model_setup import merge_init
from solace.trainer.precision import ACCELERATE_NAME, LAUNCHER, check_accelerate, launcher_precision, set_tf32
from solace.trainer.tracking import log_with
from solace.utils.seeding import TrainStreams

if TYPE_CHECKING:
    from solace.trainer.config import SolaceConfig


def make_accelerator(cfg: SolaceConfig, given: Any | None, out: Path) -> Any:
    """accelerate's Accelerator on the configured device, precision (bf16 autocast, fp16 refused:
    precision.py) and process-group settings (distributed.py), or the ``given`` one (which brings its own
    trackers and process group), checked against the config; DeepSpeed refused with the reason."""
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda asked for, but torch sees no GPU; use auto or cpu")
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if given is None:
        check_accelerate(t.mixed_precision, launcher_precision(os.environ), LAUNCHER)
    acc = given or Accelerator(
        cpu=cpu,
        mixed_precision=ACCELERATE_NAME[t.mixed_precision],
        log_with=log_with(t.log_with, out),
        kwargs_handlers=accelerator_kwargs(t.process_group_timeout_minutes),
    )
    check_backend(acc.distributed_type)
    check_accelerate(t.mixed_precision, acc.mixed_precision, "the Accelerator the trainer runs with")
    set_tf32(t.tf32, acc.device.type)
    return acc


def make_layout(cfg: SolaceConfig, acc: Any) -> GroupLayout:
    """This process's slice of the iteration's ``prompts_per_step x group_size`` samples."""
    s, world = cfg.sampling, acc.num_processes
    total = s.prompts_per_step * s.group_size
    if total % world:
        raise ConfigError(
            "sampling.group_size",
            f"prompts_per_step * group_size = {total} samples must split evenly over {world} processes",
        )
    return GroupLayout.split(s.prompts_per_step, s.group_size, acc.process_index, world)


def trainable(
    cfg: SolaceConfig, adapter: Any, acc: Any
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.nn.Module, ShardedParams | None]:
    """LoRA on the denoiser (its A matrices drawn from ``train.seed``), AdamW, the module that runs the
    training forwards (DDP- or FSDP-wrapped on several processes) and, under FSDP, the helper that gathers
    the sharded LoRA (the wrapped module then runs every forward, see
    :meth:`~solace.trainer.context.UpdateContext.training_forwards`)."""
    m, o = cfg.model, cfg.optim
    den = adapter.denoiser
    den.requires_grad_(False)
    targets = m.lora.target_modules or adapter.lora_target_modules
    torch.manual_seed(cfg.train.seed)  # same seed, same initial LoRA
    merged = merge_init(m, den)  # the run's base: init_from folded in, a fresh LoRA on top
    add_lora(den, m.lora.rank, m.lora.alpha, targets, init_from=None if merged else m.lora.init_from)
    params = lora_parameters(den)
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if acc.num_processes == 1:
        if acc.mixed_precision != "no":  # accelerate's autocast around the denoiser's forward (the same as
            acc.prepare_model(den)  # prepare() below does under several processes)
        return params, opt, den, None
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp:  # bf16: FSDP's mixed precision (bf16 compute, float32 shards and gradient reductions)
        ignored = adapter.fsdp_ignored_modules
        prepare_plugin(acc.state.fsdp_plugin, ignored, acc.mixed_precision)
        check_uniform_dtype(den, ignored)
    wrapped, opt = acc.prepare(den, opt)
    if not fsdp:
        return params, opt, wrapped, None
    check_lora_units(wrapped, params)
    adapter.forward_module = wrapped  # the parameters are shards: every forward gathers them
    return params, opt, wrapped, ShardedParams(wrapped, params)


def trained_window(cfg: SolaceConfig) -> list[int]:
    """The sampler steps the GRPO update trains: ``grpo.train_steps``, else the last ceil(rho T)."""
    s, g = cfg.sampling, cfg.grpo
    return parse_steps(g.train_steps, s.num_steps) if g.train_steps else train_window(s.num_steps, g.rho)


def build_context(cfg: SolaceConfig, adapter: Any, acc: Any) -> UpdateContext:
    """The LoRA, optimizer and wrapping (:func:`trainable`), the run's streams and the sampler's schedule."""
    params, opt, wrapped, sharded = trainable(cfg, adapter, acc)
    return UpdateContext(
        adapter=adapter,
        params=params,
        optimizer=opt,
        accelerator=acc,
        wrapped=wrapped,
        sharded=sharded,
        streams=TrainStreams(cfg.train.seed),
        sigmas=adapter.sigmas(cfg.sampling.num_steps),
        window=trained_window(cfg),
        max_grad_norm=cfg.optim.max_grad_norm,
    )


def make_lora_ema(cfg: SolaceConfig, params: list[torch.nn.Parameter]) -> EMAPolicy | None:
    """The EMA of the LoRA (``lora_ema``), moved after each optimizer step by the update; None: off."""
    e = cfg.lora_ema
    if not e.enabled:
        return None
    return EMAPolicy(
        params, functools.partial(ema_decay, kind="warmup", max_decay=e.max_decay, every=e.every)
    )
