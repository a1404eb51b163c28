"""What sampling hands to the rewards and to the policy update: a typed rollout.

An iteration samples ``P`` prompt groups of ``G`` samples. Global sample ``i`` belongs to group ``i // G``;
each process holds a contiguous slice of the ``P * G`` samples (:class:`GroupLayout`), so rewards computed
per process can be gathered into the whole batch and group statistics taken over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from solace.models.base import Conditioning
from solace.prompts import Prompt


@dataclass(frozen=True)
class GroupLayout:
    """``num_groups`` groups of ``group_size`` samples; this process holds global samples [start, stop)."""

    num_groups: int
    group_size: int
    start: int
    stop: int

    @classmethod
    def split(cls, num_groups: int, group_size: int, rank: int, world: int) -> GroupLayout:
        """Process ``rank`` of ``world``'s even share (the total must divide evenly)."""
        n = num_groups * group_size // world
        return cls(num_groups, group_size, rank * n, (rank + 1) * n)

    @property
    def total(self) -> int:
        return self.num_groups * self.group_size

    @property
    def indices(self) -> list[int]:
        """Global indices of this process's samples."""
        return list(range(self.start, self.stop))

    @property
    def groups(self) -> list[int]:
        """The group of each of this process's samples."""
        return [i // self.group_size for i in self.indices]

    def all_groups(self) -> torch.Tensor:
        """The group of every sample of the iteration (all processes), (P * G,)."""
        return torch.arange(self.total) // self.group_size

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a gathered (P * G, ...) tensor."""
        return x[self.start : self.stop]


@dataclass
class Rollout:
    """This process's samples of one iteration.

    latents: (n, T+1, *latent) the states at ``sigmas[0..T]`` (``z0 = latents[:, -1]`` is the clean sample).
    log_probs: (n, T) each step's log-prob under the sampling policy (None for updates that need none).
    advantages: (n,) set once the gathered rewards are known, with ``rewards`` (n,), the mixed reward they
        were computed from, and ``confidence`` (n, T'), the per-timestep self-confidence S_t where the
        reward uses it (both this process's rows of the gathered batch; kept for inspection and tests).
    keep: set when samples were dropped (a non-finite reward): the update leaves the others out.
    """

    prompts: list[Prompt]  # the iteration's prompts, one per group (every process holds all of them)
    layout: GroupLayout
    cond: Conditioning  # one row per sample
    null: Conditioning  # the empty prompt, one row per sample (CFG)
    latents: torch.Tensor
    log_probs: torch.Tensor | None
    advantages: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    keep: torch.Tensor | None = (
        None  # (P * G,) bool over the whole batch: samples the update may use (None: all)
    )
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def z0(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def texts(self) -> list[str]:
        return [self.prompts[g].text for g in self.layout.groups]

    @property
    def metas(self) -> list[dict]:
        return [self.prompts[g].meta for g in self.layout.groups]
