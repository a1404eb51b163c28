"""The SOLACE / Flow-GRPO training loop. It only orchestrates; the math lives in sampling/, rewards/, grpo/.

One iteration (paper Alg. 1):

1. ``P`` prompts (the same on every process, from ``(seed, iteration)``), ``G`` samples each; the ``P*G``
   samples are split evenly across processes. Each sample's initial and SDE noise depends only on
   ``(seed, iteration, sample index)``, so the samples do not depend on the number of processes.
2. SDE sampling with CFG keeps every latent and step log-prob (no grad).
3. Rewards: self-confidence on the clean latents (no CFG, probes shared per group) and/or external rewards
   on decoded images; per-timestep scores and rewards are gathered across processes.
4. Group-relative advantages over the gathered batch; each process keeps its own slice.
5. For the last ``ceil(rho |T|)`` steps: PPO-clipped loss on the recomputed log-probs plus ``beta`` KL to
   the LoRA-off reference; gradients accumulate over (micro-batch x window step) micro-steps, each scaled by
   1 / (the number of micro-steps actually trained), then one optimizer step per update.
6. Logging (progress bar, tensorboard, CSV), collapse monitor, periodic evaluation, image grids, atomic
   checkpoints; at the end the LoRA is exported and a report written.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from solace.errors import ConfigError
from solace.grpo.advantages import group_advantages
from solace.grpo.loss import gaussian_kl, ppo_clip_loss
from solace.grpo.window import parse_steps, train_window
from solace.models import load_adapter, model_family
from solace.models.base import Conditioning, adapters_disabled
from solace.models.lora import add_lora, load_lora, lora_config, lora_parameters, lora_state_dict, save_lora
from solace.rewards.mixture import SELF_CONFIDENCE, RewardMixture
from solace.sampling.sampler import sample, step_policy
from solace.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from solace.trainer.config import SolaceConfig, probe_steps, to_yaml
from solace.trainer.monitor import CollapseMonitor, latent_texture, toy_foreground
from solace.trainer.prompts import Prompt, PromptSource


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Trainer:
    def __init__(self, cfg: SolaceConfig, accelerator: Any | None = None):
        from accelerate import Accelerator

        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        self.acc = accelerator or Accelerator(cpu=cpu)
        self.out = Path(cfg.train.output_dir)
        self.is_main = self.acc.is_main_process
        world = self.acc.num_processes
        total = cfg.sampling.prompts_per_step * cfg.sampling.group_size
        if total % world:
            raise ConfigError(
                "sampling.group_size",
                f"prompts_per_step * group_size = {total} samples must split evenly over {world} processes",
            )
        self.local_n = total // world
        self.rank = self.acc.process_index

        m = cfg.model
        kwargs: dict[str, Any] = {"device": self.acc.device}
        family = model_family(m.name)
        if family != "toy":
            kwargs.update(
                dtype=m.dtype,
                resolution=m.resolution,
                max_sequence_length=m.max_sequence_length,
                gradient_checkpointing=m.gradient_checkpointing,
            )
            if family == "flux":
                kwargs["guidance_scale"] = m.guidance_scale
            else:
                kwargs["text_encoder_3"] = m.text_encoder_3
        self.adapter = load_adapter(m.name, **kwargs)
        den = self.adapter.denoiser
        den.requires_grad_(False)
        targets = m.lora.target_modules or self.adapter.lora_target_modules
        torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are drawn here: same seed, same initial LoRA
        if m.lora.init_from and m.lora.merge_init:
            load_lora(den, m.lora.init_from, merge=True)
            add_lora(den, m.lora.rank, m.lora.alpha, targets)
        else:
            add_lora(den, m.lora.rank, m.lora.alpha, targets, init_from=m.lora.init_from)
        self.params = lora_parameters(den)
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        if world > 1:
            wrapped, self.opt = self.acc.prepare(den, self.opt)
            self.adapter.forward_module = wrapped
            self.wrapped = wrapped
        else:
            self.wrapped = den
        self.rewards = RewardMixture(
            cfg.reward.components, cfg.reward.self_confidence, cfg.sampling.cfg_scale
        )
        self.source = PromptSource(cfg.data.train_prompts, cfg.train.seed)
        self.sigmas = self.adapter.sigmas(cfg.sampling.num_steps)
        self.window = (
            parse_steps(cfg.grpo.train_steps, cfg.sampling.num_steps)
            if cfg.grpo.train_steps
            else train_window(cfg.sampling.num_steps, cfg.grpo.rho)
        )
        self.probe_idx = probe_steps(cfg.reward.self_confidence.timesteps, cfg.sampling.num_steps)
        # S_t is probed at the sampler's own timesteps (sigmas[0..T-1]; sigmas[T] = 0 is the data itself).
        self.probe_t = self.sigmas[self.probe_idx].clamp(min=1e-4)
        self._cond_cache: OrderedDict[str, Conditioning] = OrderedDict()
        self.null = self.adapter.encode_prompts([""])
        mc = cfg.monitor
        self.monitor = CollapseMonitor(mc.std_drop, mc.foreground_drop, mc.reward_spike_z, mc.window)
        self.is_toy = self.adapter.name == "toy"
        self.start_iteration = 0
        self.stopped_at = cfg.train.iterations
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self.writer = None

    @property
    def eval_cfg_scale(self) -> float:
        """CFG of evaluations and image grids: ``sampling.eval_cfg_scale``, else the sampling scale."""
        s = self.cfg.sampling
        return s.eval_cfg_scale or s.cfg_scale

    # ------------------------------------------------------------------ helpers
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode each prompt once and reuse it (LRU of 4096 prompts)."""
        for p in prompts:
            if p not in self._cond_cache:
                self._cond_cache[p] = self.adapter.encode_prompts([p])
                if len(self._cond_cache) > 4096:
                    self._cond_cache.popitem(last=False)
            else:
                self._cond_cache.move_to_end(p)
        return Conditioning.cat([self._cond_cache[p] for p in prompts])

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return t
        return self.acc.gather(t.to(self.acc.device).contiguous()).cpu()

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        for k, v in scalars.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(k, float(v), step)

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def collect(self, iteration: int) -> dict[str, Any]:
        """Sample this process's share of the iteration's groups and score them."""
        cfg, s = self.cfg, self.cfg.sampling
        G = s.group_size
        prompts: list[Prompt] = self.source.for_iteration(iteration, s.prompts_per_step)
        gidx = list(range(self.rank * self.local_n, (self.rank + 1) * self.local_n))
        group_of = torch.tensor([i // G for i in gidx])
        texts = [prompts[i // G].text for i in gidx]
        metas = [prompts[i // G].meta for i in gidx]
        cond = self.encode(texts).to(self.acc.device)
        null = self.null.index([0] * len(gidx)).to(self.acc.device)
        lat = self.adapter.latent_shape()
        T = s.num_steps
        init = torch.stack(
            [
                torch.randn(
                    lat,
                    generator=torch.Generator().manual_seed(
                        _seed(cfg.train.seed, iteration, i // G if s.same_init_noise else i, 1)
                    ),
                )
                for i in gidx
            ]
        )
        step_noise = torch.stack(
            [
                torch.randn(
                    (T, *lat), generator=torch.Generator().manual_seed(_seed(cfg.train.seed, iteration, i, 2))
                )
                for i in gidx
            ]
        )
        sde_steps = self.window if s.sde_window_only else None
        t0 = time.perf_counter()
        trajs = []
        for b in range(0, len(gidx), s.batch_size):
            sl = slice(b, b + s.batch_size)
            trajs.append(
                sample(
                    self.adapter,
                    cond.index(sl),
                    null.index(sl),
                    self.sigmas,
                    init[sl].to(self.acc.device),
                    s.cfg_scale,
                    s.noise_level,
                    sde_steps,
                    step_noise=step_noise[sl].to(self.acc.device),
                )
            )
        latents = torch.cat([t.latents for t in trajs])
        log_probs = torch.cat([t.log_probs for t in trajs])
        t_sample = time.perf_counter() - t0

        t0 = time.perf_counter()
        z0 = latents[:, -1]
        comps: dict[str, torch.Tensor] = {}
        scores_all = None
        if self.rewards.uses_self_confidence:
            seeds = [
                _seed(cfg.train.seed, iteration, g, 3)
                if cfg.reward.self_confidence.probe_mode == "group"
                else _seed(cfg.train.seed, iteration, g, 3, self.rank)
                for g in range(s.prompts_per_step)
            ]
            local_group = group_of
            if cfg.reward.self_confidence.probe_mode == "per_sample_timestep":
                # fresh probes for every sample: one "group" per sample, seeded by its global index
                local_group = torch.arange(len(gidx))
                seeds = [_seed(cfg.train.seed, iteration, i, 4) for i in gidx]
            scores = self.rewards.self_confidence_scores(
                self.adapter, z0, cond, null, self.probe_t.to(z0.device), local_group, seeds
            ).cpu()
            scores_all = self._gather(scores)
            comps[SELF_CONFIDENCE] = self.rewards.aggregate_scores(scores_all, self.probe_t)
        images = None
        need_images = bool(self.rewards.external) or self.is_toy
        if need_images:
            images = torch.cat(
                [
                    self.adapter.decode(z0[b : b + s.batch_size]).cpu()
                    for b in range(0, len(gidx), s.batch_size)
                ]
            )
        if self.rewards.external:
            for name, r in self.rewards.external_rewards(images, texts, metas).items():
                comps[name] = self._gather(r)
        total = self.rewards.combine(comps)
        t_reward = time.perf_counter() - t0
        all_groups = torch.arange(s.prompts_per_step * G) // G
        adv = group_advantages(
            total,
            group_ids=all_groups,
            global_std=cfg.grpo.global_std,
            eps=cfg.grpo.adv_eps,
            clip=cfg.grpo.adv_clip,
        )
        local_adv = adv[self.rank * self.local_n : (self.rank + 1) * self.local_n]
        stats: dict[str, float] = {"reward/mean": float(total.mean()), "reward/std": float(total.std())}
        for k, v in comps.items():
            stats[f"reward/{k}_mean"] = float(v.mean())
        if scores_all is not None:
            for col, j in enumerate(self.probe_idx):
                stats[f"self_confidence/S_t{j:02d}"] = float(scores_all[:, col].mean())
        stats["adv/abs_mean"] = float(adv.abs().mean())
        stats["adv/max"] = float(adv.max())
        tex = self._gather(latent_texture(z0).cpu())
        stats["monitor/texture"] = float(tex.mean())
        if self.is_toy and images is not None:
            fg, nobj = toy_foreground(images)
            stats["monitor/foreground"] = float(self._gather(fg).mean())
            stats["monitor/objects"] = float(self._gather(nobj).mean())
            if any("include" in m for m in metas):
                from solace.toy.evaluator import detect, score_detections, to_uint8
                from solace.toy.world import PromptRecord

                strict = torch.tensor(
                    [
                        float(score_detections(detect(a), PromptRecord.from_json(m))["strict"])
                        for a, m in zip(to_uint8(images), metas, strict=True)
                    ]
                )
                stats["train/strict_acc"] = float(self._gather(strict).mean())
        stats["time/sampling"] = t_sample
        stats["time/reward"] = t_reward
        return {
            "latents": latents,
            "log_probs": log_probs,
            "adv": local_adv,
            "cond": cond,
            "null": null,
            "stats": stats,
            "prompts": [p.text for p in prompts],
        }

    def update(self, batch: dict[str, Any], iteration: int) -> dict[str, float]:
        """PPO-clipped GRPO update with KL to the LoRA-off reference on the window of steps."""
        cfg, g = self.cfg, self.cfg.grpo
        n = batch["latents"].shape[0]
        dev = self.acc.device
        agg: dict[str, list[float]] = {
            "loss": [],
            "policy_loss": [],
            "kl": [],
            "approx_kl": [],
            "clipfrac": [],
            "ratio_min": [],
            "ratio_max": [],
            "grad_norm": [],
        }
        t0 = time.perf_counter()
        for epoch in range(g.inner_epochs):
            perm = torch.randperm(
                n,
                generator=torch.Generator().manual_seed(
                    _seed(cfg.train.seed, iteration, epoch, 5, self.rank)
                ),
            )
            chunks = perm.chunk(g.updates_per_iteration)
            for chunk in chunks:
                micro = list(chunk.split(g.micro_batch_size))
                n_micro = len(micro) * len(self.window)  # the micro-steps actually trained in this update
                k = 0
                for mb in micro:
                    z = batch["latents"][mb].to(dev)
                    old = batch["log_probs"][mb].to(dev)
                    adv = batch["adv"][mb].to(dev).float()
                    cond, null = batch["cond"].index(mb), batch["null"].index(mb)
                    for j in self.window:
                        k += 1
                        last = k == n_micro
                        sync = (
                            contextlib.nullcontext()
                            if (last or self.acc.num_processes == 1)
                            else self.acc.no_sync(self.wrapped)
                        )
                        with sync:
                            step_j = functools.partial(
                                step_policy, self.adapter, z[:, j], z[:, j + 1], self.sigmas, j, cond, null,
                                cfg.sampling.cfg_scale, cfg.sampling.noise_level,
                            )  # fmt: skip
                            st = step_j()
                            pl, pst = ppo_clip_loss(st.log_prob, old[:, j], adv, g.clip_range)
                            loss = pl
                            kl = torch.zeros((), device=dev)
                            if g.beta > 0:
                                with torch.no_grad(), adapters_disabled(self.adapter.denoiser):
                                    ref = step_j()  # the same step under the LoRA-off reference
                                dt = self.sigmas[j + 1] - self.sigmas[j]
                                kl = gaussian_kl(st.mean, ref.mean, st.std.reshape(-1), dt, g.kl_form).mean()
                                loss = loss + g.beta * kl
                            (loss / n_micro).backward()
                        agg["loss"].append(float(loss.detach()))
                        agg["policy_loss"].append(float(pl.detach()))
                        agg["kl"].append(float(kl.detach()))
                        agg["approx_kl"].append(float(pst["approx_kl"]))
                        agg["clipfrac"].append(float(pst["clipfrac"]))
                        agg["ratio_min"].append(float(pst["ratio_min"]))
                        agg["ratio_max"].append(float(pst["ratio_max"]))
                if self.acc.num_processes > 1 and self.wrapped is self.adapter.denoiser:
                    for p in self.params:  # pragma: no cover - prepare() wraps whenever world > 1
                        if p.grad is not None:
                            p.grad = self.acc.reduce(p.grad, reduction="mean")
                gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                agg["grad_norm"].append(float(gn))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        out = {
            f"train/{k}": (min(v) if k == "ratio_min" else max(v) if k == "ratio_max" else sum(v) / len(v))
            for k, v in agg.items()
            if v
        }
        out["time/update"] = time.perf_counter() - t0
        out["train/lr"] = self.opt.param_groups[0]["lr"]
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, Any] | None:
        cfg = self.cfg
        if not self.is_main:
            return None
        recs = self._toy_eval_records()
        if recs is not None:
            from solace.evaluation.toy_eval import BaseEvalCache, evaluate_records

            cache = (
                BaseEvalCache(cfg.train.base_eval_cache, self._base_eval_key())
                if iteration == 0 and cfg.train.base_eval_cache
                else None
            )
            res = cache.get() if cache else None
            if res is None:
                res = evaluate_records(
                    self.adapter,
                    recs,
                    cfg.train.eval_samples_per_prompt,
                    cfg.sampling.eval_num_steps,
                    self.eval_cfg_scale,
                    seed=cfg.train.seed + 999,
                    progress=False,
                )
                if cache:
                    cache.put(res)
            summ = res["summary"]
            out = {
                "iteration": iteration,
                "strict": summ["overall"]["strict"],
                "lenient": summ["overall"]["lenient"],
                "categories": summ["categories"],
                "images": summ.get("images", {}),  # a cached evaluation from an older version lacks them
            }
            self._log(
                {
                    "eval/strict": out["strict"],
                    "eval/lenient": out["lenient"],
                    **{f"eval/{k}": v for k, v in out["images"].items()},
                    **{f"eval/{c}_strict": v["strict"] for c, v in summ["categories"].items()},
                },
                iteration,
            )
            if self.evals and self.cfg.monitor.enabled:
                for w in self.monitor.update_eval(iteration, self.evals[0].get("images", {}), out["images"]):
                    tqdm.write(f"WARNING collapse monitor: {w}")
            self.evals.append(out)
            return out
        return None

    def _toy_eval_records(self) -> list | None:
        """The records the exact evaluator scores: the toy held-out set, or a ``.jsonl`` prompt file whose
        every line carries GenEval metadata (``include``); None where there is nothing to score exactly."""
        if not self.is_toy:
            return None
        from solace.toy.world import PromptRecord, balanced_subset, load_heldout

        spec, limit = self.cfg.data.eval_prompts, self.cfg.data.eval_prompts_limit
        if spec == "toy_heldout":
            return balanced_subset(load_heldout(), limit)
        items = PromptSource(spec, 0).all()
        if not all("include" in p.meta for p in items):
            return None
        recs = [PromptRecord.from_json(p.meta) for p in items]
        return balanced_subset(recs, limit) if limit else recs

    def _base_eval_key(self) -> dict[str, Any]:
        """Everything the evaluation before training depends on."""
        import hashlib

        from solace.models.toy import default_weights_path

        c = self.cfg
        weights = default_weights_path() if c.model.name == "toy" else Path(c.model.name)
        return {
            "model": c.model.name,
            # the weights themselves, so a changed base (a new shipped toy model) is evaluated anew
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "",
            "lora_init": c.model.lora.init_from,
            "merge_init": c.model.lora.merge_init,
            "dtype": c.model.dtype,
            "eval_prompts": c.data.eval_prompts,
            "limit": c.data.eval_prompts_limit,
            "samples": c.train.eval_samples_per_prompt,
            "steps": c.sampling.eval_num_steps,
            "cfg": self.eval_cfg_scale,
            "seed": c.train.seed,
        }

    def save_images(self, iteration: int) -> Path | None:
        if not self.is_main:
            return None
        from solace.evaluation.toy_eval import generate
        from solace.utils.images import save_grid

        prompts = self.cfg.train.image_prompts or self._default_image_prompts()
        imgs = generate(
            self.adapter,
            prompts,
            4,
            self.cfg.sampling.eval_num_steps,
            self.eval_cfg_scale,
            seed=self.cfg.train.seed + 4242,
            progress=False,
        )
        scale = 3 if imgs.shape[-1] <= 64 else 1
        return save_grid(
            self.out / "images" / f"iter_{iteration:06d}.png",
            list(imgs),
            4,
            row_labels=[p.removeprefix("a photo of ") for p in prompts],
            scale=scale,
        )

    def _default_image_prompts(self) -> list[str]:
        if self.is_toy:
            from solace.toy.world import CATEGORIES, load_heldout

            held = load_heldout()
            return [next(r.prompt for r in held if r.tag == c) for c in CATEGORIES]
        return [p.text for p in self.source.for_iteration(0, 4)]

    # ------------------------------------------------------------------ checkpoints
    def _lora_meta(self) -> dict[str, str]:
        cfgd = lora_config(self.adapter.denoiser).to_dict()
        return {
            "lora_config": json.dumps(
                {
                    k: (sorted(v) if isinstance(v, set) else v)
                    for k, v in cfgd.items()
                    if isinstance(v, str | int | float | bool | list | set | type(None))
                }
            )
        }

    def checkpoint(self, iteration: int) -> None:
        self.acc.wait_for_everyone()
        if self.is_main:
            save_checkpoint(
                self.out / "checkpoints",
                iteration,
                lora_state_dict(self.adapter.denoiser),
                self._lora_meta(),
                self.opt,
                {
                    "history": self.history,
                    "evals": self.evals,
                    "monitor": self.monitor.warnings,
                    "monitor_series": self.monitor.series,
                    "reward_history": self.monitor.history,
                },
            )
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        ck = latest_checkpoint(self.out / "checkpoints")
        if ck is None:
            return False
        from peft import set_peft_model_state_dict

        lora, state = load_checkpoint(ck, self.opt)
        res = set_peft_model_state_dict(self.adapter.denoiser, lora)
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise ConfigError("resume", f"{ck}: LoRA keys do not fit this model ({unexpected[:3]} ...)")
        self.start_iteration = int(state["iteration"])
        self.history = state.get("history", [])
        self.evals = state.get("evals", [])
        self.monitor.warnings = state.get("monitor", [])
        self.monitor.series = state.get("monitor_series", {})
        self.monitor.history = state.get("reward_history", [])
        return True

    # ------------------------------------------------------------------ main loop
    def train(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        resumed = self.resume() if resume else False
        if not resumed and self.is_main:
            (self.out / "log.csv").unlink(missing_ok=True)
            if cfg.train.report:
                self.evaluate(0)
                if cfg.train.image_every:
                    self.save_images(0)
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
            batch = self.collect(it)
            stats = batch["stats"]
            stats.update(self.update(batch, it))
            warns = (
                self.monitor.update(
                    it,
                    {
                        "texture": stats["monitor/texture"],
                        "foreground": stats.get("monitor/foreground", float("nan")),
                        "reward_mean": stats["reward/mean"],
                    },
                )
                if cfg.monitor.enabled
                else []
            )
            for w in warns:
                if self.is_main:
                    tqdm.write(f"WARNING collapse monitor: {w}")
            stats["iteration"] = it + 1
            self.history.append(stats)
            self._log(stats, it + 1)
            self._write_csv(stats)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats.get('train/kl', 0):.2e}")
            done = it + 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.iterations:
                ev = self.evaluate(done)
                if ev and self.is_main:
                    tqdm.write(
                        f"iteration {done}: held-out strict {ev['strict']:.3f} lenient {ev['lenient']:.3f}"
                    )
            if cfg.train.image_every and done % cfg.train.image_every == 0:
                self.save_images(done)
            out_of_time = self._out_of_time(started)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.iterations or out_of_time:
                self.checkpoint(done)
            if out_of_time and done < cfg.train.iterations:
                last = done
                if self.is_main:
                    tqdm.write(
                        f"train.max_minutes={cfg.train.max_minutes:g} reached after iteration {done} of "
                        f"{cfg.train.iterations}; `--resume` continues from here"
                    )
                break
        bar.close()
        self.stopped_at = last
        result: dict[str, Any] = {"output_dir": str(self.out)}
        if self.is_main:
            final = self.out / "lora"
            pipe_cls = type(self.adapter.pipeline) if hasattr(self.adapter, "pipeline") else None
            save_lora(self.adapter, final, pipeline_class=pipe_cls)
            result["lora"] = str(final)
            if cfg.train.report:
                if not self.evals or self.evals[-1]["iteration"] != last:
                    self.evaluate(last)
                if cfg.train.image_every:
                    self.save_images(last)
                from solace.trainer.report import write_report

                result["report"] = str(write_report(self))
            if self.writer is not None:
                self.writer.close()  # every event on disk: a distributed run ends with os._exit
                self.writer = None
        result["monitor"] = self.monitor.verdict
        if self.is_main:
            (self.out / "monitor.json").write_text(
                json.dumps({"verdict": self.monitor.verdict, "warnings": self.monitor.warnings}, indent=1)
            )
            # every held-out evaluation of this run, machine-readable
            (self.out / "evals.json").write_text(json.dumps(self.evals, indent=1))
        result["evals"] = self.evals
        result["iterations"] = last
        self.acc.wait_for_everyone()
        return result

    def _out_of_time(self, started: float) -> bool:
        """Whether ``train.max_minutes`` has run out; every process takes rank 0's decision."""
        budget = self.cfg.train.max_minutes
        if not budget:
            return False
        flag = torch.tensor([float(time.perf_counter() - started >= 60.0 * budget)], device=self.acc.device)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            flag = broadcast(flag, from_process=0)
        return bool(flag.item())

    def _write_csv(self, stats: dict[str, float]) -> None:
        if not self.is_main:
            return
        path = self.out / "log.csv"
        keys = sorted(k for k in stats if isinstance(stats[k], int | float))
        new = not path.exists()
        if not new:
            with open(path) as f:
                header = f.readline().strip().split(",")
            keys = header
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(keys)
            w.writerow([stats.get(k, "") for k in keys])


def run_training(cfg: SolaceConfig, resume: bool = False) -> dict[str, Any]:
    """Train one run. The process group stays up (``solace ablate`` trains several runs in one process);
    the command that started it ends with :func:`solace.trainer.distributed.finish`."""
    return Trainer(cfg).train(resume=resume)
