"""Bench scripts measure the library, not copies of it: run as commands (never imported), a change to the
library's code they call changes their result. ``bench/grad_snr.py``: the policy gradient is the trainer's
own update loss, so that loss patched to ten times itself gives ten times the gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import TENFOLD_LOSS, make_tiny_toy_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def grad_snr(tmp: Path, weights: Path, patch: bool = False) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable]
    if patch:
        (tmp / "patched.py").write_text(TENFOLD_LOSS)
        cmd.append(str(tmp / "patched.py"))
    cmd += [
        str(ROOT / "bench" / "grad_snr.py"),
        "--batches",
        "2",
        "--threads",
        "1",
        "--json",
        str(tmp / "r.json"),
    ]
    cmd += [f"model.name={weights}", "model.lora.rank=4", "model.lora.alpha=8", "sampling.group_size=4"]
    cmd += ["sampling.num_steps=4", f"train.output_dir={tmp / 'run'}", "train.device=cpu"]
    cmd += ["reward.components=[{name: random, weight: 1.0}]"]  # advantages that are not all zero
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((tmp / "r.json").read_text())


def test_grad_snr_takes_the_gradient_of_the_trainers_loss(tmp_path):
    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")
    base = grad_snr(tmp_path / "base", weights)
    norms = [b["norm"] for b in base["batches"]]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    assert len(base["cos_real"]) == len(base["cos_shuffled"]) == 1
    tenfold = grad_snr(tmp_path / "patched", weights, patch=True)
    # the same batches (seeded), the trainer's loss scaled: the gradient scales, its direction does not
    assert [b["reward_mean"] for b in tenfold["batches"]] == [b["reward_mean"] for b in base["batches"]]
    for n, m in zip(norms, [b["norm"] for b in tenfold["batches"]], strict=True):
        assert m == pytest.approx(10 * n, rel=1e-4)
    assert tenfold["cos_real"] == pytest.approx(base["cos_real"], abs=1e-5)


def signal_report(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "signal_report.py"), "--prompts", "5", "--group", "4"]
    cmd += ["--probes", "2", "--threads", "1", "--variants", "paper,contrastive,empty_only,edits,-pixel_std"]
    cmd += ["--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_signal_report_rescores_one_category_and_reuses_the_rest_exactly(tmp_path):
    from safetensors.numpy import load_file, save_file

    full = signal_report(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = signal_report(tmp_path / "part", "--categories", "color_attr", "--reuse", str(tmp_path / "full"))
    assert part.returncode == 0, part.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "signal.json").read_text())
    b = json.loads((tmp_path / "part" / "signal.json").read_text())
    # the 5 prompts: single_object, position and 3 color_attr; only the color_attr ones are scored again
    assert (b["groups_scored"], b["groups_reused"]) == (3, 2)
    assert part.stdout.count("(reused)") == 2 and part.stdout.count("(scored)") == 3
    assert b["variants"] == a["variants"] and b["auc_strict_per_timestep"] == a["auc_strict_per_timestep"]
    # without --reuse, only the chosen category is reported
    alone = signal_report(tmp_path / "alone", "--categories", "color_attr", "--variants", "paper")
    assert alone.returncode == 0, alone.stderr[-3000:]
    c = json.loads((tmp_path / "alone" / "signal.json").read_text())
    assert (c["groups_scored"], c["groups_reused"]) == (3, 0)
    assert set(c["variants"]["paper"]["auc_strict_per_category"]) <= {"color_attr"}

    # must refuse: another seed than the reused run's, and reused scores whose samples are not these
    other = signal_report(
        tmp_path / "x", "--seed", "1", "--categories", "color_attr", "--reuse", str(tmp_path / "full")
    )
    assert other.returncode == 2 and "--reuse" in other.stderr and "--seed" in other.stderr
    raw = load_file(str(tmp_path / "full" / "raw.safetensors"))
    raw["strict"][raw["group"] == 0] = 1.0 - raw["strict"][raw["group"] == 0]
    save_file(raw, str(tmp_path / "full" / "raw.safetensors"))
    moved = signal_report(tmp_path / "y", "--categories", "color_attr", "--reuse", str(tmp_path / "full"))
    assert moved.returncode == 2 and "draws other samples" in moved.stderr
    assert not (tmp_path / "y" / "signal.json").exists()


def write_premise_log(path: Path, paper: list[tuple[float, int]], strict: float) -> None:
    """A run's log.csv with 6 iterations (thirds of 2): the paper form's (AUC, groups) per iteration, the
    contrastive form at 0.5 throughout."""
    path.mkdir(parents=True)
    rows = [
        "iteration,train/strict_acc,premise/paper_auc,premise/paper_groups,premise/contrastive_auc,"
        "premise/contrastive_groups"
    ]
    for i, (a, g) in enumerate(paper, start=1):
        rows.append(f"{i},{strict},{'' if g == 0 else a},{g},0.5,3")
    (path / "log.csv").write_text("\n".join(rows) + "\n")


def test_premise_report_pools_by_groups_and_pairs_by_seed(tmp_path):
    # reward runs: first third pooled (0.4 x 1 + 0.7 x 2) / 3 = 0.6; an iteration with no group is skipped;
    # last third 0.7 / 0.8 / 0.9 -> changes +0.1 / +0.2 / +0.3. Controls: 0.6 -> 0.6, no change.
    for s, last in enumerate((0.7, 0.8, 0.9)):
        write_premise_log(
            tmp_path / "reward" / f"seed{s}",
            [(0.4, 1), (0.7, 2), (0.9, 0), (0.6, 1), (last, 4), (last, 4)],
            0.5,
        )
        write_premise_log(tmp_path / "control" / f"seed{s}", [(0.6, 2)] * 6, 0.4)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "premise_report.py"),
        "--out",
        str(tmp_path),
        "--seeds",
        "0,1,2",
    ]
    r = subprocess.run(
        [*cmd, "--record", str(tmp_path / "rec")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "rec" / "report.json").read_text())
    first = doc["runs"]["reward"]["0"][0]
    assert first["paper_auc"] == pytest.approx(0.6) and first["paper_groups"] == 3
    test = doc["paired_test"]["paper"]
    assert test["gaps"] == pytest.approx([0.1, 0.2, 0.3])
    assert test["t"] == pytest.approx(0.2 / (0.1 / 3**0.5)) and test["df"] == 2
    assert doc["paired_test"]["contrastive"]["gaps"] == [0.0, 0.0, 0.0]  # no spread: no t
    assert "| paper | +0.200 [+0.100, +0.200, +0.300] | +0.000 [+0.000, +0.000, +0.000] |" in r.stdout
    assert (tmp_path / "rec" / "premise.png").stat().st_size > 0
    # must refuse, in one line with exit 2: a folder without the grid's runs
    bad = subprocess.run(
        [*cmd[:2], "--out", str(tmp_path / "rec")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--out" in bad.stderr and "Traceback" not in bad.stderr
