"""The SOLACE / Flow-GRPO training loop. It only orchestrates: setup (:mod:`~solace.trainer.setup`), the
policy update (:mod:`~solace.trainer.updates`), scoring (:mod:`~solace.trainer.scoring`), checkpoints
(:mod:`~solace.trainer.checkpointing`) and the math (sampling/, rewards/, grpo/, nft/) live elsewhere.

One iteration (paper Alg. 1): :meth:`Trainer.sample_rollout` samples ``P`` prompts (the same on every
process, from ``(seed, iteration)``) x ``G`` samples, split evenly across processes, each sample's noise a
function of ``(seed, iteration, sample index)`` only; :meth:`Trainer.score` mixes the reward components on
the gathered batch and takes group-relative advantages; :meth:`Trainer.update` runs the configured update.
Then logging, the collapse monitor, periodic evaluations and image grids, atomic checkpoints; at the end
the LoRA is exported and a report written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from solace.evaluation.evaluators import make_evaluator
from solace.evaluation.sharding import accelerate_shards
from solace.models.base import Conditioning
from solace.models.text_cache import ConditioningLRU
from solace.prompts import PromptSource
from solace.sampling.generate import generate_shared
from solace.sampling.rollout import Rollout
from solace.sampling.sampler import sample
from solace.trainer.checkpoint import latest_checkpoint
from solace.trainer.checkpointing import RunCheckpoints
from solace.trainer.config import SolaceConfig, eval_setup, to_yaml
from solace.trainer.distributed import any_rank, rank0_decides
from solace.trainer.guard import NonFiniteError, NonFiniteGuard, nonfinite_weights_message, weights_finite
from solace.trainer.inputs import record_inputs
from solace.trainer.model_setup import load_model, offload_text_encoders, run_prompts
from solace.trainer.monitor import CollapseMonitor, eval_stats, write_monitor
from solace.trainer.report import write_report
from solace.trainer.resume_check import truncate_log
from solace.trainer.runlock import claim_folder, run_lock
from solace.trainer.scoring import RolloutScoring
from solace.trainer.setup import build_context, make_accelerator, make_layout, make_lora_ema
from solace.trainer.signals import RunInterrupted, StopRequest
from solace.trainer.tracking import Trackers
from solace.trainer.updates import make_update
from solace.utils import interrupt
from solace.utils.files import append_csv_row
from solace.utils.images import save_grid
from solace.utils.interrupt import StopNow


class Trainer:
    def __init__(self, cfg: SolaceConfig, accelerator: Any | None = None, allow_changes: bool = False):
        self.created = time.time()  # before the trackers open their files (--overwrite keeps those)
        self.wall_before = 0.0  # seconds earlier processes of this run spent, up to the checkpoint resumed
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.out = Path(cfg.train.output_dir)
        self.acc = make_accelerator(cfg, accelerator, self.out)
        self.trackers = Trackers(self.acc, cfg.train.tracker_project, self.out, dataclasses.asdict(cfg))
        self.is_main, self.rank = self.acc.is_main_process, self.acc.process_index
        self.layout = make_layout(cfg, self.acc)
        self.adapter = load_model(cfg.model, self.acc.device)
        self.ctx = build_context(cfg, self.adapter, self.acc)  # LoRA, optimizer, wrapping, streams, schedule
        self.params = self.ctx.params
        self._cond_cache = ConditioningLRU(cfg.model.embedding_lru_size)
        self.updater = make_update(self.ctx, cfg)  # train.algorithm
        # the parts below warn through self._warn, looked up when they warn (a caller may redirect it)
        self.scoring = RolloutScoring(
            cfg,
            self.ctx,
            self.encode,
            self.updater.updates_per_iteration,
            lambda m: self._warn(m),
            self.layout,
        )
        self.source = PromptSource(cfg.data.train_prompts, cfg.train.seed)
        self.lora_ema = make_lora_ema(cfg, self.params)  # what evaluations and the export use, or None
        if self.lora_ema is not None:
            self.updater.after_step = self.lora_ema.update
        self.null = self.adapter.encode_prompts([cfg.sampling.negative_prompt])  # CFG's null
        offload_text_encoders(  # model.offload_text_encoders: the run's prompts encoded, then offloaded
            cfg.model, self.adapter, self.acc,
            lambda: run_prompts(cfg, self.source, self.scoring.prompts_to_encode), self.encode,
        )  # fmt: skip
        mc = cfg.monitor
        self.monitor = CollapseMonitor(
            mc.std_drop, mc.foreground_drop, mc.reward_spike_z, mc.window, mc.accuracy_drop
        )
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite)
        self.start_iteration, self.stopped_at = 0, cfg.train.iterations
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self.checkpoints = RunCheckpoints(
            self.out, cfg, self.ctx, self.updater, self.lora_ema, lambda m: self._warn(m), allow_changes
        )
        # every process samples its block of each evaluation and image grid and receives the others'
        # (shards; under DDP through the bare module, see UpdateContext.training_forwards; under FSDP with as
        # many forwards as the others), the main one writes; metric models load here, before training, on
        # every process; None: nothing to evaluate
        self.shards = accelerate_shards(self.acc, pad=self.ctx.sharded is not None)
        self.evaluator = make_evaluator(
            eval_setup(cfg, self.eval_cfg_scale),
            self.adapter,
            self.out,
            writes=self.is_main,
            shards=self.shards,
        )

    def _evaluated_weights(self) -> contextlib.AbstractContextManager:
        """Inside, the LoRA holds the weights that are evaluated and exported: its EMA with ``lora_ema``
        (the trained weights come back on exit, bit for bit), else the trained weights themselves."""
        return self.lora_ema.swapped() if self.lora_ema is not None else contextlib.nullcontext()

    @property
    def eval_cfg_scale(self) -> float:
        """CFG of evaluations and image grids: ``eval.cfg_scale``, else the sampling scale."""
        return self.cfg.eval.cfg_scale or self.cfg.sampling.cfg_scale

    # ------------------------------------------------------------------ helpers
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode each prompt once and reuse it (an LRU of ``model.embedding_lru_size`` prompts in CPU
        memory): the rows on the CPU, for the caller to move to the device."""
        return self._cond_cache(prompts, self.adapter.encode_prompts)

    def _warn(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"WARNING {message}")

    def _log(self, scalars: dict[str, float], step: int) -> None:
        """The finite scalars to every tracker of ``train.log_with`` (main process)."""
        self.trackers.log(scalars, step)

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
        init = torch.stack([self.ctx.streams.initial_noise(iteration, k, lat) for k in noise_of])
        step_noise = torch.stack(
            [self.ctx.streams.sde_noise(iteration, i, s.num_steps, lat) for i in lay.indices]
        )
        sde_steps = self.ctx.window if s.sde_window_only else None
        with self.updater.sampling_policy():  # DiffusionNFT samples with its old policy
            trajs = [
                sample(
                    self.adapter, cond.index(sl), null.index(sl), self.ctx.sigmas, init[sl].to(dev),
                    s.cfg_scale, s.noise_level, sde_steps, step_noise=step_noise[sl].to(dev),
                )
                for sl in (slice(b, b + s.batch_size) for b in range(0, len(cond), s.batch_size))
            ]  # fmt: skip
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

    def score(self, ro: Rollout, iteration: int) -> dict[str, float]:
        """The rewards of the whole (gathered) batch, mixed, and this process's advantages on ``ro``
        (:class:`~solace.trainer.scoring.RolloutScoring`); returns the reward and batch statistics."""
        return self.scoring.score(ro, iteration)

    # ------------------------------------------------------------------ policy update
    def update(self, ro: Rollout, iteration: int) -> dict[str, float]:
        """The configured policy update (``train.algorithm``, :mod:`solace.trainer.updates`), its forwards
        through the wrapped module (:meth:`~solace.trainer.context.UpdateContext.training_forwards`)."""
        with self.ctx.training_forwards():
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
    def checkpoint(self, iteration: int) -> None:
        """Checkpoint the trained state and the loop's (on every process: :mod:`~.checkpointing`)."""
        self._checkpointed = iteration
        state = {"history": self.history, "evals": self.evals, **self.monitor.state_dict()}
        state.update(nonfinite=self.guard.state_dict(), wall_s=self.wall_s())
        self.checkpoints.save(iteration, state)

    def wall_s(self) -> float:
        """The run's wall time so far: this process's (from building the trainer) and that of the earlier
        processes up to the checkpoint this one resumed (time spent after it is redone, so not counted;
        NaN when that checkpoint predates this record)."""
        return self.wall_before + time.time() - self.created

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint; False when there is nothing to resume."""
        state = self.checkpoints.resume()
        if state is None:
            return False
        self.start_iteration = int(state["iteration"])
        self.history = state.get("history", [])
        self.evals = state.get("evals", [])
        self.monitor.load_state_dict(state)
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self.wall_before = float(state.get("wall_s", math.nan))
        if self.is_main:  # rows logged after the checkpoint are redone
            truncate_log(self.out / "log.csv", self.start_iteration)
        return True

    # ------------------------------------------------------------------ main loop
    def train(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Run (or resume) the iterations, then export the LoRA, evaluate and report. One run per output
        folder (a lock; ``overwrite``: a new run may replace an earlier one's files); Ctrl-C / SIGTERM finish
        the iteration, checkpoint and stop (in one process, sampling and evaluations stop within seconds)."""
        with run_lock(self.out, self.acc, self._warn), StopRequest() as stop:
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
            out_of_time = rank0_decides(
                self.acc,
                bool(cfg.train.max_minutes) and time.perf_counter() - started >= 60.0 * cfg.train.max_minutes,
            )
            signalled = rank0_decides(self.acc, stop.signum is not None)
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
        if last <= self.start_iteration:  # nothing left to train (a finished run resumed): its end samples
            self._final_samples(last)
        self.stopped_at = last
        return self._finish(last)

    def iteration(self, it: int) -> dict[str, float]:
        """One iteration: sample, score, update, monitor, log. Returns its statistics."""
        with self._stoppable():  # sampling and rewards are redone on resume; the update is not cut
            ro = self.collect(it)
        stats = {**ro.stats, **self.update(ro, it)}
        if self.guard.record(stats["guard/dropped"] > 0 or stats.get("train/skipped_steps", 0) > 0):
            self._write_monitor(stopped=self.guard.message())
            raise NonFiniteError(self.guard.message())
        if any_rank(self.acc, not weights_finite(self.params)):  # never checkpointed, never exported
            message = nonfinite_weights_message(it + 1, latest_checkpoint(self.out / "checkpoints"))
            self._write_monitor(stopped=message)
            raise NonFiniteError(message)
        if self.cfg.monitor.enabled:
            for w in self.monitor.watch(it + 1, stats):  # 1-based, as log.csv and the evaluations
                self._warn(f"collapse monitor: {w}")
        stats["iteration"] = it + 1
        self.history.append(stats)
        self._log(stats, it + 1)
        self._write_csv(stats)
        return stats

    def _start(self, resume: bool, overwrite: bool) -> None:
        """Write the config, resume or evaluate the base."""
        resumed = self.resume() if resume else False
        self._checkpointed = self.start_iteration
        if not resumed:
            claim_folder(self.out, self.acc, self.created, resume, overwrite, self._warn)
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
        if t.image_every and done % t.image_every == 0 and rank0_decides(self.acc, not grid.exists()):
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
        final = self.checkpoints.export_lora(self.evals)
        if self.is_main:
            result["lora"] = str(final)
            if self.cfg.train.report:
                result["report"] = str(write_report(self))
            self.trackers.finish()  # every event on disk: a distributed run ends with os._exit
            self._write_monitor()
            # every held-out evaluation of this run, machine-readable
            (self.out / "evals.json").write_text(json.dumps(self.evals, indent=1))
        if self.evaluator is not None and self.evals:
            result["eval_summary"] = self.evaluator.summary(self.evals)
        result.update(monitor=self.monitor.verdict, evals=self.evals, iterations=last, wall_s=self.wall_s())
        self.acc.wait_for_everyone()
        return result

    def _write_monitor(self, stopped: str = "") -> None:
        if self.is_main:
            dropped = sum(h.get("guard/dropped", 0.0) for h in self.history)
            write_monitor(self.out / "monitor.json", self.monitor, self.guard.state_dict(), dropped, stopped)

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

    def _write_csv(self, stats: dict[str, float]) -> None:
        if self.is_main:
            append_csv_row(self.out / "log.csv", stats)


def run_training(
    cfg: SolaceConfig, resume: bool = False, allow_changes: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train one run. The process group stays up (``solace ablate`` trains several runs in one process);
    the command that started it ends with :func:`solace.trainer.distributed.finish`."""
    return Trainer(cfg, allow_changes=allow_changes).train(resume=resume, overwrite=overwrite)
