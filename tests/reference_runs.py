"""Fixed-seed toy runs whose outputs were recorded before the structure refactor (issue 14).

``python tests/reference_runs.py record`` writes ``tests/data/reference_runs.safetensors``: the final LoRA
of several tiny ``solace train`` runs (the paper's reward, the released-code form, offline contrastive, CFG
in the reward with shared initial noise and an SDE-only window, verifiable + self-confidence with several
optimizer steps per iteration, a .jsonl prompt file), their logged reward statistics, and the scores of
``solace rerank`` and ``solace score`` on a tiny model. ``tests/test_reference_runs.py`` re-runs them through
the command line.

Two kinds of value are recorded, because a float reduction rounds differently on another CPU model, SIMD
width or torch build (torch dispatches other kernels), and training amplifies that rounding: Adam's first
steps move every weight by about ``lr * sign(g)`` whatever the size of ``g``, and standardised rewards
divide small differences by small spreads. So

- the *trained* values (final LoRA, every logged iteration) are compared bitwise, and only on the platform
  they were recorded on (:func:`platform_tag`: CPU model, kernel set, torch build);
- the *stable* values (:func:`stable_keys`) are compared on any machine, against tolerances scaled to each
  quantity's spread (:func:`compare_stable`): what the first iteration computes before any parameter moves
  (each sample's reward, self-confidence S_t, advantage and step log-probs) and the direction and size of
  the first update, plus the scores of ``rerank`` and ``score`` (no training at all).

``record`` also runs the cases once more under ``ATEN_CPU_CAPABILITY=default`` (torch's scalar kernels: the
rounding of another CPU) and stores those stable values as ``witness.*``: the tests show that this rounding
noise passes :func:`compare_stable` while deliberate changes of behaviour fail it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
REF = HERE / "data" / "reference_runs.safetensors"
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

JSONL = ROOT / "bench" / "data" / "heldout_2_per_category.jsonl"

# name -> (preset, overrides on top of the tiny run)
TRAIN_CASES: dict[str, tuple[str, dict[str, object]]] = {
    "paper": ("toy", {}),
    # delta pinned to 1e-3: the reference was recorded when the preset still used our default delta (the
    # preset now has the released code's 1e-6); the case checks the same code path bitwise
    # pinned to the preset's form when recorded (before it followed the released scripts step for step: steps
    # 4..8, global std, per-batch standardisation, zero advantages dropped, the LoRA EMA)
    "released": (
        "toy_released_code",
        {
            "grpo.rho": 0.5,
            "reward.self_confidence.delta": 1e-3,
            "reward.self_confidence.timesteps": "later_half",
            "grpo.train_steps": "''",
            "grpo.global_std": False,
            "reward.self_confidence.standardize_batch": 0,
            "reward.self_confidence.standardize_shuffle_groups": 0,
            "grpo.drop_zero_advantages": False,
            "lora_ema.enabled": False,
        },
    ),
    "offline_contrastive": (
        "toy",
        # one group: before the refactor an offline reward over two groups crashed (a reused context)
        {
            "reward.self_confidence.online": False,
            "reward.self_confidence.contrastive": True,
            "sampling.prompts_per_step": 1,
        },
    ),
    "cfg_reward_shared_noise": (
        "toy",
        {
            "reward.self_confidence.cfg_in_reward": True,
            "sampling.same_init_noise": True,
            "sampling.sde_window_only": True,
            "grpo.kl_form": "exact",
        },
    ),
    "mixed_multi_step": (
        "toy_mixed",
        {
            "train.inner_epochs": 2,
            "train.updates_per_iteration": 2,
            "train.micro_batch_size": 2,
            "grpo.train_steps": "1,3",
        },
    ),
    "jsonl_prompts": ("toy", {"data.train_prompts": str(JSONL), "sampling.batch_size": 3}),
}
# log.csv columns that are deterministic (no timings)
LOGGED = ("reward/mean", "reward/std", "adv/abs_mean", "train/kl", "train/policy_loss", "train/grad_norm")


def _cli(args: list[str]) -> None:
    from typer.testing import CliRunner

    from solace.cli.main import app

    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        raise RuntimeError(f"solace {' '.join(args)} failed ({res.exit_code}): {res.output}\n{res.exception}")


@contextlib.contextmanager
def first_rollout() -> Iterator[dict[str, torch.Tensor]]:
    """Inside, the first ``Trainer.collect`` of a run fills the yielded dict with what its iteration computed
    before any parameter moved: each sample's mixed reward, advantage, step log-probs and S_t."""
    from solace.trainer.trainer import Trainer

    seen: dict[str, torch.Tensor] = {}
    collect = Trainer.collect

    def recording(self, iteration: int):
        ro = collect(self, iteration)
        if not seen:
            seen.update(reward=ro.rewards, adv=ro.advantages)
            if ro.log_probs is not None:
                seen["log_probs"] = ro.log_probs
            if ro.confidence is not None:
                seen["S_t"] = ro.confidence
        return ro

    with mock.patch.object(Trainer, "collect", recording):
        yield seen


