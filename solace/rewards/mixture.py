"""Rewards for one batch of samples: self-confidence (and its variants) mixed with external rewards.

``R = sum_k weight_k * R_k``. The self-confidence reward runs on latents (no decoding) with the adapter's
*conditional* velocity (paper), the CFG velocity (``cfg_in_reward``), or prompt-contrastively
(``S_t(c) - S_t(empty)``); with the policy being trained (online) or the LoRA-off base (offline). External
rewards (registry) see decoded images, prompts and their metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from solace.models.base import Conditioning, FlowModelAdapter, adapters_disabled
from solace.rewards.registry import build_reward
from solace.rewards.self_confidence import aggregate, confidence_scores, draw_probes, probe_mse
from solace.sampling.sampler import cfg_velocity

SELF_CONFIDENCE = "self_confidence"


@dataclass
class RewardBatch:
    total: torch.Tensor  # (B,) mixed reward
    components: dict[str, torch.Tensor]  # name -> (B,) raw component rewards
    scores: torch.Tensor | None  # (B, T') per-timestep S_t of self-confidence (None if not used)
    probe_t: torch.Tensor | None  # (T',) the probed timesteps


class RewardMixture:
    """Builds the configured rewards once; :meth:`__call__` scores a batch."""

    def __init__(self, components: Sequence, sc_cfg, cfg_scale: float):
        self.components = list(components)
        self.sc = sc_cfg
        self.cfg_scale = cfg_scale
        self.external = {
            c.name: build_reward(c.name, **dict(c.kwargs))
            for c in self.components
            if c.name != SELF_CONFIDENCE
        }

    @property
    def uses_self_confidence(self) -> bool:
        return any(c.name == SELF_CONFIDENCE for c in self.components)

    @torch.no_grad()
    def self_confidence_scores(
        self,
        adapter: FlowModelAdapter,
        z0: torch.Tensor,
        cond: Conditioning,
        null_cond: Conditioning,
        probe_t: torch.Tensor,
        group_index: torch.Tensor,
        probe_seeds: Sequence[int],
    ) -> torch.Tensor:
        """Per-timestep S_t (B, T') with probes shared within each prompt group (``group_index``)."""
        sc = self.sc
        ctx = contextlib.nullcontext() if sc.online else adapters_disabled(adapter.denoiser)
        lat = tuple(z0.shape[1:])
        out = torch.empty(z0.shape[0], probe_t.numel(), device=z0.device)
        for g in torch.unique(group_index).tolist():
            rows = (group_index == g).nonzero().flatten()
            gen = torch.Generator().manual_seed(int(probe_seeds[g]))
            probes = draw_probes(sc.num_probes, lat, rows.numel(), probe_t.numel(), sc.probe_mode, gen)
            probes = probes.to(z0.device, torch.float32)
            c_rows, n_rows = cond.index(rows.cpu()), null_cond.index(rows.cpu())

            def vel(
                z: torch.Tensor,
                t: torch.Tensor,
                idx: torch.Tensor,
                c: Conditioning = c_rows,
                n: Conditioning = n_rows,
            ) -> torch.Tensor:
                ci = c.index(idx.cpu())
                if sc.cfg_in_reward:
                    return cfg_velocity(adapter, z, t, ci, n.index(idx.cpu()), self.cfg_scale)
                return adapter.velocity(z.to(adapter.dtype), t, ci).float()

            with ctx:
                mse = probe_mse(vel, z0[rows].float(), probe_t, probes, sc.max_batch)
                s = confidence_scores(mse, sc.delta)
                if sc.contrastive:
                    mse_u = probe_mse(
                        lambda z, t, idx, n=n_rows: vel(z, t, idx, n),
                        z0[rows].float(),
                        probe_t,
                        probes,
                        sc.max_batch,
                    )
                    s = s - confidence_scores(mse_u, sc.delta)
            out[rows] = s
        return out

    def aggregate_scores(self, scores: torch.Tensor, probe_t: torch.Tensor) -> torch.Tensor:
        """R from S_t (Eqs. 13-14); ``scores`` should hold the whole (gathered) batch when standardising."""
        return aggregate(scores, probe_t, self.sc.weighting, self.sc.standardize)

    def external_rewards(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None
    ) -> dict[str, torch.Tensor]:
        return {
            name: fn(images, list(prompts), list(metadata) if metadata is not None else None).float().cpu()
            for name, fn in self.external.items()
        }

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for c in self.components:
            r = components[c.name] * c.weight
            total = r if total is None else total + r
        assert total is not None
        return total
