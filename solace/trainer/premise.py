"""The paper's premise measured while a run trains, never trained on (``premise``).

SOLACE's conjecture for the online reward is that self-confidence tracks correctness better as the model
improves. A run that improves for another reason (e.g. a verifiable reward) can measure it as it goes: each
``premise.components`` entry (a reward component, e.g. self-confidence in the paper form and the contrastive
form) scores a fixed slice of every ``premise.every``-th training batch, and the run logs

* ``premise/<label>_auc``: the within-group AUC of those scores against the samples' correctness (the
  probability that a correct sample of a prompt outscores an incorrect one of the same prompt, ties 1/2),
  averaged over the slice's groups that hold both kinds; NaN when none does;
* ``premise/<label>_groups``: how many groups held both.

Correctness is ``premise.label``, a per-sample statistic of the model family's batch statistics
(:meth:`~solace.models.base.AdapterBase.batch_statistics`). The scores enter neither the reward nor the
advantages, and the components draw their probes from seeded streams, so a run trains bitwise the same with
the premise logged or not.

The slice is the first ``premise.groups / processes`` prompt groups of every process's share: each process
scores the same number of its own samples (every collective and sharded forward in step), renumbered as
``premise.groups`` groups of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from solace.errors import ConfigError
from solace.evaluation.analysis import mean_auc
from solace.prompts import Prompt
from solace.rewards.components import RewardComponent, RewardContext, build_component
from solace.sampling.rollout import GroupLayout, Rollout

if TYPE_CHECKING:
    from solace.trainer.config import SolaceConfig


@dataclass(frozen=True)
class PremiseSlice:
    """Which samples the premise scores: ``layout`` (``groups`` groups of their own, this process's rows
    ``[start, stop)``), this process's rows of its rollout (``local_rows``: its first ones), and for every
    sample of the slice in the slice's order, its global index in the iteration (``global_rows``) and the
    iteration's group it came from (``source_groups``, one per slice group)."""

    layout: GroupLayout
    local_rows: int
    global_rows: list[int]
    source_groups: list[int]


def premise_slice(layout: GroupLayout, groups: int, world: int, rank: int) -> PremiseSlice:
    """The premise's slice of an iteration laid out as ``layout`` over ``world`` processes: the first
    ``groups / world`` whole groups of every process's share. A ConfigError names ``premise.groups`` when
    the processes do not hold whole groups or ``groups`` does not split evenly over them."""
    g, per = layout.group_size, layout.num_groups // world
    if layout.num_groups % world:
        raise ConfigError(
            "premise.groups",
            f"scores whole prompt groups, but {layout.num_groups} groups do not split evenly over {world} "
            "processes; make sampling.prompts_per_step a multiple of the processes or leave premise off",
        )
    if groups % world or groups // world > per:
        raise ConfigError(
            "premise.groups",
            f"must be a multiple of the {world} processes and at most the iteration's {layout.num_groups} "
            f"groups, got {groups}",
        )
    m = groups // world
    source = [q * per + j for q in range(world) for j in range(m)]
    rows = [s * g + i for s in source for i in range(g)]
    sub = GroupLayout(groups, g, rank * m * g, (rank + 1) * m * g)
    return PremiseSlice(sub, m * g, rows, source)


def slice_rollout(ro: Rollout, sl: PremiseSlice) -> Rollout:
    """This process's samples of the slice as a rollout of its own (views of ``ro``'s tensors)."""
    n = sl.local_rows
    prompts: list[Prompt] = [ro.prompts[s] for s in sl.source_groups]
    return Rollout(
        prompts, sl.layout, ro.cond.index(slice(0, n)), ro.null.index(slice(0, n)), ro.latents[:n], None
    )


def premise_stats(label: str, scores: torch.Tensor, correct: torch.Tensor, groups: int) -> dict[str, float]:
    """The logged values of one component: the within-group AUC of ``scores`` (the slice's samples, group by
    group) against ``correct`` (> 0.5 counts as correct) and the number of groups that hold both kinds."""
    s = scores.detach().float().cpu().reshape(groups, -1).numpy()
    c = (correct.detach().float().cpu().reshape(groups, -1) > 0.5).numpy()
    res = mean_auc(s, np.asarray(c))
    auc = res["auc"]
    return {
        f"premise/{label}_auc": math.nan if auc is None else float(auc),
        f"premise/{label}_groups": float(res["groups_with_both"]),
    }


class PremiseProbe:
    """The ``premise`` components, built once, scored on their slice every ``premise.every`` iterations."""

    def __init__(self, cfg: SolaceConfig, layout: GroupLayout, world: int, rank: int):
        p = cfg.premise
        self.every, self.label, self.groups = p.every, p.label, p.groups
        self.components: dict[str, RewardComponent] = {
            (c.label or c.name): build_component(c, cfg) for c in p.components
        }
        self.slice = premise_slice(layout, p.groups, world, rank) if self.components else None
        self._missing_warned = False

    def prompts_to_encode(self, prompts: list[Prompt]) -> list[str]:
        """What the logged components encode beyond the run's prompts (the ``edits`` form's edits)."""
        return [t for c in self.components.values() for t in c.prompts_to_encode(prompts)]

    def due(self, iteration: int) -> bool:
        return bool(self.components) and iteration % self.every == 0

    @torch.no_grad()
    def score(self, rc: RewardContext, per_sample: dict[str, torch.Tensor], warn: Any) -> dict[str, float]:
        """Every component's within-group AUC on the slice of ``rc``'s rollout against ``per_sample[label]``
        (the whole gathered batch's per-sample statistics). Runs on every process (components gather)."""
        if not self.due(rc.iteration):
            return {}
        assert self.slice is not None
        correct = per_sample.get(self.label)
        if correct is None:
            if not self._missing_warned:
                warn(
                    f"premise.label: the batch statistics have no {self.label!r} "
                    f"(they have {', '.join(sorted(per_sample)) or 'none'}); the premise is not logged"
                )
                self._missing_warned = True
            return {}
        sub = replace(rc, rollout=slice_rollout(rc.rollout, self.slice), _images=None)
        labels = correct[self.slice.global_rows]
        stats: dict[str, float] = {}
        for label, comp in self.components.items():
            stats.update(premise_stats(label, comp.score(sub).reward, labels, self.groups))
        return stats