def first_update(run: Path) -> torch.Tensor:
    """The first iteration's change of the LoRA: its B matrices (which start at 0) after iteration 1, read
    from that iteration's checkpoint, concatenated in key order."""
    lora = load_file(str(run / "checkpoints" / "iter_000001" / "lora.safetensors"))
    return torch.cat([lora[k].flatten().double() for k in sorted(lora) if "lora_B" in k])


def train_case(work: Path, weights: Path, name: str, **changes: object) -> dict[str, torch.Tensor]:
    """One training case through the command line (``changes``: overrides on top of the case's); returns its
    name-prefixed tensors: final LoRA, logged columns, and the stable first-iteration values."""
    preset, extra = TRAIN_CASES[name]
    run = work / name
    with first_rollout() as first:
        _cli(["train", "--config", preset, *tiny_overrides(weights, run, **{**extra, **changes})])
    out = {f"train.{name}.first.{k}": v.double().contiguous() for k, v in first.items()}
    out[f"train.{name}.first.update"] = first_update(run)
    if (run / "lora").exists():
        lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
        out.update({f"train.{name}.lora.{k}": v.contiguous() for k, v in lora.items()})
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    for col in LOGGED:
        out[f"train.{name}.log.{col}"] = torch.tensor([float(r[col]) for r in rows], dtype=torch.float64)
    return out


