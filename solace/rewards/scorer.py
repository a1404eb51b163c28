"""The self-confidence scorer: one place where the reward of :mod:`solace.rewards.self_confidence` meets a
model. The trainer, ``solace score / rerank / analyze`` and the bench scripts all score through it.

:class:`SelfConfidenceCfg` holds the reward's settings (probes, probed timesteps, weighting, the released
code's switches, the variants) and checks them (:meth:`SelfConfidenceCfg.check`);
:class:`SelfConfidenceScorer` binds them to an adapter's velocity:

* ``online`` scores with the policy being trained, ``online=False`` with the LoRA-off base (offline);
* the velocity is the **conditional** one (paper), the CFG one (``cfg_in_reward``), and ``contrastive``
  scores ``S_t(c) - S_t(empty)`` with the same probes for both terms;
* probes are drawn per prompt group from one seed each (``probe_mode="group"``, shared by the group, Eq. 9)
  or fresh per sample and timestep (``per_sample_timestep``, released code); antithetic (Eq. 9) or
  independent (``antithetic=False``, the released FLUX script);
* ``probe_guidance`` runs the probes of a guidance-distilled model (FLUX) with another guidance-embedding
  value than sampling (the released FLUX script probes with 1.0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from solace.errors import ConfigError, check
from solace.grpo.window import RELEASED_RULES, released_steps
from solace.models.base import Conditioning, FlowModelAdapter, adapters_disabled
from solace.rewards.self_confidence import (
    VelocityFn,
    aggregate,
    check_num_probes,
    confidence_scores,
    draw_probes,
    edit_contrast,
    probe_mse,
)
from solace.sampling.sampler import cfg_velocity
from solace.utils import interrupt

Weighting = Literal["uniform", "t(1-t)"]
ProbeMode = Literal["group", "per_sample_timestep"]


@dataclass
class SelfConfidenceCfg:
    """Settings of the self-confidence reward (the paper's choices are the defaults)."""

    num_probes: int = 8  # K, even (antithetic pairs)
    delta: float = 1e-3  # S_t = -log(MSE_t + delta)
    # all | later_half (steps T/2..T-1) | released_sd3 / released_flux (the released scripts' steps: 4..8 /
    # 5..8 of 10) | a comma list of step indices
    timesteps: str = "all"
    weighting: Weighting = "uniform"  # w(t): uniform (paper) | t(1-t) (released code)
    standardize: bool = False  # per-timestep standardisation of S_t (released code)
    # the standardisation's scope: 0 = the whole gathered iteration; b = each batch of b samples (the
    # released code: one process's sampling batch, sample.train_batch_size)
    standardize_batch: int = 0
    # 0: a batch is b consecutive samples; m: the samples of each m prompt groups (at most the iteration's)
    # are shuffled before being cut into batches, so batches mix prompts (the released sampler: processes x
    # batch / G groups a round)
    standardize_shuffle_groups: int = 0
    probe_mode: ProbeMode = "group"  # group (paper) | per_sample_timestep (released code)
    antithetic: bool = True  # probes in pairs eps[m + K/2] = -eps[m] (Eq. 9); False: K independent draws
    # guidance-embedding value of the probes (FLUX only); 0: the model's own (model.guidance_scale)
    probe_guidance: float = 0.0
    online: bool = True  # score with the policy being trained; False: the frozen base (offline)
    cfg_in_reward: bool = False  # variant: score with the CFG velocity instead of the conditional one
    contrastive: bool = False  # variant: S_t(c) - S_t(empty prompt)
    # variant: S_t(c) against S_t of the prompt's minimal edits c' (colour, count, relation,
    # binding, shape), scored with the same probes and timesteps: off | mean | max | lse (log-posterior of c)
    edits: Literal["off", "mean", "max", "lse"] = "off"
    edit_temperature: float = 1.0  # lse: tau
    max_edits: int = 8  # at most this many edits of a prompt (their deterministic order), 1 + E passes
    negatives: str = ""  # optional .jsonl of user negatives per prompt ({"prompt": ..., "negatives": [...]})
    max_batch: int = 256  # rows per no-grad forward in the reward pass

    def check(self, num_steps: int, prefix: str = "reward.self_confidence") -> None:
        """Ranges and the probed timesteps (the choice fields are checked by their types)."""
        check_num_probes(self.num_probes, f"{prefix}.num_probes", self.antithetic)
        check(self.delta > 0, f"{prefix}.delta", f"must be > 0 (it keeps -log finite), got {self.delta}")
        check(self.max_batch >= 1, f"{prefix}.max_batch", f"must be >= 1, got {self.max_batch}")
        check(self.max_edits >= 1, f"{prefix}.max_edits", f"must be >= 1, got {self.max_edits}")
        check(
            self.edit_temperature > 0,
            f"{prefix}.edit_temperature",
            f"must be > 0, got {self.edit_temperature}",
        )
        check(
            not (self.contrastive and self.edits != "off"),
            f"{prefix}.edits",
            "contrasts with the prompt's edits; it does not combine with contrastive (the empty prompt)",
        )
        probe_steps(self.timesteps, num_steps, f"{prefix}.timesteps")
        check(
            self.standardize_batch >= 0,
            f"{prefix}.standardize_batch",
            f"must be >= 0 (0: the whole iteration), got {self.standardize_batch}",
        )
        check(
            self.standardize or self.standardize_batch == 0,
            f"{prefix}.standardize_batch",
            f"is the scope of the standardisation; set {prefix}.standardize=true or standardize_batch=0",
        )
        check(
            self.standardize_shuffle_groups >= 0,
            f"{prefix}.standardize_shuffle_groups",
            f"must be >= 0 (0: no shuffle), got {self.standardize_shuffle_groups}",
        )
        check(
            self.standardize_batch > 0 or self.standardize_shuffle_groups == 0,
            f"{prefix}.standardize_shuffle_groups",
            f"shuffles samples into standardisation batches; set {prefix}.standardize_batch too, or 0",
        )
        check(
            self.probe_guidance >= 0,
            f"{prefix}.probe_guidance",
            f"must be >= 0 (0: the model's own guidance), got {self.probe_guidance}",
        )


def settings_with(base: SelfConfidenceCfg, overrides: dict, field: str) -> SelfConfidenceCfg:
    """``base`` with some of its fields replaced (a reward component's ``kwargs``, e.g. one logged form
    ``{contrastive: true}`` beside the run's own settings), each key and value checked against the schema:
    an unknown key or a wrong type is a ConfigError naming ``field`` and the fix."""
    if not overrides:
        return base
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), dict(overrides))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(field, f"{msg} (it takes reward.self_confidence's keys and values)") from None


