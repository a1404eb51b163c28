"""Fixed-seed toy runs whose outputs were recorded before the structure refactor (issue 14).

``python tests/reference_runs.py record`` writes ``tests/data/reference_runs.safetensors``: the final LoRA
of several tiny ``solace train`` runs (the paper's reward, the released-code form, offline contrastive, CFG
in the reward with shared initial noise and an SDE-only window, verifiable + self-confidence with several
optimizer steps per iteration, a .jsonl prompt file), their logged reward statistics, and the scores of
``solace rerank`` and ``solace score`` on a tiny model. ``tests/test_reference_runs.py`` re-runs them through
the command line and compares bitwise.
"""

from __future__ import annotations

import csv
import json
import platform
import sys
from pathlib import Path

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
    "released": ("toy_released_code", {"grpo.rho": 0.5, "reward.self_confidence.delta": 1e-3}),
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
            "grpo.inner_epochs": 2,
            "grpo.updates_per_iteration": 2,
            "grpo.micro_batch_size": 2,
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


def run_cases(work: Path, cases: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Run every case (or the named ones) under ``work``; returns name-prefixed tensors."""
    torch.set_num_threads(1)
    weights = make_tiny_toy_weights(work / "tiny_toy.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, (preset, extra) in TRAIN_CASES.items():
        if cases is not None and name not in cases:
            continue
        run = work / name
        _cli(["train", "--config", preset, *tiny_overrides(weights, run, **extra)])
        lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
        for k, v in lora.items():
            out[f"train.{name}.lora.{k}"] = v.contiguous()
        with open(run / "log.csv") as f:
            rows = list(csv.DictReader(f))
        for col in LOGGED:
            out[f"train.{name}.log.{col}"] = torch.tensor([float(r[col]) for r in rows], dtype=torch.float64)
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


def platform_tag() -> str:
    """Where the reference was recorded: bitwise equality is promised on the same CPU and torch build."""
    return f"{platform.machine()}|torch {torch.__version__}|{torch.backends.cpu.get_cpu_capability()}"


def record(work: Path) -> None:
    tensors = run_cases(work)
    REF.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(REF), metadata={"platform": platform_tag()})
    print(f"wrote {REF}: {len(tensors)} tensors, platform {platform_tag()}")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/reference_runs.py record")
    with tempfile.TemporaryDirectory() as d:
        record(Path(d))
