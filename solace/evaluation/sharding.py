"""Evaluations and image grids split over the processes of a run and gathered, so that N processes sample
them N times faster and every process ends with the whole result (the main one writes it).

An evaluation samples ``P`` prompts x ``S`` samples; sample ``(i, j)`` starts from noise that depends only on
``(seed, i, j)`` and the ODE sampler draws nothing else (:func:`solace.sampling.generate.generate_jobs`),
so any process can sample any of them and gets what one process gets (up to the rounding of another batch
size). The ``n = P * S`` samples, numbered prompt-major, are split into contiguous blocks of
``ceil(n / world)`` (:func:`split`): each process samples and scores its block, then every process gathers
every block's per-sample results in sample order (:meth:`Shards.gather`, accelerate's ``gather_object``)
and computes the same record from them. On one process the block is everything, batched as before.

Rules, since gathers are collectives: every process calls :meth:`Shards.gather` and :meth:`Shards.from_main`
at the same points, in the same order, whatever its block (an empty one included); a decision that skips
sampling (a cached base evaluation) is the main process's, sent to the others (:meth:`Shards.from_main`).
Under FSDP every forward is a collective too (``pad``): every process runs the same number of forwards, so
each block is padded to ``ceil(n / world)`` samples by repeating its last one (the repeats are sampled, then
dropped). What is gathered lives on the CPU (numbers, uint8 arrays): objects are pickled between processes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def split(n: int, rank: int, world: int, pad: bool = False) -> tuple[list[int], int]:
    """Process ``rank``'s block of the samples ``0 .. n-1``: ``(indices, real)``, the first ``real`` of
    ``indices`` its own samples, the rest (``pad``: up to ``ceil(n / world)``) repeats of its last sample (or
    of sample 0 for an empty block). The blocks are contiguous, in rank order, ``ceil(n / world)`` long but
    the last ones, so the main process's block is never empty while there is a sample."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"rank {rank} of {world} processes, {n} samples")
    size = math.ceil(n / world)
    lo, hi = min(n, rank * size), min(n, (rank + 1) * size)
    mine = list(range(lo, hi))
    real = len(mine)
    if pad and n:
        mine += [mine[-1] if mine else 0] * (size - real)
    return mine, real


@dataclass
class Shards:
    """How this process takes part in an evaluation or grid: its rank among ``world`` processes, whether its
    blocks are padded (``pad``: every forward is a collective, FSDP), the collectives (``gather_fn``:
    accelerate's ``gather_object``; ``broadcast_fn``: its ``broadcast_object_list``), and ``sampled``: how
    many samples of each kind (``eval``, ``grid``) this process sampled, its own, without padding. The
    default is one process."""

    rank: int = 0
    world: int = 1
    pad: bool = False
    gather_fn: Callable[[list], list] | None = None
    broadcast_fn: Callable[[list], list] | None = None
    sampled: Counter = field(default_factory=Counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str) -> tuple[list[int], int]:
        """This process's block of ``n`` samples (:func:`split`), counted in ``sampled[what]``."""
        mine, real = split(n, self.rank, self.world, self.pad)
        self.sampled[what] += real
        return mine, real

    def gather(self, pairs: list[tuple[int, Any]], n: int) -> list[Any]:
        """Every process's ``(sample index, result)`` pairs, all ``n`` results on every process, in sample
        order (a collective on several processes)."""
        items = pairs if self.world == 1 else self.gather_fn(pairs)
        out: list[Any] = [None] * n
        seen = set()
        for i, x in items:
            out[i] = x
            seen.add(i)
        if len(seen) != n:
            raise RuntimeError(f"gathered {len(seen)} of {n} samples: a process left out its block")
        return out

    def from_main(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (a collective on several processes)."""
        return obj if self.world == 1 else self.broadcast_fn([obj])[0]


def accelerate_shards(acc: Any, pad: bool) -> Shards:
    """The :class:`Shards` of an accelerate ``Accelerator``'s process (``pad``: FSDP)."""
    from accelerate.utils import broadcast_object_list, gather_object

    return Shards(acc.process_index, acc.num_processes, pad, gather_object, broadcast_object_list)