def run_cases(work: Path, cases: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Run every case (or the named ones) under ``work``; returns name-prefixed tensors."""
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    weights = make_tiny_toy_weights(work / "tiny_toy.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name in TRAIN_CASES:
        if cases is None or name in cases:
            out.update(train_case(work, weights, name))
    if cases is None or "rerank" in cases:
        rr = work / "rerank"
        _cli(
            ["rerank", "--prompts", str(JSONL), "--limit", "3", "--n", "2,4", "--seeds", "0,1",
             "--steps", "4", "--probes", "2", "--batch-size", "3", "--model", str(weights),
             "--threads", "1", "--out", str(rr)]
        )  # fmt: skip
        doc = json.loads((rr / "rerank.json").read_text())
        out["rerank.R"] = torch.tensor([r["R"] for r in doc["per_prompt"]], dtype=torch.float64)
        out["rerank.strict"] = torch.tensor([r["strict"] for r in doc["per_prompt"]], dtype=torch.float64)
    if cases is None or "score" in cases:
        sc = work / "score"
        _cli(
            ["score", "-p", "a photo of two circles", "--generate", "3", "--seed", "5", "--steps", "4",
             "--probes", "4", "--model", str(weights), "--threads", "1", "--out", str(sc)]
        )  # fmt: skip
        doc = json.loads((sc / "score.json").read_text())
        out["score.S_t"] = torch.tensor([r["S_t"] for r in doc["scores"]], dtype=torch.float64)
        out["score.R"] = torch.tensor([r["R"] for r in doc["scores"]], dtype=torch.float64)
    return out


# ------------------------------------------------------------------------------ the cross-platform check
# Measured (``python tests/reference_runs.py noise``, and the reference's rerank / score values of an AVX2
# machine against an AVX-512 one): another kernel set or CPU moves a stable value by at most 2.3e-4 of its
# spread (the offline contrastive S_t, a difference of two scores; the others 1e-4 or less) and leaves the
# first update's cosine at 1.000000 and its norm within 3e-5. The tolerances leave a margin of 40 or more
# above that and stay far below what a change of behaviour does (tests/test_reference_runs.py).
SPREAD_TOL = 1e-2  # |got - ref| <= SPREAD_TOL * spread(ref)
UPDATE_MIN_COS = 0.95  # cosine between the first updates
UPDATE_MAX_LOG_RATIO = 0.05  # |log(|got| / |ref|)| of the first updates' norms
DISCRETE_MAX_FLIPS = 0.05  # rerank's strict correctness: fraction of samples allowed to flip


def stable_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The values that do not depend on trained weights: comparable on any CPU."""
    return sorted(k for k in tensors if ".first." in k or k.startswith(("rerank.", "score.")))


def spread(ref: torch.Tensor) -> torch.Tensor:
    """The scale a value's error is measured against: per column (the same step or timestep across samples)
    for a 2-D value, over all entries for a 1-D one; never below 1e-6 of the largest magnitude."""
    ref = ref.double()
    s = ref.std(dim=0, keepdim=True) if ref.ndim == 2 and ref.shape[0] > 1 else ref.std().reshape(1)
    floor = max(1e-6 * float(ref.abs().max()), 1e-12)
    return s.nan_to_num(0.0).clamp_min(floor)


def measure(key: str, got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """Whether ``got`` reproduces the stable value ``ref`` of ``key`` within the cross-platform tolerances,
    and a line saying how far it is."""
    g, r = got.double(), ref.double()
    if g.shape != r.shape:
        return False, f"shape {tuple(g.shape)} != {tuple(r.shape)}"
    if key.endswith(".first.update"):
        cos = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
        log_ratio = abs(float(torch.log(g.norm() / r.norm())))
        ok = cos >= UPDATE_MIN_COS and log_ratio <= UPDATE_MAX_LOG_RATIO
        line = f"cosine {cos:.6f} (>= {UPDATE_MIN_COS}), |log norm ratio| {log_ratio:.2e}"
        return ok, f"{line} (<= {UPDATE_MAX_LOG_RATIO})"
    if key == "rerank.strict":
        flips = float((g != r).double().mean())
        return flips <= DISCRETE_MAX_FLIPS, f"{flips:.3f} of the samples flipped (<= {DISCRETE_MAX_FLIPS})"
    err = float(((g - r).abs() / spread(r)).max())
    return err <= SPREAD_TOL, f"off by {err:.2e} of its spread (<= {SPREAD_TOL:g})"  # NaN is not ok


def compare_stable(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Every stable value of ``ref`` that ``got`` does not reproduce within the cross-platform tolerances,
    one line each (empty: all agree)."""
    failures = []
    for k in stable_keys(ref):
        ok, line = measure(k, got[k], ref[k]) if k in got else (False, "missing")
        if not ok:
            failures.append(f"{k}: {line}")
    return failures


def platform_tag() -> str:
    """Where a trained value is reproducible bitwise: the CPU model (vendor, family, model, stepping), the
    kernel set torch dispatches to (``ATEN_CPU_CAPABILITY`` changes it) and the torch build (its version and
    a digest of its build configuration: compiler, BLAS, flags)."""
    cpu = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping", "model name") and key not in cpu:
                cpu[key] = value.strip()
    g = cpu.get
    model = (
        f"{g('vendor_id', '?')} {g('model name', platform.processor() or '?')} "
        f"(family {g('cpu family', '?')} model {g('model', '?')} stepping {g('stepping', '?')})"
    )
    config = [ln for ln in torch.__config__.show().splitlines() if "CPU capability usage" not in ln]
    build = hashlib.sha256("\n".join(config).encode()).hexdigest()[:12]
    return (
        f"{platform.machine()}|{model}|{torch.backends.cpu.get_cpu_capability()}|"
        f"torch {torch.__version__} build {build}"
    )


WITNESS = "ATEN_CPU_CAPABILITY=default on the recording machine"


def _witness(work: Path) -> dict[str, torch.Tensor]:
    """The stable values run again in a process that uses torch's scalar kernels (another rounding)."""
    out = work / "witness.safetensors"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, __file__, "stable", str(out)], check=True, env=env)
    return load_file(str(out))


def record(work: Path) -> None:
    tensors = run_cases(work / "native")
    witness = _witness(work)
    tensors.update({f"witness.{k}": witness[k] for k in stable_keys(tensors)})
    REF.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(REF), metadata={"platform": platform_tag(), "witness": WITNESS})
    print(f"wrote {REF}: {len(tensors)} tensors, platform {platform_tag()}")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] == ["stable"] and len(sys.argv) == 3:  # record's witness run (a child process)
        with tempfile.TemporaryDirectory() as d:
            got = run_cases(Path(d))
        save_file({k: got[k] for k in stable_keys(got)}, sys.argv[2])
    elif sys.argv[1:] in (["record"], ["noise"]):
        with tempfile.TemporaryDirectory() as d:
            if sys.argv[1] == "record":
                record(Path(d))
            else:  # how far another kernel set moves each stable value: the margin of the tolerances
                ref, witness = run_cases(Path(d) / "native"), _witness(Path(d))
                for k in stable_keys(ref):
                    print(k, *measure(k, witness[k], ref[k]))
    else:
        sys.exit("usage: python tests/reference_runs.py record | noise")
