"""What a policy update works with, and nothing more: the :class:`UpdateContext`.

Setup (:mod:`solace.trainer.setup`) builds it once a run (adapter with its LoRA, optimizer, accelerator and
wrapped module, the run's random streams, the sampler's schedule and trained window); the updates
(:mod:`solace.trainer.updates`) take it instead of the trainer, so an update can be built and stepped from a
context alone (a test does, on a toy adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from solace.utils.seeding import TrainStreams

if TYPE_CHECKING:
    from solace.trainer.fsdp import ShardedParams


@dataclass
class UpdateContext:
    """The model, its trainable parameters and optimizer, the accelerator, streams and schedule.

    ``wrapped`` is the module the training forwards run through (DDP / FSDP on several processes, else the
    denoiser); ``sharded`` gathers and clips the LoRA under FSDP (None otherwise). ``sigmas`` are the
    sampler's ``T + 1`` timesteps and ``window`` the step indices the GRPO update trains.
    """

    adapter: Any
    params: Sequence[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    accelerator: Any
    wrapped: torch.nn.Module
    sharded: ShardedParams | None
    streams: TrainStreams
    sigmas: torch.Tensor
    window: list[int]
    max_grad_norm: float

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def whole_lora(self, writeback: bool = False) -> contextlib.AbstractContextManager:
        """Inside, the LoRA parameters are whole tensors: under FSDP gathered on every process (a
        collective; ``writeback`` returns changes to the shards), otherwise they already are."""
        return self.sharded.summoned(writeback) if self.sharded is not None else contextlib.nullcontext()

    def full(self) -> Any:
        """The function that gathers per-parameter tensors whole under FSDP (None: already whole)."""
        return self.sharded.full if self.sharded is not None else None

    def local(self) -> Any:
        """The function that cuts whole per-parameter tensors to this process's shards (None: no shards)."""
        return self.sharded.local if self.sharded is not None else None

    @contextlib.contextmanager
    def training_forwards(self) -> Iterator[None]:
        """Inside, the adapter's forwards go through the DDP-wrapped module: the policy update's, which every
        process runs in step (DDP's gradient hooks need them). Outside, under DDP, the bare module runs them
        (the same parameters): sampling, rewards, evaluations, image grids, so that a forward some processes
        run and others not (an evaluation's blocks differ) can never start a collective (DDP's buffer
        broadcast, see :func:`~solace.trainer.distributed.accelerator_kwargs`). Under FSDP the wrapped module
        runs every forward (it gathers the sharded parameters) and every process runs each."""
        if self.num_processes == 1 or self.sharded is not None:
            yield
            return
        self.adapter.forward_module = self.wrapped
        try:
            yield
        finally:
            self.adapter.forward_module = None
