"""The SOLACE / Flow-GRPO training loop. It only orchestrates; the math lives in sampling/, rewards/, grpo/.

One iteration (paper Alg. 1):

1. :meth:`Trainer.sample_rollout`: ``P`` prompts (the same on every process, from ``(seed, iteration)``),
   ``G`` samples each, split evenly across processes (:class:`~solace.sampling.rollout.GroupLayout`). Each
   sample's initial and SDE noise depends only on ``(seed, iteration, sample index)``
   (:class:`~solace.utils.seeding.TrainStreams`), so the samples do not depend on the number of processes.
   SDE sampling with CFG keeps every latent and step log-prob (no grad): a typed
   :class:`~solace.sampling.rollout.Rollout`.
2. :meth:`Trainer.score`: self-confidence on the clean latents (no CFG, probes shared per group) and/or
   external rewards on decoded images, gathered across processes; group-relative advantages over the
   gathered batch, each process keeping its own slice.
3. :meth:`Trainer.update`: for the last ``ceil(rho |T|)`` steps, the PPO-clipped loss on the recomputed
   log-probs plus ``beta`` KL to the LoRA-off reference; gradients accumulate over (micro-batch x window
   step) micro-steps, each scaled by 1 / (the number of micro-steps actually trained), then one optimizer
   step per update.
4. Logging (progress bar, the experiment trackers of ``train.log_with``, CSV), collapse monitor, periodic
   evaluation (an :class:`~solace.evaluation.evaluators.Evaluator` chosen from the config: the toy world's
   exact evaluator or registry metrics), image grids, atomic checkpoints; at the end the LoRA is exported and
   a report written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from solace.errors import ConfigError
from solace.evaluation.evaluators import make_evaluator
from solace.evaluation.sharding import accelerate_shards
from solace.grpo.advantages import drop_zero_advantages
from solace.grpo.window import parse_steps, train_window
from solace.models.base import Conditioning
from solace.models.lora import (
    add_lora,
    load_lora,
    lora_header,
    lora_parameters,
    lora_state_dict,
    save_lora,
    set_lora_state_dict,
)
from solace.models.text_cache import ConditioningLRU
from solace.nft.ema import EMAPolicy, ema_decay
from solace.prompts import Prompt, PromptSource
from solace.rewards.mixture import SELF_CONFIDENCE, RewardMixture
from solace.rewards.self_confidence import standardization_batches
from solace.sampling.generate import generate_shared
from solace.sampling.rollout import GroupLayout, Rollout
from solace.sampling.sampler import sample
from solace.trainer.checkpoint import (
    clean_partial,
    latest_checkpoint,
    load_checkpoint,
    load_update_tensors,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from solace.trainer.config import SolaceConfig, eval_setup, to_yaml
from solace.trainer.distributed import accelerator_kwargs, check_backend
from solace.trainer.fsdp import (
    ShardedParams,
    check_lora_units,
    check_uniform_dtype,
    full_optimizer_state,
    local_optimizer_state,
    prepare_plugin,
)
from solace.trainer.guard import (
    NonFiniteError,
    NonFiniteGuard,
    all_zero,
    drop_nonfinite,
    group_advantages_masked,
    nonfinite_weights_message,
    weights_finite,
)
from solace.trainer.inputs import check_inputs, record_inputs
from solace.trainer.model_card import write_card
from solace.trainer.model_setup import load_model, offload_text_encoders
from solace.trainer.monitor import CollapseMonitor, eval_stats, latent_texture
from solace.trainer.precision import (
    ACCELERATE_NAME,
    LAUNCHER,
    check_accelerate,
    launcher_precision,
    set_tf32,
)
from solace.trainer.resume_check import check_resume, read_recorded_config, truncate_log
from solace.trainer.runlock import RUN_FILES, RunLock, clear_earlier_run
from solace.trainer.signals import RunInterrupted, StopRequest
from solace.trainer.tracking import Trackers, log_with
from solace.trainer.updates import make_update
from solace.utils import interrupt
from solace.utils.files import append_csv_row, earlier_run
from solace.utils.interrupt import StopNow
from solace.utils.seeding import Stream, TrainStreams

EMA_PREFIX = "lora_ema."  # the LoRA EMA's tensors in a checkpoint's update.safetensors


class Trainer:
    def __init__(self, cfg: SolaceConfig, accelerator: Any | None = None, allow_changes: bool = False):
        self.created = time.time()  # before the trackers open their files (--overwrite keeps those)
        self.cfg = cfg
        self.allow_changes = allow_changes  # --resume with a changed config: proceed (listed) or stop
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.out = Path(cfg.train.output_dir)
        self.acc = self._accelerator(accelerator)
        self.trackers = Trackers(self.acc, cfg.train.tracker_project, self.out, dataclasses.asdict(cfg))
        self.is_main = self.acc.is_main_process
        self.rank = self.acc.process_index
        self.layout = self._layout()
        self.adapter = self._load_model()
        self.params, self.opt, self.wrapped = self._trainable()
        s = cfg.sampling
        self.rewards = RewardMixture(cfg.reward.components, cfg.reward.self_confidence, s.cfg_scale)
        self.streams = TrainStreams(cfg.train.seed)
        self.source = PromptSource(cfg.data.train_prompts, cfg.train.seed)
        self.sigmas = self.adapter.sigmas(s.num_steps)
        g = cfg.grpo
        self.window = (
            parse_steps(g.train_steps, s.num_steps) if g.train_steps else train_window(s.num_steps, g.rho)
        )
        # S_t is probed at the sampler's own timesteps (sigmas[0..T-1]; sigmas[T] = 0 is the data itself).
        self.probe_idx, self.probe_t = self.rewards.confidence.timesteps(self.sigmas)
        self.negatives = None  # user negatives of the edits variant, read once
        if cfg.reward.self_confidence.negatives:
            from solace.rewards.prompt_edits import load_negatives

            self.negatives = load_negatives(cfg.reward.self_confidence.negatives)
        self.updater = make_update(self)
        self.lora_ema = self._lora_ema()  # lora_ema: what evaluations and the export use, or None
        self._cond_cache = ConditioningLRU(cfg.model.embedding_lru_size)
        self.null = self.adapter.encode_prompts([s.negative_prompt])  # CFG's null (default: empty prompt)
        offload_text_encoders(self)  # model.offload_text_encoders: the run's prompts encoded, then offloaded
        mc = cfg.monitor
        self.monitor = CollapseMonitor(
            mc.std_drop, mc.foreground_drop, mc.reward_spike_z, mc.window, mc.accuracy_drop
        )
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite)
        self.start_iteration = 0
        self.stopped_at = cfg.train.iterations
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        # every process samples its block of each evaluation and image grid and receives the others'
        # (shards; under DDP through the bare module, see training_forwards; under FSDP with as many forwards
        # as the others), the main one writes; metric models load here, before training, on every process;
        # None: nothing to evaluate
        self.shards = accelerate_shards(self.acc, pad=self.sharded is not None)
        self.evaluator = make_evaluator(
            eval_setup(cfg, self.eval_cfg_scale),
            self.adapter,
            self.out,
            writes=self.is_main,
            shards=self.shards,
        )

    def _accelerator(self, given: Any | None) -> Any:
        """accelerate's Accelerator on the configured device, precision (bf16 autocast, fp16 refused:
        precision.py) and process-group settings (distributed.py), or the ``given`` one (which brings its
        own trackers and process group), checked against the config; DeepSpeed refused with the reason."""
        from accelerate import Accelerator

        t = self.cfg.train
        if t.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda asked for, but torch sees no GPU; use auto or cpu")
        cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
        if given is None:
            check_accelerate(t.mixed_precision, launcher_precision(os.environ), LAUNCHER)
        acc = given or Accelerator(
            cpu=cpu,
            mixed_precision=ACCELERATE_NAME[t.mixed_precision],
            log_with=log_with(t.log_with, self.out),
            kwargs_handlers=accelerator_kwargs(t.process_group_timeout_minutes),
        )
        check_backend(acc.distributed_type)
        check_accelerate(t.mixed_precision, acc.mixed_precision, "the Accelerator the trainer runs with")
        set_tf32(t.tf32, acc.device.type)
        return acc

    def _layout(self) -> GroupLayout:
        s, world = self.cfg.sampling, self.acc.num_processes
        total = s.prompts_per_step * s.group_size
        if total % world:
            raise ConfigError(
                "sampling.group_size",
                f"prompts_per_step * group_size = {total} samples must split evenly over {world} processes",
            )
        return GroupLayout.split(s.prompts_per_step, s.group_size, self.rank, world)

    def _load_model(self) -> Any:
        return load_model(self.cfg.model, self.acc.device)

    def _trainable(self) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.nn.Module]:
        """LoRA on the denoiser (its A matrices drawn from ``train.seed``), AdamW, and the module that runs
        the training forwards (DDP- or FSDP-wrapped on several processes; under FSDP ``self.sharded`` gathers
        the LoRA and the wrapped module runs every forward, see :meth:`training_forwards`)."""
        m, o = self.cfg.model, self.cfg.optim
        den = self.adapter.denoiser
        den.requires_grad_(False)
        targets = m.lora.target_modules or self.adapter.lora_target_modules
        torch.manual_seed(self.cfg.train.seed)  # same seed, same initial LoRA
        if m.lora.init_from and m.lora.merge_init:
            load_lora(den, m.lora.init_from, merge=True, alpha=m.lora.alpha)  # alpha: a file without metadata
            add_lora(den, m.lora.rank, m.lora.alpha, targets)
        else:
            add_lora(den, m.lora.rank, m.lora.alpha, targets, init_from=m.lora.init_from)
        params = lora_parameters(den)
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.sharded: ShardedParams | None = None
        if self.acc.num_processes == 1:
            if self.acc.mixed_precision != "no":  # accelerate's autocast around the denoiser's forward (the
                self.acc.prepare_model(den)  # same as prepare() below does under several processes)
            return params, opt, den
        from accelerate.utils import DistributedType

        fsdp = self.acc.distributed_type == DistributedType.FSDP
        if fsdp:  # bf16: FSDP's mixed precision (bf16 compute, float32 shards and gradient reductions)
            ignored = self.adapter.fsdp_ignored_modules
            prepare_plugin(self.acc.state.fsdp_plugin, ignored, self.acc.mixed_precision)
            check_uniform_dtype(den, ignored)
        wrapped, opt = self.acc.prepare(den, opt)
        if fsdp:
            check_lora_units(wrapped, params)
            self.sharded = ShardedParams(wrapped, params)
            self.adapter.forward_module = wrapped  # the parameters are shards: every forward gathers them
        return params, opt, wrapped

    def _lora_ema(self) -> EMAPolicy | None:
        """The EMA of the LoRA (``lora_ema``), moved after each optimizer step by the update; None: off."""
        e = self.cfg.lora_ema
        if not e.enabled:
            return None
        ema = EMAPolicy(
            self.params, functools.partial(ema_decay, kind="warmup", max_decay=e.max_decay, every=e.every)
        )
        self.updater.after_step = ema.update
        return ema

    def _evaluated_weights(self) -> contextlib.AbstractContextManager:
        """Inside, the LoRA holds the weights that are evaluated and exported: its EMA with ``lora_ema``
        (the trained weights come back on exit, bit for bit), else the trained weights themselves."""
        return self.lora_ema.swapped() if self.lora_ema is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def training_forwards(self) -> Iterator[None]:
        """Inside, the adapter's forwards go through the DDP-wrapped module: the policy update's, which every
        process runs in step (DDP's gradient hooks need them). Outside, under DDP, the bare module runs them
        (the same parameters): sampling, rewards, evaluations, image grids, so that a forward some processes
        run and others not (an evaluation's blocks differ) can never start a collective (DDP's buffer
        broadcast, see :func:`~solace.trainer.distributed.accelerator_kwargs`). Under FSDP the wrapped module
        runs every forward (it gathers the sharded parameters) and every process runs each."""
        if self.acc.num_processes == 1 or self.sharded is not None:
            yield
            return
        self.adapter.forward_module = self.wrapped
        try:
            yield
        finally:
            self.adapter.forward_module = None

    def _whole_lora(self, writeback: bool = False) -> contextlib.AbstractContextManager:
        """Inside, the LoRA parameters are whole tensors: under FSDP gathered on every process (a collective;
        ``writeback`` returns changes to the shards), otherwise they already are."""
        return self.sharded.summoned(writeback) if self.sharded is not None else contextlib.nullcontext()

    @property
    def eval_cfg_scale(self) -> float:
        """CFG of evaluations and image grids: ``eval.cfg_scale``, else the sampling scale."""
        return self.cfg.eval.cfg_scale or self.cfg.sampling.cfg_scale

    # ------------------------------------------------------------------ helpers
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode each prompt once and reuse it (an LRU of ``model.embedding_lru_size`` prompts in CPU
        memory): the rows on the CPU, for the caller to move to the device."""
        return self._cond_cache(prompts, self.adapter.encode_prompts)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return t
        return self.acc.gather(t.to(self.acc.device).contiguous()).cpu()

    def _warn(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"WARNING {message}")

    def _log(self, scalars: dict[str, float], step: int) -> None:
        """The finite scalars to every tracker of ``train.log_with`` (main process)."""
        self.trackers.log(scalars, step)

    def _batches(self, n: int) -> list[slice]:
        """Slices of ``sampling.batch_size`` samples: the forwards of sampling and decoding."""
        bs = self.cfg.sampling.batch_size
        return [slice(b, b + bs) for b in range(0, n, bs)]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_rollout(self, iteration: int) -> Rollout:
        """Sample this process's share of the iteration's groups with the SDE sampler and CFG."""
        s, lay, dev = self.cfg.sampling, self.layout, self.acc.device
        t0 = time.perf_counter()
        prompts = self.source.for_iteration(iteration, s.prompts_per_step)
        cond = self.encode([prompts[g].text for g in lay.groups]).to(dev)
        null = self.null.to(dev).expand(len(cond))  # one row seen len(cond) times, not copied
        lat = self.adapter.latent_shape()
        noise_of = lay.groups if s.same_init_noise else lay.indices  # one z_1 per group, or per sample
        init = torch.stack([self.streams.initial_noise(iteration, k, lat) for k in noise_of])
        step_noise = torch.stack(
            [self.streams.sde_noise(iteration, i, s.num_steps, lat) for i in lay.indices]
        )
        sde_steps = self.window if s.sde_window_only else None
        with self.updater.sampling_policy():  # DiffusionNFT samples with its old policy
            trajs = [
                sample(
                    self.adapter,
                    cond.index(sl),
                    null.index(sl),
                    self.sigmas,
                    init[sl].to(dev),
                    s.cfg_scale,
                    s.noise_level,
                    sde_steps,
                    step_noise=step_noise[sl].to(dev),
                )  # fmt: skip
                for sl in self._batches(len(cond))
            ]
        latents = torch.cat([t.latents for t in trajs])
        log_probs = torch.cat([t.log_probs for t in trajs])
        ro = Rollout(prompts, lay, cond, null, latents, log_probs)
        ro.stats["time/sampling"] = time.perf_counter() - t0
        return ro

    def collect(self, iteration: int) -> Rollout:
        """Sample and score one iteration: this process's rollout with its advantages and statistics."""
        ro = self.sample_rollout(iteration)
        ro.stats.update(self.score(ro, iteration))
        return ro

    # ------------------------------------------------------------------ rewards and advantages
    def _confidence_scores(self, ro: Rollout, iteration: int) -> torch.Tensor:
        """This process's per-timestep self-confidence S_t (n, T'), probes from the run's named streams."""
        lay = ro.layout
        sc = self.cfg.reward.self_confidence
        if sc.probe_mode == "per_sample_timestep":
            groups = torch.arange(len(ro))  # fresh probes for every sample: one "group" per sample
            seeds = [self.streams.seed_of(Stream.SAMPLE_PROBES, iteration, i) for i in lay.indices]
            prompt_of = lay.groups
        else:
            groups = torch.tensor(lay.groups)
            seeds = [self.streams.seed_of(Stream.GROUP_PROBES, iteration, g) for g in range(lay.num_groups)]
            prompt_of = list(range(lay.num_groups))
        edits = None
        if sc.edits != "off":  # each scoring group's prompt against its minimal edits
            dev = ro.z0.device
            edits = [self.encode(self._edit_prompts(ro.prompts[p])).to(dev) for p in prompt_of]
        t = self.probe_t.to(ro.z0.device)
        return self.rewards.confidence.scores(
            self.adapter, ro.z0, ro.cond, ro.null, t, groups, seeds, edit_conds=edits
        ).cpu()

    def _edit_prompts(self, prompt: Prompt) -> list[str]:
        from solace.rewards.prompt_edits import candidate_edits

        sc = self.cfg.reward.self_confidence
        return candidate_edits(prompt.text, prompt.meta, self.negatives, sc.max_edits)

    @torch.no_grad()
    def score(self, ro: Rollout, iteration: int) -> dict[str, float]:
        """Every reward of the whole (gathered) batch, mixed; sets ``ro.advantages`` to this process's
        group-relative advantages; returns the reward and batch statistics."""
        t0 = time.perf_counter()
        comps: dict[str, torch.Tensor] = {}
        scores = None
        if self.rewards.uses_self_confidence:
            scores = self._gather(self._confidence_scores(ro, iteration))
            batches = self._standardization_batches(iteration)
            comps[SELF_CONFIDENCE] = self.rewards.confidence.aggregate(scores, self.probe_t, batches)
        images = None
        if self.rewards.external or self.adapter.wants_batch_images:
            images = torch.cat([self.adapter.decode(ro.z0[sl]).cpu() for sl in self._batches(len(ro))])
        if self.rewards.external:
            for name, r in self.rewards.external_rewards(images, ro.texts, ro.metas).items():
                comps[name] = self._gather(r)
        total = self.rewards.combine(comps)
        t_reward = time.perf_counter() - t0
        adv, keep, dropped, n_zero = self._advantages(ro, total)
        ro.rewards = ro.layout.local(total)
        if scores is not None:
            ro.confidence = ro.layout.local(scores)
        flat = all_zero(adv)
        if flat:
            self._warn(
                "every advantage is 0 (rewards tie within every group): no policy signal this iteration"
            )
        kept = total if not dropped else total[keep]
        stats = {
            "reward/mean": float(kept.mean()),
            "reward/std": float(kept.std()) if len(kept) > 1 else math.nan,
        }
        stats.update({"guard/dropped": float(dropped), "guard/zero_advantages": float(flat)})
        if self.cfg.grpo.drop_zero_advantages:
            stats["adv/zero_dropped"] = float(n_zero)
        stats.update({f"reward/{k}_mean": float(v.mean()) for k, v in comps.items()})
        if scores is not None:
            stats.update(
                {
                    f"self_confidence/S_t{j:02d}": float(scores[:, c].mean())
                    for c, j in enumerate(self.probe_idx)
                }
            )
        stats.update({"adv/abs_mean": float(adv.abs().mean()), "adv/max": float(adv.max())})
        stats.update(self._sample_statistics(ro, images))
        stats["time/reward"] = t_reward
        return stats

    def _standardization_batches(self, iteration: int) -> torch.Tensor | None:
        """The batch of each of the iteration's samples that S_t is standardised over
        (``reward.self_confidence.standardize_batch``); None: the whole gathered iteration. A function of
        the global sample index and the run's streams, the same on every process."""
        sc = self.cfg.reward.self_confidence
        if not (sc.standardize and sc.standardize_batch):
            return None
        gen = self.streams.generator(Stream.STANDARDIZE_BATCHES, iteration, 0)
        lay = self.layout
        return standardization_batches(
            lay.total, sc.standardize_batch, lay.group_size, sc.standardize_shuffle_groups, gen
        )

    def _advantages(self, ro: Rollout, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Group-relative advantages of the gathered rewards (this process's share set on ``ro``), with the
        samples the update leaves out (``ro.keep``): non-finite rewards, and with
        ``grpo.drop_zero_advantages`` zero advantages. Returns ``(adv, keep, dropped, zero_dropped)``."""
        g, groups = self.cfg.grpo, ro.layout.all_groups()
        keep, dropped = drop_nonfinite(total, groups)  # a non-finite reward leaves its group and the update
        adv = group_advantages_masked(
            total, groups, keep, global_std=g.global_std, eps=g.adv_eps, clip=g.adv_clip
        )
        ro.advantages = ro.layout.local(adv)
        if dropped:
            ro.keep = keep
            self._warn(
                f"{dropped} sample(s) with a non-finite reward dropped from their groups and the update"
            )
        n_zero = 0
        if g.drop_zero_advantages:  # Flow-GRPO's mask: no policy signal, no part in the loss (KL included)
            ro.keep, n_zero = drop_zero_advantages(
                adv, ro.keep, self.acc.num_processes, self.updater.updates_per_iteration
            )
        return adv, keep, dropped, n_zero

    def _sample_statistics(self, ro: Rollout, images: torch.Tensor | None) -> dict[str, float]:
        """Batch means of what the collapse monitor watches and the model's own batch statistics
        (:meth:`~solace.models.base.AdapterBase.batch_statistics`)."""
        stats = {"monitor/texture": float(self._gather(latent_texture(ro.z0).cpu()).mean())}
        if images is not None:
            for k, v in self.adapter.batch_statistics(images, ro.metas).items():
                stats[k] = float(self._gather(v).mean())
        return stats

    # ------------------------------------------------------------------ policy update
    def update(self, ro: Rollout, iteration: int) -> dict[str, float]:
        """The configured policy update (``train.algorithm``, :mod:`solace.trainer.updates`), its forwards
        through the wrapped module (:meth:`training_forwards`)."""
        with self.training_forwards():
            return self.updater(ro, iteration)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, Any] | None:
        """Evaluate with the configured evaluator (None where nothing evaluates): every process samples its
        block and gets the same record (:mod:`solace.evaluation.sharding`); logged, kept in ``evals``, its
        image statistics compared with the base's by the monitor."""
        if self.evaluator is None:
            return None
        with self._stoppable(), self._evaluated_weights():
            out = self.evaluator.evaluate(iteration)
        self._log(self.evaluator.scalars(out), iteration)
        if out.get("grid") and self.is_main:
            self.trackers.log_image("eval/grid", self.out / out["grid"], iteration)
        if self.evals and self.cfg.monitor.enabled:
            for w in self.monitor.update_eval(iteration, eval_stats(self.evals[0]), eval_stats(out)):
                self._warn(f"collapse monitor: {w}")
        self.evals.append(out)
        return out

    def save_images(self, iteration: int) -> Path | None:
        """Image grid of fixed prompts and seeds (``eval.image_prompts``; on the toy world one held-out
        prompt per category), 4 samples a row: every process samples its block, the main one writes."""
        from solace.utils.images import save_grid

        prompts = (
            self.cfg.eval.image_prompts
            or self.adapter.image_prompts()
            or [p.text for p in self.source.for_iteration(0, 4)]
        )
        with self._stoppable(), self._evaluated_weights():
            imgs = generate_shared(
                self.adapter, prompts, 4, self.cfg.eval.num_steps, self.eval_cfg_scale, self.shards,
                "grid", seed=self.cfg.train.seed + 4242, negative_prompt=self.cfg.sampling.negative_prompt,
            )  # fmt: skip
        if not self.is_main:
            return None
        path = save_grid(
            self.out / "images" / f"iter_{iteration:06d}.png",
            imgs,
            4,
            row_labels=[p.removeprefix("a photo of ") for p in prompts],
            scale=3 if imgs[0].shape[1] <= 64 else 1,
        )
        self.trackers.log_image("images/samples", path, iteration)
        return path

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]] | None:
        """The LoRA, the optimizer (or its state dict) and the update's tensors, whole: on the main process,
        or under FSDP gathered by every process (None on the others)."""
        sp = self.sharded
        if sp is None:
            if not self.is_main:
                return None
            return lora_state_dict(self.adapter.denoiser), self.opt, self._update_tensors()
        with sp.summoned():
            lora = {k: v.clone() for k, v in lora_state_dict(self.adapter.denoiser).items()}
        return lora, full_optimizer_state(self.opt, sp), self._update_tensors()

    def _update_tensors(self) -> dict[str, torch.Tensor]:
        """The update's own tensors, and the LoRA EMA's as ``lora_ema.*`` (under FSDP gathered whole: call it
        on every process)."""
        tensors = dict(self.updater.state_tensors())
        if self.lora_ema is not None:
            sp = self.sharded
            ema = self.lora_ema.state_dict(sp.full if sp is not None else None)
            tensors.update({f"{EMA_PREFIX}{k}": v for k, v in ema.items()})
        return tensors

    def _load_update_tensors(self, ck: Path, state: dict[str, Any]) -> None:
        """The update's state and the LoRA EMA from checkpoint ``ck``. An EMA turned on since (with
        ``--allow-changes``) starts from the resumed weights."""
        tensors = load_update_tensors(ck)
        ema = {k.removeprefix(EMA_PREFIX): v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        self.updater.load(
            state.get("update", {}), {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
        )
        if self.lora_ema is None:
            return
        if not ema:
            self._warn(f"{ck} holds no LoRA EMA (lora_ema was off): it starts from the resumed weights")
            self.lora_ema.reset()
            return
        sp = self.sharded
        self.lora_ema.load_state_dict(ema, sp.local if sp is not None else None)

    def checkpoint(self, iteration: int) -> None:
        self._checkpointed = iteration
        self.acc.wait_for_everyone()
        tensors = self._checkpoint_tensors()
        if self.is_main and tensors is not None:
            lora, opt, update_tensors = tensors
            state = {
                "history": self.history,
                "evals": self.evals,
                "monitor": self.monitor.warnings,
                "monitor_series": self.monitor.series,
                "reward_history": self.monitor.history,
                "update": self.updater.state(),
                "nonfinite": self.guard.state_dict(),
            }
            save_checkpoint(
                self.out / "checkpoints", iteration, lora, lora_header(self.adapter.denoiser), opt, state,
                config=dataclasses.asdict(self.cfg), update_tensors=update_tensors,
            )  # fmt: skip
            prune_checkpoints(self.out / "checkpoints", self.cfg.train.checkpoints_total_limit)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint (an interrupted or damaged newer one is passed over with
        a warning); a changed config stops here unless its fields are safe to change or ``allow_changes``.
        False (and a line saying so) when there is nothing to resume."""
        root = self.out / "checkpoints"
        if self.is_main:
            clean_partial(root)
        ck = latest_checkpoint(root)
        if ck is None:
            self._warn(f"--resume: no checkpoint in {root}; starting a new run")
            return False
        self._check_config_against(read_state(ck).get("config"), ck)
        for name in check_inputs(self.out, self.cfg, self.allow_changes):
            self._warn(f"--resume: {name} changed since the run started (allowed)")
        sp = self.sharded  # FSDP: whole tensors saved, shards loaded
        to_local = (lambda sd: local_optimizer_state(sd, sp)) if sp else None
        lora, state = load_checkpoint(ck, self.opt, to_local)
        with self._whole_lora(writeback=True):
            unexpected = set_lora_state_dict(self.adapter.denoiser, lora)
        if unexpected:
            raise ConfigError("resume", f"{ck}: LoRA keys do not fit this model ({unexpected[:3]} ...)")
        self.start_iteration = int(state["iteration"])
        self.history = state.get("history", [])
        self.evals = state.get("evals", [])
        self.monitor.warnings = state.get("monitor", [])
        self.monitor.series = state.get("monitor_series", {})
        self.monitor.history = state.get("reward_history", [])
        self._load_update_tensors(ck, state)
        self.guard.load_state_dict(state.get("nonfinite", {}))
        if self.is_main:  # rows logged after the checkpoint are redone
            truncate_log(self.out / "log.csv", self.start_iteration)
        return True

    def _check_config_against(self, old: dict[str, Any] | None, ck: Path) -> None:
        """Stop on a changed config (listing the fields) before anything is loaded or written."""
        if old is None:
            self._warn(f"{ck} records no config (an older checkpoint): the config was not compared")
            return
        old = read_recorded_config(old)  # this version's keys and schema
        for line in check_resume(old, dataclasses.asdict(self.cfg), self.allow_changes):
            self._warn(f"--resume: {line}")

    # ------------------------------------------------------------------ main loop
    def train(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Run (or resume) the iterations, then export the LoRA, evaluate and report. One run per output
        folder (a lock; ``overwrite``: a new run may replace an earlier one's files); Ctrl-C / SIGTERM finish
        the iteration, checkpoint and stop (in one process, sampling and evaluations stop within seconds)."""
        with self._run_lock(), StopRequest() as stop:
            try:
                return self._train(resume, overwrite, stop)
            except StopNow as e:  # a signal during sampling, rewards, an evaluation or a grid
                raise self._stopped_now(stop) from e
            finally:
                self.trackers.finish()  # also when stopped by a signal or an error: every event on disk

    def _train(self, resume: bool, overwrite: bool, stop: StopRequest) -> dict[str, Any]:
        cfg = self.cfg
        self._start(resume, overwrite)
        bar = tqdm(
            range(self.start_iteration, cfg.train.iterations),
            initial=self.start_iteration,
            total=cfg.train.iterations,
            desc="solace train",
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        last = cfg.train.iterations  # the iteration the run ends at (earlier when the time budget runs out)
        for it in bar:
            stats = self.iteration(it)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats.get('train/kl', 0):.2e}")
            done = it + 1
            self._periodic(done)
            out_of_time = self._rank0_decides(
                bool(cfg.train.max_minutes) and time.perf_counter() - started >= 60.0 * cfg.train.max_minutes
            )
            signalled = self._rank0_decides(stop.signum is not None)
            ending = done == cfg.train.iterations or out_of_time
            if ending and not signalled:
                # the end's evaluation and grid before the end checkpoint: a finished run continued to more
                # iterations (``--resume``) keeps them in its record
                self._final_samples(done)
            if done % cfg.train.checkpoint_every == 0 or ending or signalled:
                self.checkpoint(done)
            if signalled:
                bar.close()
                raise RunInterrupted(
                    f"{stop.name or 'a signal'} received: stopped after iteration {done} of "
                    f"{cfg.train.iterations}, checkpoint written; `solace train ... --resume` continues",
                    stop.signum or 15,
                )
            if out_of_time and done < cfg.train.iterations:
                last = done
                if self.is_main:
                    tqdm.write(
                        f"train.max_minutes={cfg.train.max_minutes:g} reached after iteration {done} of "
                        f"{cfg.train.iterations}; `--resume` continues from here"
                    )
                break
        bar.close()
        if (
            last <= self.start_iteration
        ):  # nothing left to train (a finished run resumed): its end samples here
            self._final_samples(last)
        self.stopped_at = last
        return self._finish(last)

    @contextlib.contextmanager
    def _run_lock(self) -> Any:
        """Hold the output folder's lock for the run (rank 0 takes it; every rank fails if it cannot)."""
        lock, error = None, None
        if self.is_main:
            lock = RunLock(self.out)
            try:
                msg = lock.acquire()
                if msg:
                    self._warn(msg)
            except ConfigError as e:
                error = e
            except OSError as e:  # a file in the way, a read-only or full disk
                lock, error = (
                    None,
                    ConfigError(
                        "train.output_dir",
                        f"{self.out} cannot be written ({e.strerror}); choose another folder",
                    ),
                )
        if self._rank0_decides(error is not None):
            raise error or ConfigError(
                "train.output_dir", f"{self.out} is locked by another run (see rank 0)"
            )
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def iteration(self, it: int) -> dict[str, float]:
        """One iteration: sample, score, update, monitor, log. Returns its statistics."""
        with self._stoppable():  # sampling and rewards are redone on resume; the update is not cut
            ro = self.collect(it)
        stats = {**ro.stats, **self.update(ro, it)}
        if self.guard.record(stats["guard/dropped"] > 0 or stats.get("train/skipped_steps", 0) > 0):
            self._write_monitor(stopped=self.guard.message())
            raise NonFiniteError(self.guard.message())
        if self._any_rank(not weights_finite(self.params)):  # never checkpointed, never exported
            message = nonfinite_weights_message(it + 1, latest_checkpoint(self.out / "checkpoints"))
            self._write_monitor(stopped=message)
            raise NonFiniteError(message)
        if self.cfg.monitor.enabled:
            watched = {
                "texture": stats["monitor/texture"],
                "foreground": stats.get("monitor/foreground", float("nan")),
                "reward_mean": stats["reward/mean"],
                "reward_std": stats.get("reward/std", float("nan")),
            }
            for w in self.monitor.update(it + 1, watched):  # 1-based, as log.csv and the evaluations
                if self.is_main:
                    tqdm.write(f"WARNING collapse monitor: {w}")
        stats["iteration"] = it + 1
        self.history.append(stats)
        self._log(stats, it + 1)
        self._write_csv(stats)
        return stats

    def _claim_folder(self, asked_resume: bool, overwrite: bool) -> None:
        """A new run's folder holds no earlier run: stop (naming ``--resume`` and ``--overwrite``), or with
        ``overwrite`` remove the earlier run's files, saying which. ``--resume`` with nothing to resume
        starts anew over a run that never checkpointed (its log is cut), as before."""
        error, found = None, []
        if self.is_main:
            found = earlier_run(self.out, RUN_FILES)
            if found and overwrite:
                removed = clear_earlier_run(self.out, self.created)
                self._warn(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.out}")
            elif found and not asked_resume:
                error = ConfigError(
                    "train.output_dir",
                    f"{self.out} holds an earlier run ({', '.join(found)}); `--resume` continues it, "
                    "`--overwrite` replaces it, or choose another train.output_dir",
                )
        if self._rank0_decides(error is not None):
            raise error or ConfigError("train.output_dir", f"{self.out} holds an earlier run (see rank 0)")

    def _start(self, resume: bool, overwrite: bool) -> None:
        """Write the config, resume or evaluate the base."""
        resumed = self.resume() if resume else False
        self._checkpointed = self.start_iteration
        if not resumed:
            self._claim_folder(resume, overwrite)
        if self.is_main:  # written once every check passed
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
            record_inputs(self.out, self.cfg)  # what --resume compares the input files with
        if not resumed and self.is_main:
            (self.out / "log.csv").unlink(missing_ok=True)
        if not resumed and self.cfg.train.report:  # on every process
            self.evaluate(0)
            if self.cfg.eval.image_every:
                self.save_images(0)
        if resumed and self.start_iteration < self.cfg.train.iterations:
            self._owed_samples(self.start_iteration)

    def _owed_samples(self, done: int) -> None:
        """A run stopped during the evaluation or grid of iteration ``done`` (checkpointed without them)
        makes them up on resume, as ``_periodic`` would have."""
        t = self.cfg.eval
        if t.every and done % t.every == 0 and not any(e["iteration"] == done for e in self.evals):
            self.evaluate(done)
        grid = self.out / "images" / f"iter_{done:06d}.png"  # the main process's view decides (sharded grids)
        if t.image_every and done % t.image_every == 0 and self._rank0_decides(not grid.exists()):
            self.save_images(done)

    def _periodic(self, done: int) -> None:
        """Evaluations every ``eval.every`` and image grids every ``eval.image_every`` iterations."""
        t = self.cfg.eval
        if t.every and done % t.every == 0 and done < self.cfg.train.iterations:
            ev = self.evaluate(done)
            if ev and self.evaluator is not None and self.is_main:
                tqdm.write(f"iteration {done}: {self.evaluator.progress_line(ev)}")
        if t.image_every and done % t.image_every == 0:
            self.save_images(done)

    def _export_lora(self) -> Path:
        """``OUT/lora``: the LoRA in diffusers' format, written by the main process (under FSDP gathered by
        every process first); with ``lora_ema`` its EMA (what was evaluated), the trained weights beside it
        in ``OUT/lora_trained``."""
        final = self.out / "lora"
        pipe_cls = type(self.adapter.pipeline) if self.adapter.pipeline is not None else None
        with self._evaluated_weights(), self._whole_lora():
            if self.is_main:
                save_lora(self.adapter, final, pipeline_class=pipe_cls)
                write_card(self.cfg, final, pipe_cls, self.evals)
        if self.lora_ema is not None:
            with self._whole_lora():
                if self.is_main:
                    save_lora(self.adapter, self.out / "lora_trained", pipeline_class=pipe_cls)
        return final

    def _final_samples(self, last: int) -> None:
        """The last evaluation and image grid, where ``_periodic`` did not make them (every process)."""
        if not self.cfg.train.report:
            return
        if not self.evals or self.evals[-1]["iteration"] != last:
            self.evaluate(last)
        every = self.cfg.eval.image_every
        if every and (last % every or last == self.start_iteration):  # else written by _periodic
            self.save_images(last)

    def _finish(self, last: int) -> dict[str, Any]:
        """Export the LoRA and report (main process), write monitor.json and evals.json."""
        result: dict[str, Any] = {"output_dir": str(self.out)}
        final = self._export_lora()
        if self.is_main:
            result["lora"] = str(final)
            if self.cfg.train.report:
                from solace.trainer.report import write_report

                result["report"] = str(write_report(self))
            self.trackers.finish()  # every event on disk: a distributed run ends with os._exit
            self._write_monitor()
            # every held-out evaluation of this run, machine-readable
            (self.out / "evals.json").write_text(json.dumps(self.evals, indent=1))
        if self.evaluator is not None and self.evals:
            result["eval_summary"] = self.evaluator.summary(self.evals)
        result.update(monitor=self.monitor.verdict, evals=self.evals, iterations=last)
        self.acc.wait_for_everyone()
        return result

    def _write_monitor(self, stopped: str = "") -> None:
        """monitor.json: the collapse monitor's verdict and warnings, and the non-finite guard's counts."""
        if not self.is_main:
            return
        dropped = sum(h.get("guard/dropped", 0.0) for h in self.history)
        doc = {
            "verdict": self.monitor.verdict,
            "warnings": self.monitor.warnings,
            "nonfinite": {**self.guard.state_dict(), "dropped_samples": int(dropped), "stopped": stopped},
        }
        (self.out / "monitor.json").write_text(json.dumps(doc, indent=1))

    def _stoppable(self) -> contextlib.AbstractContextManager:
        """Work a signal may cut short (it is redone on resume): in one process; with several, a process
        that stopped alone would leave the others in a collective, so they all stop between iterations."""
        return interrupt.stoppable(self.acc.num_processes == 1)

    def _stopped_now(self, stop: StopRequest) -> RunInterrupted:
        """After a signal cut sampling or an evaluation short: the last finished iteration checkpointed
        (when it was not yet), and the message to exit with."""
        done = int(self.history[-1]["iteration"]) if self.history else self.start_iteration
        if done > self._checkpointed:
            self.checkpoint(done)
        saved = (
            f"iteration {done} of {self.cfg.train.iterations} checkpointed" if done else "nothing trained yet"
        )
        return RunInterrupted(
            f"{stop.name or 'a signal'} received: stopped at once (the sampling or evaluation in progress is "
            f"redone on resume); {saved}; `solace train ... --resume` continues",
            stop.signum or 15,
        )

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process gets the same answer)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def _rank0_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every process (a time budget, a signal, a lock): all take the same branch."""
        if self.acc.num_processes == 1:
            return flag
        from accelerate.utils import broadcast

        t = torch.tensor([float(flag)], device=self.acc.device)
        return bool(broadcast(t, from_process=0).item())

    def _write_csv(self, stats: dict[str, float]) -> None:
        if self.is_main:
            append_csv_row(self.out / "log.csv", stats)


def run_training(
    cfg: SolaceConfig, resume: bool = False, allow_changes: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train one run. The process group stays up (``solace ablate`` trains several runs in one process);
    the command that started it ends with :func:`solace.trainer.distributed.finish`."""
    return Trainer(cfg, allow_changes=allow_changes).train(resume=resume, overwrite=overwrite)
