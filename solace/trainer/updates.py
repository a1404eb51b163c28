"""Policy updates: how a scored :class:`~solace.sampling.rollout.Rollout` becomes optimizer steps.

``train.algorithm`` picks one by its registered name (:data:`UPDATES`; a plugin registers more with
``@UPDATES.register(name)``); prompts, sampling, rewards, advantages, gathering, checkpoints, logging,
evaluation, monitor and report are the trainer's and shared by all. An update sees the run through its
:class:`~solace.trainer.context.UpdateContext` (model, parameters, optimizer, accelerator, streams,
schedule), never the trainer.

* ``flow_grpo`` (:class:`FlowGRPOUpdate`, the paper's): for each step of the trained window, the
  PPO-clipped ratio of the recomputed SDE step log-prob to the stored one, plus ``beta`` KL to the LoRA-off
  reference (:mod:`solace.grpo`). Needs the sampler's log-probs (SDE sampling).
* ``nft`` (:class:`NFTUpdate`, DiffusionNFT, arXiv 2509.16117): flow-matching regression on the clean
  samples re-noised at fresh timesteps, pulled towards the old policy's implicit positive velocity and
  away from its negative one by the optimality ``r`` of each sample's advantage (:mod:`solace.nft`); no
  log-probs, any sampler (ODE included). The old policy is an EMA of the trained LoRA
  (:class:`~solace.nft.ema.EMAPolicy`), which also samples the rollouts.

Both accumulate gradients over (micro-batch x term) micro-steps, each scaled by 1 / their number
(``accelerator.backward``), sync gradients across processes on the last one only, clip
(``accelerator.clip_grad_norm_``; under FSDP the norm over every shard) and take one AdamW step per chunk of
samples.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from solace.grpo.loss import gaussian_kl, ppo_clip_loss
from solace.grpo.window import window_sigmas, window_t_range
from solace.models.base import adapters_disabled
from solace.nft.ema import EMAPolicy, ema_decay
from solace.nft.loss import forward_noise, nft_loss, sample_training_timesteps, unshift
from solace.registry import Registry
from solace.sampling.rollout import Rollout
from solace.sampling.sampler import step_policy
from solace.trainer.context import UpdateContext
from solace.utils.seeding import Stream

# The config types are not imported (not even for type checking): the config checks ``train.algorithm``
# against this registry, so an import back would be a cycle. ``cfg`` is the run's
# :class:`~solace.trainer.config.SolaceConfig`, its sections (``cfg.train``, ``cfg.grpo``, ...) as named.
UPDATES: Registry[type[PolicyUpdate]] = Registry("policy update", "train.algorithm")
"""The updates ``train.algorithm`` names: classes built by ``cls.from_config(ctx, cfg)``."""


class PolicyUpdate:
    """The loop every update shares; subclasses say what one micro-step's loss is. An update sees the run
    through its :class:`~solace.trainer.context.UpdateContext` only."""

    needs_log_probs: ClassVar[bool] = True  # the sampler must keep step log-probs (SDE sampling)

    def __init__(
        self, ctx: UpdateContext, micro_batch_size: int, inner_epochs: int, updates_per_iteration: int
    ):
        self.ctx = ctx
        self.micro_batch_size = micro_batch_size
        self.inner_epochs = inner_epochs
        self.updates_per_iteration = updates_per_iteration
        self.steps = 0  # optimizer steps taken so far (the EMA schedule's clock)
        self.skipped = 0  # optimizer steps skipped for a non-finite gradient, this iteration
        self.after_step: Callable[[int], Any] | None = None  # called with ``steps`` after each step

    @classmethod
    def from_config(cls, ctx: UpdateContext, cfg: Any) -> PolicyUpdate:
        """The update with its settings of the run's config."""
        raise NotImplementedError

    def _too_few_kept(self, keep: torch.Tensor) -> bool:
        """Whether some process keeps fewer samples than this update takes optimizer steps: then every
        process skips the update (each must take the same number of steps)."""
        per_rank = keep.view(self.ctx.num_processes, -1).sum(1)
        return int(per_rank.min()) < self.updates_per_iteration

    # what a subclass defines
    def terms(self) -> int:
        """Loss terms per micro-batch (window steps, or timesteps per sample)."""
        raise NotImplementedError

    def micro_batch(self, ro: Rollout, mb: torch.Tensor, iteration: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, batch: dict[str, Any], term: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def sampling_policy(self) -> contextlib.AbstractContextManager:
        """The weights that sample the rollouts: the trained policy, unless the update keeps an old one."""
        return contextlib.nullcontext()

    def after_iteration(self) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.steps = int(state.get("steps", 0))

    # the shared loop
    def __call__(self, ro: Rollout, iteration: int) -> dict[str, float]:
        agg: dict[str, list[float]] = defaultdict(list)
        t0 = time.perf_counter()
        self.skipped = 0
        local_keep = ro.layout.local(ro.keep) if ro.keep is not None else None
        if local_keep is not None and self._too_few_kept(ro.keep):
            return {"train/skipped_steps": float(self.inner_epochs * self.updates_per_iteration)}
        for epoch in range(self.inner_epochs):
            gen = self.ctx.streams.generator(Stream.MINIBATCH_ORDER, iteration, epoch, self.ctx.rank)
            order = torch.randperm(len(ro), generator=gen)
            if local_keep is not None:  # dropped samples take no part (0 * NaN is NaN)
                order = order[local_keep[order]]
            for chunk in order.chunk(self.updates_per_iteration):
                self._optimizer_step(ro, chunk, agg, iteration, epoch)
                if self.after_step is not None:  # the trainer's LoRA EMA (lora_ema)
                    self.after_step(self.steps)
        reduce = {"ratio_min": min, "ratio_max": max}
        out = {f"train/{k}": reduce.get(k, lambda v: sum(v) / len(v))(v) for k, v in agg.items()}
        out["train/skipped_steps"] = float(self.skipped)
        out.update(self.after_iteration())
        out["time/update"] = time.perf_counter() - t0
        out["train/lr"] = self.ctx.optimizer.param_groups[0]["lr"]
        return out

    def _optimizer_step(
        self, ro: Rollout, chunk: torch.Tensor, agg: dict[str, list[float]], iteration: int, epoch: int
    ) -> None:
        """One optimizer step over the samples ``chunk``: gradients accumulate over its micro-batches and
        terms, each micro-step scaled by 1 / their number; gradients sync on the last one only."""
        c = self.ctx
        micro = list(chunk.split(self.micro_batch_size))
        n_micro = len(micro) * self.terms()
        k = 0
        for mb in micro:
            batch = self.micro_batch(ro, mb, iteration, epoch)
            for term in range(self.terms()):
                k += 1
                sync = k == n_micro or c.num_processes == 1
                with contextlib.nullcontext() if sync else c.accelerator.no_sync(c.wrapped):
                    loss, parts = self.loss(batch, term)
                    c.accelerator.backward(loss / n_micro)
                agg["loss"].append(float(loss.detach()))
                for name, v in parts.items():
                    agg[name].append(float(v))
        if c.sharded is None:  # DDP's gradients are already averaged: the local norm is the global one
            gn = c.accelerator.clip_grad_norm_(c.params, c.max_grad_norm)
        else:  # FSDP: the norm over every process's gradient shards, by the root FSDP module's clip (what
            # accelerate's clip_grad_norm_ calls only when given every parameter of the wrapped model; given
            # the LoRA alone it would clip by this process's shards)
            gn = c.sharded.clip_grad_norm_(c.max_grad_norm)
        if torch.isfinite(gn):  # the norm is all-reduced: every process takes the same decision
            agg["grad_norm"].append(float(gn))
            c.optimizer.step()
        else:
            self.skipped += 1
        c.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


@UPDATES.register("flow_grpo")
class FlowGRPOUpdate(PolicyUpdate):
    """Flow-GRPO (SOLACE Eq. 16): PPO clip on the window's step log-probs + beta KL to the reference."""

    def __init__(self, ctx: UpdateContext, train: Any, grpo: Any, sampling: Any):
        super().__init__(ctx, train.micro_batch_size, train.inner_epochs, train.updates_per_iteration)
        self.grpo, self.sampling = grpo, sampling

    @classmethod
    def from_config(cls, ctx: UpdateContext, cfg: Any) -> FlowGRPOUpdate:
        return cls(ctx, cfg.train, cfg.grpo, cfg.sampling)

    def terms(self) -> int:
        return len(self.ctx.window)

    def micro_batch(self, ro: Rollout, mb: torch.Tensor, iteration: int, epoch: int) -> dict[str, Any]:
        dev = self.ctx.device
        return {
            "z": ro.latents[mb].to(dev),
            "old": ro.log_probs[mb].to(dev),
            "adv": ro.advantages[mb].to(dev).float(),
            "cond": ro.cond.index(mb),
            "null": ro.null.index(mb),
        }

    def loss(self, b: dict[str, Any], term: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of window step ``j``: PPO clip on the recomputed log-prob + beta * KL to the LoRA-off
        reference on the same step."""
        c = self.ctx
        s, g, j = self.sampling, self.grpo, c.window[term]
        step_j = functools.partial(
            step_policy, c.adapter, b["z"][:, j], b["z"][:, j + 1], c.sigmas, j, b["cond"], b["null"],
            s.cfg_scale, s.noise_level, g.detach_uncond,
        )  # fmt: skip
        st = step_j()
        pl, pst = ppo_clip_loss(st.log_prob, b["old"][:, j], b["adv"], g.clip_range)
        loss = pl
        kl = torch.zeros((), device=c.device)
        if g.beta > 0:
            with torch.no_grad(), adapters_disabled(c.adapter.denoiser):
                ref = step_j()
            dt = c.sigmas[j + 1] - c.sigmas[j]
            kl = gaussian_kl(st.mean, ref.mean, st.std.reshape(-1), dt, g.kl_form).mean()
            loss = loss + g.beta * kl
        parts = {"policy_loss": pl.detach(), "kl": kl.detach()}
        parts.update({k: pst[k] for k in ("approx_kl", "clipfrac", "ratio_min", "ratio_max")})
        return loss, parts


def nft_timestep_domain(
    n: Any, sigmas: torch.Tensor, window: list[int]
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Where NFT's training timesteps are drawn: ``(grid, (u_min, u_max))``. With ``nft.window`` on, the
    trained window of Flow-GRPO (``grpo.rho`` / ``grpo.train_steps``: the last ceil(rho |T|) reverse steps)
    restricts them: ``grid`` mode draws among the window's sigmas (:func:`~solace.grpo.window.window_sigmas`),
    ``uniform`` mode within the t range the window covers (:func:`~solace.grpo.window.window_t_range`, taken
    back through the shift). Off (DiffusionNFT's own): every sampler sigma, ``[nft.t_min, nft.t_max)``."""
    if not n.window:
        return sigmas, (n.t_min, n.t_max)
    if n.timesteps == "grid":
        return window_sigmas(sigmas, window), (n.t_min, n.t_max)
    lo, hi = window_t_range(sigmas, window)
    return sigmas, (unshift(lo, n.shift), unshift(hi, n.shift))


@UPDATES.register("nft")
class NFTUpdate(PolicyUpdate):
    """DiffusionNFT: advantage-weighted flow matching against the EMA old policy's implicit velocities."""

    needs_log_probs = False

    def __init__(self, ctx: UpdateContext, train: Any, nft: Any):
        n = nft
        super().__init__(ctx, train.micro_batch_size, train.inner_epochs, train.updates_per_iteration)
        self.cfg = n
        schedule = functools.partial(
            ema_decay, kind=n.ema, decay=n.ema_decay, rate=n.ema_rate, max_decay=n.ema_max, delay=n.ema_delay
        )
        self.ema = EMAPolicy(ctx.params, schedule)
        self.grid, self.u_range = nft_timestep_domain(n, ctx.sigmas, ctx.window)

    @classmethod
    def from_config(cls, ctx: UpdateContext, cfg: Any) -> NFTUpdate:
        return cls(ctx, cfg.train, cfg.nft)

    def terms(self) -> int:
        return self.cfg.timesteps_per_sample

    def sampling_policy(self) -> contextlib.AbstractContextManager:
        """DiffusionNFT samples with the old policy (with decay 0: the policy at the start of the
        iteration, the same weights)."""
        return self.ema.swapped()

    def micro_batch(self, ro: Rollout, mb: torch.Tensor, iteration: int, epoch: int) -> dict[str, Any]:
        """The clean samples, and for each its training timesteps and noises, drawn from streams keyed by
        ``(iteration, global sample index, epoch)`` so they do not depend on batching or processes."""
        c, n = self.ctx, self.cfg
        lat = tuple(ro.z0.shape[1:])
        ts, eps = [], []
        for i in mb.tolist():
            g = ro.layout.start + i
            ts.append(
                sample_training_timesteps(
                    1, n.timesteps, c.streams.generator(Stream.NFT_TIMESTEPS, iteration, g, epoch),
                    sigmas=self.grid, shift=n.shift, t_min=self.u_range[0], t_max=self.u_range[1],
                    per_sample=n.timesteps_per_sample,
                )[0]
            )  # fmt: skip
            gen = c.streams.generator(Stream.NFT_NOISE, iteration, g, epoch)
            eps.append(torch.randn((n.timesteps_per_sample, *lat), generator=gen))
        dev = c.device
        return {
            "x0": ro.z0[mb].to(dev).float(),
            "t": torch.stack(ts).float().to(dev),  # (b, k)
            "eps": torch.stack(eps).to(dev),  # (b, k, *latent)
            "adv": ro.advantages[mb].to(dev).float(),
            "cond": ro.cond.index(mb),
        }

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        ad = self.ctx.adapter
        return ad.velocity(x.to(ad.dtype), t, cond).float()

    def loss(self, b: dict[str, Any], term: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The NFT loss at the ``term``-th timestep of each sample, + ``kl_beta`` mean((v - v_ref)^2) to the
        LoRA-off base (the released code's KL form)."""
        n = self.cfg
        t, x0 = b["t"][:, term], b["x0"]
        x_t = forward_noise(x0, t, b["eps"][:, term])
        with torch.no_grad(), self.ema.swapped():
            v_old = self._velocity(x_t, t, b["cond"])
        v = self._velocity(x_t, t, b["cond"])
        loss, st = nft_loss(v, v_old, x_t, t, x0, b["adv"], n.beta, n.adv_max, n.adaptive_weight)
        kl = torch.zeros((), device=v.device)
        if n.kl_beta > 0:
            with torch.no_grad(), adapters_disabled(self.ctx.adapter.denoiser):
                v_ref = self._velocity(x_t, t, b["cond"])
            kl = ((v - v_ref) ** 2).mean()
            loss = loss + n.kl_beta * kl
        parts = {"policy_loss": loss.detach() - n.kl_beta * kl.detach(), "kl": kl.detach()}
        parts.update({f"nft_{k}": v for k, v in st.items()})
        return loss, parts

    def after_iteration(self) -> dict[str, float]:
        """Move the old policy towards the trained one (theta_old <- d theta_old + (1 - d) theta)."""
        return {"train/ema_decay": self.ema.update(self.steps)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The old policy, whole tensors (under FSDP gathered from every process: call it on all)."""
        return self.ema.state_dict(self.ctx.full())

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load(state, tensors)
        self.ema.load_state_dict(tensors, self.ctx.local())


def make_update(ctx: UpdateContext, cfg: Any) -> PolicyUpdate:
    """The update ``train.algorithm`` names (a registered one: :data:`UPDATES`), built from ``ctx``."""
    return UPDATES.get(cfg.train.algorithm).from_config(ctx, cfg)
