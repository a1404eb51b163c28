"""A run's checkpoints: what is saved (the LoRA, the optimizer, the update's and the LoRA EMA's tensors, the
loop's state) and how a run resumes from the newest intact one. The file format (atomic safetensors, the
newest intact checkpoint, pruning) is :mod:`solace.trainer.checkpoint`'s.

Under FSDP every process gathers the sharded tensors (collectives), the main process writes; a resume
loads whole tensors and cuts each process's shards. The end of a run exports the LoRA (:meth:`RunCheckpoints.
export_lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from solace.errors import ConfigError
from solace.models.lora import lora_header, lora_state_dict, save_lora, set_lora_state_dict
from solace.nft.ema import EMAPolicy
from solace.trainer.checkpoint import (
    clean_partial,
    latest_checkpoint,
    load_checkpoint,
    load_update_tensors,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from solace.trainer.context import UpdateContext
from solace.trainer.fsdp import full_optimizer_state, local_optimizer_state
from solace.trainer.inputs import check_inputs
from solace.trainer.model_card import write_card
from solace.trainer.resume_check import check_resume, read_recorded_config
from solace.trainer.updates import PolicyUpdate

if TYPE_CHECKING:
    from solace.trainer.config import SolaceConfig

EMA_PREFIX = "lora_ema."  # the LoRA EMA's tensors in a checkpoint's update.safetensors


class RunCheckpoints:
    """Save and resume the trained state of one run in ``out/checkpoints``."""

    def __init__(
        self,
        out: Path,
        cfg: SolaceConfig,
        ctx: UpdateContext,
        updater: PolicyUpdate,
        lora_ema: EMAPolicy | None,
        warn: Callable[[str], None],
        allow_changes: bool = False,
    ):
        self.root, self.cfg, self.ctx, self.updater, self.lora_ema = (
            out / "checkpoints",
            cfg,
            ctx,
            updater,
            lora_ema,
        )
        self.out, self.warn, self.allow_changes = out, warn, allow_changes
        self.is_main = ctx.accelerator.is_main_process

    def _tensors(self) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]] | None:
        """The LoRA, the optimizer (or its state dict) and the update's tensors, whole: on the main process,
        or under FSDP gathered by every process (None on the others)."""
        sp, den = self.ctx.sharded, self.ctx.adapter.denoiser
        if sp is None:
            if not self.is_main:
                return None
            return lora_state_dict(den), self.ctx.optimizer, self._update_tensors()
        with sp.summoned():
            lora = {k: v.clone() for k, v in lora_state_dict(den).items()}
        return lora, full_optimizer_state(self.ctx.optimizer, sp), self._update_tensors()

    def _update_tensors(self) -> dict[str, torch.Tensor]:
        """The update's own tensors, and the LoRA EMA's as ``lora_ema.*`` (under FSDP gathered whole: call it
        on every process)."""
        tensors = dict(self.updater.state_tensors())
        if self.lora_ema is not None:
            ema = self.lora_ema.state_dict(self.ctx.full())
            tensors.update({f"{EMA_PREFIX}{k}": v for k, v in ema.items()})
        return tensors

    def save(self, iteration: int, state: dict[str, Any]) -> None:
        """Checkpoint ``iteration`` with the loop's ``state`` (every process calls it; the main one writes),
        then keep the newest ``train.checkpoints_total_limit``."""
        acc = self.ctx.accelerator
        acc.wait_for_everyone()
        tensors = self._tensors()
        if self.is_main and tensors is not None:
            lora, opt, update_tensors = tensors
            state = {**state, "update": self.updater.state()}
            save_checkpoint(
                self.root, iteration, lora, lora_header(self.ctx.adapter.denoiser), opt, state,
                config=dataclasses.asdict(self.cfg), update_tensors=update_tensors,
            )  # fmt: skip
            prune_checkpoints(self.root, self.cfg.train.checkpoints_total_limit)
        acc.wait_for_everyone()

    def export_lora(self, evals: list[dict[str, Any]]) -> Path:
        """``OUT/lora``: the LoRA in diffusers' format with its model card (``evals``), written by the main
        process (under FSDP gathered by every process first); with ``lora_ema`` its EMA (what was
        evaluated), the trained weights beside it in ``OUT/lora_trained``."""
        final, adapter = self.out / "lora", self.ctx.adapter
        pipe_cls = type(adapter.pipeline) if adapter.pipeline is not None else None
        with self.lora_ema.swapped() if self.lora_ema is not None else contextlib.nullcontext():
            with self.ctx.whole_lora():
                if self.is_main:
                    save_lora(adapter, final, pipeline_class=pipe_cls)
                    write_card(self.cfg, final, pipe_cls, evals)
        if self.lora_ema is not None:
            with self.ctx.whole_lora():
                if self.is_main:
                    save_lora(adapter, self.out / "lora_trained", pipeline_class=pipe_cls)
        return final

    def resume(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint (an interrupted or damaged newer one is passed over with a
        warning) into the LoRA, optimizer, update and LoRA EMA; return the loop's state. A changed config
        stops here unless its fields are safe to change or ``allow_changes``. None (and a line saying so)
        when there is nothing to resume."""
        if self.is_main:
            clean_partial(self.root)
        ck = latest_checkpoint(self.root)
        if ck is None:
            self.warn(f"--resume: no checkpoint in {self.root}; starting a new run")
            return None
        self._check_config_against(read_state(ck).get("config"), ck)
        for name in check_inputs(self.out, self.cfg, self.allow_changes):
            self.warn(f"--resume: {name} changed since the run started (allowed)")
        sp = self.ctx.sharded  # FSDP: whole tensors saved, shards loaded
        to_local = (lambda sd: local_optimizer_state(sd, sp)) if sp else None
        lora, state = load_checkpoint(ck, self.ctx.optimizer, to_local)
        with self.ctx.whole_lora(writeback=True):
            unexpected = set_lora_state_dict(self.ctx.adapter.denoiser, lora)
        if unexpected:
            raise ConfigError("resume", f"{ck}: LoRA keys do not fit this model ({unexpected[:3]} ...)")
        self._load_update_tensors(ck, state)
        return state

    def _load_update_tensors(self, ck: Path, state: dict[str, Any]) -> None:
        """The update's state and the LoRA EMA from checkpoint ``ck``. An EMA turned on since (with
        ``--allow-changes``) starts from the resumed weights."""
        tensors = load_update_tensors(ck)
        ema = {k.removeprefix(EMA_PREFIX): v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        own = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
        self.updater.load(state.get("update", {}), own)
        if self.lora_ema is None:
            return
        if not ema:
            self.warn(f"{ck} holds no LoRA EMA (lora_ema was off): it starts from the resumed weights")
            self.lora_ema.reset()
            return
        self.lora_ema.load_state_dict(ema, self.ctx.local())

    def _check_config_against(self, old: dict[str, Any] | None, ck: Path) -> None:
        """Stop on a changed config (listing the fields) before anything is loaded or written."""
        if old is None:
            self.warn(f"{ck} records no config (an older checkpoint): the config was not compared")
            return
        old = read_recorded_config(old)  # this version's keys and schema
        for line in check_resume(old, dataclasses.asdict(self.cfg), self.allow_changes):
            self.warn(f"--resume: {line}")
