"""Collapse monitor: what goes flat when the policy reward-hacks toward blank, textureless images.

Tracked each iteration: the per-sample spatial std of the clean latents (texture), the reward mean, and in
the toy world the foreground fraction (pixels within reach of a palette colour) and objects per image. The
monitor trips when the mean texture or foreground of the last few iterations falls below a fraction of the
first few iterations' mean, or when the reward mean jumps by many running standard deviations (a spike;
the running std is floored at a thousandth of the batch's reward spread, so rounding is never a spike).
At each toy-world evaluation it also compares the evaluation images (fixed prompts and noise) with the
base model's: foreground fraction and pixel std, which unlike batch statistics do not swing with the
prompts drawn, and the evaluator's strict accuracy where there is one: a reward can wreck the prompts
without emptying the images (the prompt-contrastive form with NFT grew the foreground while strict
accuracy fell from 0.59 to 0.13).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPIKE_FLOOR = 1e-3  # a reward-mean jump is measured in at least this fraction of the batch's reward std


def eval_stats(ev: dict) -> dict[str, float]:
    """What :meth:`CollapseMonitor.update_eval` compares from one evaluation record: its image statistics
    and, where the evaluator scores accuracy, ``strict``."""
    out = dict(ev.get("images") or {})
    if isinstance(ev.get("strict"), (int, float)):
        out["strict"] = float(ev["strict"])
    return out


def latent_texture(z0: torch.Tensor) -> torch.Tensor:
    """Per-sample spatial std of the clean latent, averaged over channels: (B,)."""
    return z0.float().flatten(2).std(-1).mean(-1) if z0.ndim >= 3 else z0.float().std(-1)


@dataclass
class CollapseMonitor:
    std_drop: float = 0.5
    foreground_drop: float = 0.5
    reward_spike_z: float = 6.0
    window: int = 5  # batch statistics are compared as means over this many iterations
    accuracy_drop: float = 0.75  # an evaluation's strict accuracy below this fraction of the base's
    series: dict[str, list[float]] = field(default_factory=dict)  # per-iteration batch statistics
    history: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def update(self, iteration: int, stats: dict[str, float]) -> list[str]:
        """Feed one iteration's statistics; returns the warnings it raised (also kept in ``warnings``).

        A batch statistic swings with the prompts drawn (a single-object prompt has a third of a two-object
        prompt's foreground), so the mean of its last ``window`` iterations is compared with the mean of its
        first ``window``, once both windows are full and apart."""
        out = []
        for key, frac in (("texture", self.std_drop), ("foreground", self.foreground_drop)):
            if key not in stats or not math.isfinite(stats[key]):
                continue
            xs = self.series.setdefault(key, [])
            xs.append(float(stats[key]))
            if len(xs) < 2 * self.window:
                continue
            base, now = float(np.mean(xs[: self.window])), float(np.mean(xs[-self.window :]))
            if base > 0 and now < frac * base:
                out.append(
                    f"iteration {iteration}: {key} fell to {now:.4f} (mean of the last {self.window} "
                    f"iterations, {now / base:.0%} of the first {self.window}: {base:.4f}): possible collapse"
                )
        r = stats.get("reward_mean")
        if r is not None and len(self.history) >= 5:
            h = np.array(self.history[-20:])
            # a mean that moves by less than a thousandth of the batch's own reward spread is no spike: a
            # reward standardised across the batch (the released-code form) has a mean of 0 up to rounding,
            # a wobble of ~1e-7
            spread = stats.get("reward_std", math.nan)
            floor = SPIKE_FLOOR * spread if math.isfinite(spread) else 0.0
            sd = max(float(h.std()), floor) or 1e-8
            if abs(r - float(h.mean())) > self.reward_spike_z * sd:
                out.append(
                    f"iteration {iteration}: reward mean {r:.4f} jumped {abs(r - h.mean()) / sd:.1f} "
                    f"running stds from {h.mean():.4f}: possible reward hacking"
                )
        if r is not None:
            self.history.append(r)
        self.warnings.extend(out)
        return out

    def watch(self, iteration: int, stats: dict[str, float]) -> list[str]:
        """:meth:`update` with an iteration's logged statistics (``monitor/texture``, ``monitor/foreground``
        where the model reports it, ``reward/mean``, ``reward/std``)."""
        nan = float("nan")
        watched = {
            "texture": stats["monitor/texture"],
            "foreground": stats.get("monitor/foreground", nan),
            "reward_mean": stats["reward/mean"],
            "reward_std": stats.get("reward/std", nan),
        }
        return self.update(iteration, watched)

    def update_eval(self, iteration: int, base: dict[str, float], now: dict[str, float]) -> list[str]:
        """Compare an evaluation's image statistics (fixed prompts, fixed noise) with the base model's:
        warn when the foreground fraction or the pixel std fell below its threshold fraction. Unlike the
        per-batch statistics, these do not move with the prompts drawn, so a drop is the policy's doing.
        ``strict`` (the evaluator's accuracy, see :func:`eval_stats`) is compared the same way against
        ``accuracy_drop``: a random-reward run's drifts to 90-97 % of the base's on the toy world's
        64 x 8 evaluation."""
        out = []
        for key, frac in (
            ("foreground", self.foreground_drop),
            ("pixel_std", self.std_drop),
            ("strict", self.accuracy_drop),
        ):
            b, x = base.get(key), now.get(key)
            if b is None or x is None or not (math.isfinite(b) and math.isfinite(x)) or b <= 0:
                continue
            if x < frac * b:
                what = "the prompts drawn worse" if key == "strict" else "possible collapse"
                out.append(
                    f"iteration {iteration}: eval_{key} fell to {x:.4f} ({x / b:.0%} of the base "
                    f"model's {b:.4f} on the same prompts and noise): {what}"
                )
        self.warnings.extend(out)
        return out

    def state_dict(self) -> dict:
        """What a checkpoint keeps (its keys in the checkpoint's state: ``monitor``, ``monitor_series``,
        ``reward_history``)."""
        return {"monitor": self.warnings, "monitor_series": self.series, "reward_history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Back from a checkpoint's state (missing keys: empty)."""
        self.warnings = state.get("monitor", [])
        self.series = state.get("monitor_series", {})
        self.history = state.get("reward_history", [])

    @property
    def verdict(self) -> str:
        if not self.warnings:
            return "no collapse signal"
        kinds = sorted({w.split(": ", 1)[1].split(" ")[0] for w in self.warnings})
        return f"TRIPPED ({len(self.warnings)} warnings: {', '.join(kinds)})"


def write_monitor(
    path: Path, monitor: CollapseMonitor, guard_state: dict, dropped: int, stopped: str = ""
) -> None:
    """``monitor.json``: the collapse monitor's verdict and warnings, and the non-finite guard's counts
    (``guard_state``, ``dropped`` samples, why the run ``stopped`` where it did)."""
    doc = {
        "verdict": monitor.verdict,
        "warnings": monitor.warnings,
        "nonfinite": {**guard_state, "dropped_samples": int(dropped), "stopped": stopped},
    }
    path.write_text(json.dumps(doc, indent=1))
