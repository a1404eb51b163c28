"""Self-confidence as an ordinary reward component (registered as ``self_confidence``).

It scores the clean latents of the batch through :class:`~solace.rewards.scorer.SelfConfidenceScorer` and
owns everything that takes: the probed timesteps (the sampler's own), the probes' seeds (one per prompt
group, or per sample with ``probe_mode: per_sample_timestep``, from the run's named streams), the
``edits`` variant's competing prompts (its user negatives read once), and the batches S_t is standardised
over. It logs ``self_confidence/S_tNN`` (the batch mean of S_t at step NN) and hands the per-timestep
scores of this process's samples on (``Rollout.confidence``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from solace.prompts import Prompt
from solace.rewards.components import COMPONENTS, ComponentScore, RewardComponent, RewardContext
from solace.rewards.prompt_edits import candidate_edits, load_negatives
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer, settings_with
from solace.rewards.self_confidence import standardization_batches
from solace.sampling.rollout import GroupLayout
from solace.utils.seeding import Stream


class PromptEditor:
    """The ``edits`` variant's competing prompts of a prompt (:func:`~solace.rewards.prompt_edits.
    candidate_edits`), with the user negatives of ``negatives`` (a .jsonl path) read once."""

    def __init__(self, max_edits: int, negatives: str = ""):
        self.max_edits = max_edits
        self.negatives = load_negatives(negatives) if negatives else None

    def __call__(self, prompt: Prompt) -> list[str]:
        return candidate_edits(prompt.text, prompt.meta, self.negatives, self.max_edits)


class SelfConfidenceReward(RewardComponent):
    """The SOLACE reward of the batch (Eqs. 9-14) under the policy (or the base, offline)."""

    def __init__(self, name: str, settings: SelfConfidenceCfg, cfg_scale: float):
        super().__init__(name)
        self.cfg = settings
        self.scorer = SelfConfidenceScorer(settings, cfg_scale)
        self.editor = (
            PromptEditor(settings.max_edits, settings.negatives) if settings.edits != "off" else None
        )

    @classmethod
    def from_config(cls, spec: Any, cfg: Any) -> SelfConfidenceReward:
        """Settings from ``reward.self_confidence`` with the entry's ``kwargs`` laid over them (e.g. a logged
        form, ``{contrastive: true}``); the CFG scale (``cfg_in_reward``) from sampling."""
        settings = settings_with(cfg.reward.self_confidence, dict(spec.kwargs or {}), f"{spec.name}.kwargs")
        return cls(spec.name, settings, cfg.sampling.cfg_scale)

    def prompts_to_encode(self, prompts: Sequence[Prompt]) -> list[str]:
        """Every prompt's competing prompts (the ``edits`` variant), else none."""
        return [e for p in prompts for e in self.editor(p)] if self.editor is not None else []

    def timesteps(self, sigmas: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """The probed step indices and timesteps: the sampler's own ``sigmas[j]`` (not ``sigmas[T] = 0``)."""
        return self.scorer.timesteps(sigmas)

    def score(self, ctx: RewardContext) -> ComponentScore:
        """S_t of this process's samples, gathered; R aggregated over the whole batch (standardised over it
        or over its batches)."""
        probe_idx, probe_t = self.timesteps(ctx.sigmas)
        scores = ctx.gather(self._local_scores(ctx, probe_t))
        batches = self.standardization_batches(ctx.rollout.layout, ctx)
        reward = self.scorer.aggregate(scores, probe_t, batches)
        stats = {f"self_confidence/S_t{j:02d}": float(scores[:, c].mean()) for c, j in enumerate(probe_idx)}
        return ComponentScore(reward, stats, per_timestep=ctx.rollout.layout.local(scores))

    def _local_scores(self, ctx: RewardContext, probe_t: torch.Tensor) -> torch.Tensor:
        """This process's per-timestep S_t (n, T'), probes from the run's named streams."""
        ro, lay, it = ctx.rollout, ctx.rollout.layout, ctx.iteration
        if self.cfg.probe_mode == "per_sample_timestep":
            groups = torch.arange(len(ro))  # fresh probes for every sample: one "group" per sample
            seeds = [ctx.streams.seed_of(Stream.SAMPLE_PROBES, it, i) for i in lay.indices]
            prompt_of = lay.groups
        else:
            groups = torch.tensor(lay.groups)
            seeds = [ctx.streams.seed_of(Stream.GROUP_PROBES, it, g) for g in range(lay.num_groups)]
            prompt_of = list(range(lay.num_groups))
        edits = None
        if self.editor is not None:  # each scoring group's prompt against its minimal edits
            dev = ro.z0.device
            edits = [ctx.encode(self.editor(ro.prompts[p])).to(dev) for p in prompt_of]
        t = probe_t.to(ro.z0.device)
        return self.scorer.scores(
            ctx.adapter, ro.z0, ro.cond, ro.null, t, groups, seeds, edit_conds=edits
        ).cpu()

    def standardization_batches(self, lay: GroupLayout, ctx: RewardContext) -> torch.Tensor | None:
        """The batch of each of the iteration's samples that S_t is standardised over
        (``reward.self_confidence.standardize_batch``); None: the whole gathered iteration. A function of
        the global sample index and the run's streams, the same on every process."""
        sc = self.cfg
        if not (sc.standardize and sc.standardize_batch):
            return None
        gen = ctx.streams.generator(Stream.STANDARDIZE_BATCHES, ctx.iteration, 0)
        return standardization_batches(
            lay.total, sc.standardize_batch, lay.group_size, sc.standardize_shuffle_groups, gen
        )


COMPONENTS.register("self_confidence", SelfConfidenceReward.from_config)
