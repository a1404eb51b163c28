"""How a multi-process run (``accelerate launch`` / ``torchrun``) starts (:func:`accelerator_kwargs`: the
process group's timeout, DDP without buffer broadcasts), ends (:func:`finish`), and which accelerate
backends it may use (:func:`check_backend`: DDP and FSDP, the latter through :mod:`solace.trainer.fsdp`;
DeepSpeed is refused with the reason), and the two flags every process agrees on (:func:`any_rank`,
:func:`rank0_decides`).

Measured here (torch 2.13 CPU, gloo, 2 processes on 2 cores kept busy by other jobs): after every
output was written, the barrier passed and the process group destroyed, one exit in about 45 still died
with ``terminate called without an active exception`` (SIGABRT) while C++ static objects were torn down
(one CI run did the same), and torchrun then reports the whole, finished, run as failed. So a distributed
command leaves the process group itself and then ends the process with ``os._exit``, after flushing
Python's streams; a one-process run exits normally.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast

from solace.errors import ConfigError

#: accelerate backends the trainer does not drive (yet), and why a run under them would be wrong.
UNSUPPORTED_BACKENDS = {
    "DEEPSPEED": "DeepSpeed's engine owns backward, clipping and the optimizer step (accelerate's "
    "optimizer.step() is a no-op under it) while the trainer steps the optimizer itself, so the run would "
    "not train; its optimizer state is also partitioned, which the checkpoints do not gather",
}


def accelerator_kwargs(timeout_minutes: float) -> list[Any]:
    """accelerate's kwargs handlers for the trainer's Accelerator.

    * ``InitProcessGroupKwargs(timeout)``: how long a process waits in a collective or barrier before the
      run fails (``train.process_group_timeout_minutes``). The other processes wait in one while the main
      process alone writes a checkpoint or the report, so it must exceed the longest of those (evaluations
      and image grids are split over the processes, :mod:`solace.evaluation.sharding`: a process waits
      there only for the others' larger blocks). It applies where the process group is created: the first
      Accelerator of the process (``solace ablate`` trains several runs in one group).
    * ``DistributedDataParallelKwargs(broadcast_buffers=False)``: with torch's default DDP broadcasts rank 0's
      buffers at the start of the first forward after a synchronised backward, which makes that forward a
      collective; run on some processes only (an evaluation's or a grid's blocks differ in size) it waits
      for a broadcast the others never join (a hang, or gloo's "collective mismatch" against the next
      collective they do run). The denoisers' buffers are constants (SD3's ``pos_embed``; FLUX and the
      toy model have none), computed alike on every process, so there is nothing to broadcast. The trainer
      also runs every forward outside the policy update through the bare module
      (:meth:`UpdateContext.training_forwards`), so a forward some processes run and others not never reaches
      DDP, whatever the Accelerator it was given.
    """
    return [
        InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes)),
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]


def world_size() -> int:
    """Number of processes in the default process group (1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and in a run without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def leave_process_group() -> bool:
    """Wait for every process, then destroy the default process group. True when there was one."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def finish(code: int = 0) -> None:
    """End a command that may run distributed: leave the process group if there is one; in a
    multi-process run then exit with ``code`` without C++ static teardown (see the module docstring);
    otherwise return."""
    n = world_size()
    leave_process_group()
    if n <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_backend(distributed_type: Any) -> None:
    """Refuse, before any work, an accelerate backend the trainer does not support yet
    (:data:`UNSUPPORTED_BACKENDS`): a ConfigError that says why and to launch with DDP or FSDP.
    ``configs/accelerate/`` keeps the DeepSpeed config for when it does (docs/gpu.md)."""
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    if name in UNSUPPORTED_BACKENDS:
        raise ConfigError(
            "accelerate config",
            f"distributed_type {name} is not supported by solace's trainer yet: "
            f"{UNSUPPORTED_BACKENDS[name]}; launch with DDP instead "
            "(accelerate launch --multi_gpu --num_processes N -m solace.cli.main train ...) or FSDP "
            "(--config_file configs/accelerate/fsdp_sd3.yaml)",
        )


def any_rank(acc: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process gets the same answer; a collective)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def rank0_decides(acc: Any, flag: bool) -> bool:
    """Rank 0's ``flag`` on every process (a time budget, a signal, a lock): all take the same branch."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=acc.device)
    return bool(broadcast(t, from_process=0).item())