def probe_steps(spec: str, num_steps: int, field: str = "reward.self_confidence.timesteps") -> list[int]:
    """Which sampler timesteps the reward probes: ``all``, ``later_half`` (the half nearest the data,
    ``num_steps // 2 .. num_steps - 1``), ``released_sd3`` / ``released_flux`` (exactly the steps the
    authors' released SD3 / FLUX script probes, :func:`solace.grpo.window.released_steps`: 4..8 / 5..8 of
    10) or a comma list of step indices."""
    if spec == "all":
        return list(range(num_steps))
    if spec == "later_half":
        return list(range(num_steps // 2, num_steps))
    if spec in RELEASED_RULES:
        idx = released_steps(num_steps, RELEASED_RULES[spec])
        check(len(idx) > 0, field, f"{spec} probes no step at sampling.num_steps = {num_steps} (needs >= 2)")
        return idx
    try:
        idx = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            field,
            f"must be 'all', 'later_half', 'released_sd3', 'released_flux' or a comma list of step indices, "
            f"got {spec!r}",
        ) from None
    check(
        len(idx) > 0 and all(0 <= i < num_steps for i in idx),
        field,
        f"indices must lie in 0..{num_steps - 1}, got {spec!r}",
    )
    return idx


class SelfConfidenceScorer:
    """Self-confidence of clean latents under a model (Eqs. 9-14), with the settings' variants."""

    def __init__(self, settings: SelfConfidenceCfg | None = None, cfg_scale: float = 1.0):
        self.cfg = settings or SelfConfidenceCfg()
        self.cfg_scale = cfg_scale  # used only by the cfg_in_reward variant

    def timesteps(self, sigmas: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """The probed step indices and their timesteps: the sampler's own ``sigmas[j]`` (``sigmas[T] = 0`` is
        the data itself and never probed), kept above 0."""
        idx = probe_steps(self.cfg.timesteps, sigmas.numel() - 1)
        return idx, sigmas[idx].clamp(min=1e-4)

    def _velocity(
        self, adapter: FlowModelAdapter, cond: Conditioning, null: Conditioning | None
    ) -> VelocityFn:
        """``v(z_t, t, idx)`` conditioned on row ``idx`` of ``cond``: conditional, or CFG with ``null``."""
        use_cfg = self.cfg.cfg_in_reward

        def vel(z: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            interrupt.check()  # a requested stop ends a stoppable reward pass between forwards
            rows = idx.cpu()
            if use_cfg:
                return cfg_velocity(adapter, z, t, cond.index(rows), null.index(rows), self.cfg_scale)
            return adapter.velocity(z.to(adapter.dtype), t, cond.index(rows)).float()

        return vel

    @contextlib.contextmanager
    def _model(self, adapter: FlowModelAdapter) -> Iterator[None]:
        """The model that scores: the policy (online) or the LoRA-off base (offline), with the probes'
        guidance-embedding value where ``probe_guidance`` sets one (restored on exit)."""
        g = self.cfg.probe_guidance
        check(
            not g or adapter.guidance_scale is not None,
            "reward.self_confidence.probe_guidance",
            f"the {adapter.name} model has no guidance embedding; set it to 0",
        )
        before = adapter.guidance_scale
        with contextlib.nullcontext() if self.cfg.online else adapters_disabled(adapter.denoiser):
            try:
                if g:
                    adapter.guidance_scale = float(g)
                yield
            finally:
                if g:
                    adapter.guidance_scale = before

    @torch.no_grad()
    def scores(
        self,
        adapter: FlowModelAdapter,
        z0: torch.Tensor,
        cond: Conditioning,
        null: Conditioning | None,
        probe_t: torch.Tensor,
        group_index: torch.Tensor,
        probe_seeds: Sequence[int],
        edit_conds: Sequence[Conditioning] | None = None,
    ) -> torch.Tensor:
        """Per-timestep scores S_t (B, T'). Rows with the same ``group_index`` g share the probes drawn from
        ``probe_seeds[g]`` (in ``per_sample_timestep`` mode fresh ones per row and timestep from that seed).
        ``null`` (one row per latent) is needed by the CFG-scored and contrastive variants; ``edit_conds[g]``
        (the E edits of group g's prompt, one row each) by the ``edits`` variant."""
        sc = self.cfg
        check(
            edit_conds is not None or sc.edits == "off",
            "edit_conds",
            "the edits variant needs the conditioning of each prompt's edits",
        )
        check(
            null is not None or not (sc.cfg_in_reward or sc.contrastive),
            "null",
            "the CFG-scored and contrastive variants need the empty-prompt conditioning",
        )
        lat = tuple(z0.shape[1:])
        out = torch.empty(z0.shape[0], probe_t.numel(), device=z0.device)
        group_index = group_index.long()
        for g in torch.unique(group_index).tolist():
            rows = (group_index == g).nonzero().flatten()
            gen = torch.Generator().manual_seed(int(probe_seeds[g]))
            probes = draw_probes(
                sc.num_probes,
                lat,
                rows.numel(),
                probe_t.numel(),
                sc.probe_mode,
                gen,
                antithetic=sc.antithetic,
            )
            probes = probes.to(z0.device, torch.float32)
            c_rows = cond.index(rows.cpu())
            n_rows = null.index(rows.cpu()) if null is not None else None
            z_rows = z0[rows].float()
            with self._model(adapter):
                mse = probe_mse(
                    self._velocity(adapter, c_rows, n_rows), z_rows, probe_t, probes, sc.max_batch,
                    sc.antithetic,
                )  # fmt: skip
                s = confidence_scores(mse, sc.delta)
                if sc.edits != "off":
                    s = edit_contrast(
                        s,
                        self._edit_scores(adapter, z_rows, edit_conds[g], n_rows, probe_t, probes),
                        sc.edits,
                        sc.edit_temperature,
                    )
                if sc.contrastive:
                    mse_u = probe_mse(
                        self._velocity(adapter, n_rows, n_rows), z_rows, probe_t, probes, sc.max_batch,
                        sc.antithetic,
                    )  # fmt: skip
                    s = s - confidence_scores(mse_u, sc.delta)
            out[rows] = s
        return out

    def _edit_scores(
        self,
        adapter: FlowModelAdapter,
        z: torch.Tensor,
        edits: Conditioning,
        null: Conditioning | None,
        probe_t: torch.Tensor,
        probes: torch.Tensor,
    ) -> torch.Tensor:
        """S_t (B, E, T') of B latents under each of E edit prompts, with exactly the probes and timesteps
        of the prompt's own scores: the B * E rows go through one batched pass."""
        B, E = z.shape[0], len(edits)
        rows = [e for e in range(E) for _ in range(B)]  # edit-major: row e * B + b is latent b under edit e
        cond = edits.index(rows)
        null_rep = null.index([b for _ in range(E) for b in range(B)]) if null is not None else None
        z_rep = z.repeat(E, *([1] * (z.ndim - 1)))
        p_rep = probes if probes.ndim == z.ndim else probes.repeat(E, *([1] * (probes.ndim - 1)))
        mse = probe_mse(
            self._velocity(adapter, cond, null_rep), z_rep, probe_t, p_rep, self.cfg.max_batch,
            self.cfg.antithetic,
        )  # fmt: skip
        return confidence_scores(mse, self.cfg.delta).reshape(E, B, -1).transpose(0, 1)

    def aggregate(
        self, scores: torch.Tensor, probe_t: torch.Tensor, batch_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """R from S_t (Eqs. 13-14); ``scores`` holds the whole (gathered) batch when standardising, over all
        of it or over each batch of ``batch_ids`` (:func:`~solace.rewards.self_confidence.
        standardization_batches`)."""
        return aggregate(scores, probe_t, self.cfg.weighting, self.cfg.standardize, batch_ids)

    @torch.no_grad()
    def score_group(
        self,
        adapter: FlowModelAdapter,
        z0: torch.Tensor,
        cond: Conditioning,
        probe_t: torch.Tensor,
        probe_seed: int,
        null: Conditioning | None = None,
        edit_cond: Conditioning | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt group: ``(R (B,), S (B, T'))`` on the CPU, one set of probes from ``probe_seed``.
        ``cond`` (and ``null``) hold one row per latent or a single row shared by all."""
        B = z0.shape[0]
        if len(cond) == 1 and B > 1:
            cond = cond.index([0] * B)
        if null is not None and len(null) == 1 and B > 1:
            null = null.index([0] * B)
        ts = probe_t.to(z0.device)
        edits = [edit_cond] if edit_cond is not None else None
        s = self.scores(adapter, z0, cond, null, ts, torch.zeros(B, dtype=torch.long), [probe_seed], edits)
        return self.aggregate(s, ts).cpu(), s.cpu()
