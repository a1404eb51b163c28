"""`solace ablate`: conditions laid over a base config, a grid of ordinary training runs on a tiny toy model
and a tiny SD3 pipeline, one table with seed spread, kept runs on restart, and the shared base evaluation."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from trainer_helpers import make_tiny_toy_weights, tiny_overrides
from typer.testing import CliRunner

from solace.cli.main import app
from solace.trainer.ablate import aggregate, markdown, resolve_condition, run_config, summarize_run
from solace.trainer.config import load_config, to_yaml

torch.set_num_threads(1)

EVAL = [
    "train.report=true",
    "eval.prompts_limit=2",
    "eval.samples_per_prompt=1",
    "eval.num_steps=2",
]


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_condition_wins_over_shared_overrides(tmp_path):
    cond = resolve_condition("no_cfg")
    cfg = run_config("toy", ["sampling.cfg_scale=3.0", "train.iterations=2"], cond, 5, tmp_path)
    assert cfg.sampling.cfg_scale == 1.0 and cfg.eval.cfg_scale == 7.0  # the condition wins
    assert cfg.train.iterations == 2  # the shared budget applies
    assert cfg.train.seed == 5 and cfg.train.output_dir == str(tmp_path / "no_cfg" / "seed5")
    # every bundled condition differs from the base in exactly what it names
    base = load_config("toy", [])
    assert run_config("toy", [], resolve_condition("k4"), 0, tmp_path).reward.self_confidence.num_probes == 4
    assert (
        run_config("toy", [], resolve_condition("k16"), 0, tmp_path).reward.self_confidence.num_probes == 16
    )
    assert run_config("toy", [], resolve_condition("rho1"), 0, tmp_path).grpo.rho == 1.0
    off = run_config("toy", [], resolve_condition("offline"), 0, tmp_path)
    assert off.reward.self_confidence.online is False and off.grpo.rho == base.grpo.rho
    mixed = run_config("toy", [], resolve_condition("toy_mixed"), 0, tmp_path)
    assert [c.name for c in mixed.reward.components] == ["toy_geneval", "self_confidence"]


def test_dry_run_commands_give_the_same_configs(tmp_path):
    out = tmp_path / "grid"
    conds = ["k4", "no_cfg", "toy_mixed", "toy_released_code"]
    result = CliRunner().invoke(
        app,
        [
            "ablate",
            "--dry-run",
            "--seeds",
            "0,3",
            "--conditions",
            ",".join(conds),
            "--out",
            str(out),
            "train.iterations=3",
        ],  # fmt: skip
    )
    _ok(result)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("solace train")]
    assert len(lines) == 8 and not out.exists()  # nothing written
    for line, (c, s) in zip(lines, [(c, s) for c in conds for s in (0, 3)], strict=True):
        args = shlex.split(line)
        assert args[:4] == ["solace", "train", "--config", "toy"]
        from_cmd = load_config("toy", args[4:])
        direct = run_config("toy", ["train.iterations=3"], resolve_condition(c), s, out)
        from_cmd.preset = direct.preset = ""
        assert to_yaml(from_cmd) == to_yaml(direct)


def test_bad_condition_and_seeds_are_one_line_errors(tmp_path):
    for args, field in (
        (["--conditions", "k5"], "--conditions"),
        (["--conditions", "k4,k4"], "--conditions"),
        (["--seeds", "x"], "--seeds"),
    ):
        r = CliRunner().invoke(app, ["ablate", "--out", str(tmp_path / "g"), *args])
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert field in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ablate_grid_on_tiny_toy(tmp_path, capsys):
    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")
    out = tmp_path / "grid"
    args = ["ablate", "--conditions", "k4,rho1", "--seeds", "0,1", "--out", str(out),
            *tiny_overrides(weights, tmp_path / "unused", **{"train.iterations": 2}), *EVAL]  # fmt: skip
    result = CliRunner().invoke(app, args)
    _ok(result)
    doc = json.loads((out / "ablation.json").read_text())
    assert [r["condition"] for r in doc["rows"]] == ["k4", "rho1"]
    assert len(doc["runs"]) == 4
    for row in doc["rows"]:
        assert row["seeds"] == [0, 1]
        for key in ("strict_base", "strict_delta", "reward_change", "foreground_change", "objects_change"):
            m, sd = row[key]
            assert m == m and sd >= 0  # finite mean, a spread over the two seeds
    runs = {(r["condition"], r["seed"]): r for r in doc["runs"]}
    # the base is evaluated once per seed and shared by the conditions
    for s in (0, 1):
        assert runs[("k4", s)]["strict_base"] == runs[("rho1", s)]["strict_base"]
    cache = json.loads((out / "base_eval_cache.json").read_text())
    assert sorted(e["key"]["seed"] for e in cache["entries"]) == [0, 1]
    # every run is an ordinary training run with its own folder, LoRA and report
    for c in ("k4", "rho1"):
        for s in (0, 1):
            d = out / c / f"seed{s}"
            assert (d / "lora").is_dir() and (d / "report.md").exists() and (d / "ablate_run.json").exists()
            assert f"seed: {s}" in (d / "config.yaml").read_text()
    cfg_k4 = (out / "k4" / "seed0" / "config.yaml").read_text()
    assert "num_probes: 4" in cfg_k4
    md = (out / "ablation.md").read_text()
    assert "K = 4" in md and "rho = 1.0" in md and "solace ablate --config" in md
    for png in ("ablation_curves.png", "ablation_accuracy.png"):
        assert (out / png).stat().st_size > 1000 and png in md
    assert "K = 4" in result.stdout  # the table is printed

    # a second call keeps finished runs; a run whose record is gone resumes from its checkpoint
    stamp = (out / "k4" / "seed0" / "ablate_run.json").stat().st_mtime_ns
    (out / "rho1" / "seed1" / "ablate_run.json").unlink()
    again = CliRunner().invoke(app, args)
    _ok(again)
    assert again.stdout.count("done before, kept") == 3
    assert "rho1 seed 1: resuming" in again.stdout
    assert (out / "k4" / "seed0" / "ablate_run.json").stat().st_mtime_ns == stamp

    # --collect-only trains nothing: the table holds what is finished
    args_more = [a if a != "k4,rho1" else "k4,rho1,k16" for a in args]
    partial = CliRunner().invoke(app, [*args_more, "--collect-only"])
    _ok(partial)
    assert partial.stdout.count("not finished, left out") == 2 and not (out / "k16").exists()
    assert [r["condition"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == ["k4", "rho1"]
    empty = CliRunner().invoke(app, ["ablate", "--out", str(tmp_path / "none"), "--collect-only"])
    assert empty.exit_code == 2 and "--collect-only" in empty.stderr and "Traceback" not in empty.output


def test_ablate_on_tiny_sd3(tmp_path, tiny_sd3_folder):
    from tiny_pipelines import train_overrides

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\ntwo blue squares\n")
    out = tmp_path / "grid"
    small = {"sampling.group_size": 2, "sampling.prompts_per_step": 1, "sampling.num_steps": 3,
             "train.micro_batch_size": 2, "train.iterations": 1}  # fmt: skip
    over = train_overrides(tiny_sd3_folder, tmp_path / "unused", prompts, **small)
    args = ["ablate", "--conditions", "k4,no_cfg", "--seeds", "0", "--out", str(out), *over]
    _ok(CliRunner().invoke(app, args))
    doc = json.loads((out / "ablation.json").read_text())
    assert [r["condition"] for r in doc["rows"]] == ["k4", "no_cfg"]
    for row in doc["rows"]:
        assert row["reward_change"][0] == row["reward_change"][0]  # finite
        assert row["strict_base"][0] != row["strict_base"][0]  # no exact evaluator here: NaN, shown as n/a
    assert "n/a" in (out / "ablation.md").read_text()
    assert (out / "ablation_curves.png").exists() and not (out / "ablation_accuracy.png").exists()
    assert (out / "no_cfg" / "seed0" / "lora").is_dir()


def test_summary_and_aggregate_by_hand():
    def run(cond, seed, base, trained, rewards, fg):
        hist = [{"reward/mean": r, "train/kl": 0.001 * i} for i, r in enumerate(rewards)]

        def ev(it, acc, fg, objs):
            return {"iteration": it, "strict": acc, "lenient": acc, "categories": {"colors": {"strict": acc}},
                    "images": {"foreground": fg, "objects": objs, "pixel_std": 0.5}}  # fmt: skip

        return {
            "condition": cond, "seed": seed,
            "monitor": "no collapse signal" if seed else "TRIPPED (1 warnings)",
            "evals": [ev(0, base, fg[0], 2.0), ev(4, trained, fg[1], 1.5)], "history": hist, "wall_s": 60.0,
        }  # fmt: skip

    raw = [
        run("k4", 0, 0.5, 0.6, [1, 2, 3, 4], [0.2, 0.05]),
        run("k4", 1, 0.5, 0.8, [1, 1, 1, 1], [0.2, 0.2]),
    ]
    s = summarize_run(raw[0])
    assert s["reward_first"] == 1.5 and s["reward_last"] == 3.5  # means of the first / last two iterations
    assert s["kl_last"] == pytest.approx(0.003)
    rows = aggregate([summarize_run(r) for r in raw], [resolve_condition("k4")])
    (row,) = rows
    assert row["strict_delta"][0] == pytest.approx(0.2)  # (0.1 + 0.3) / 2
    assert row["strict_delta"][1] == pytest.approx(0.1414213, rel=1e-5)  # sample sd of 0.1, 0.3
    assert row["reward_change"][0] == pytest.approx(1.0)  # (2 + 0) / 2
    assert row["foreground_change"][0] == pytest.approx(-0.375)  # relative: (-75 % + 0 %) / 2
    assert row["objects_change"] == (pytest.approx(-0.5), 0.0)  # absolute: 1.5 - 2.0 in both runs
    assert row["pixel_std_change"] == (0.0, 0.0)
    # the monitor is replayed on the logged statistics: seed 0's evaluation foreground fell below half
    assert s["monitor"].startswith("TRIPPED (1 warnings: eval_foreground")
    assert s["monitor_at_run"] == "TRIPPED (1 warnings)"
    assert row["tripped"] == 1 and row["minutes"][0] == pytest.approx(1.0)
    assert row["categories"]["colors"][0] == pytest.approx(0.2)
    md = markdown(rows, "# t")
    assert "| K = 4 | 2 | 0.500 | 0.700 ± 0.141 | +0.200 ± 0.141 |" in md and "-38% ± 53%" in md


def test_trainer_reuses_a_cached_base_evaluation(tmp_path):
    from solace.evaluation.cache import BaseEvalCache
    from solace.trainer.trainer import Trainer

    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")
    cache_path = tmp_path / "cache.json"
    over = tiny_overrides(weights, tmp_path / "run", **{"eval.base_cache": str(cache_path)}) + EVAL
    tr = Trainer(load_config(None, over))
    fake = {"overall": {"strict": 0.123, "lenient": 0.456}, "categories": {"colors": {"strict": 0.123}}}
    BaseEvalCache(cache_path, tr.evaluator.cache.key).put({"summary": fake, "per_prompt": []})
    assert tr.evaluate(0)["strict"] == 0.123  # read, not recomputed
    assert tr.evaluate(1)["strict"] != 0.123  # later evaluations always run (2 prompts x 1 sample)
    # another seed or CFG is another key: computed and added beside the first entry
    tr2 = Trainer(load_config(None, over + ["train.seed=7", "eval.cfg_scale=2.0"]))
    assert tr2.eval_cfg_scale == 2.0
    assert tr2.evaluate(0)["strict"] != 0.123
    assert len(json.loads(cache_path.read_text())["entries"]) == 2
    # other weights under the same path are another key too: a changed base is never served a stale result
    before = tr.evaluator.cache.key
    make_tiny_toy_weights(weights, seed=1)
    after = Trainer(load_config(None, over)).evaluator.cache.key
    assert after["model"] == before["model"] and after["weights_sha256"] != before["weights_sha256"]


def test_ablate_grid_on_two_gloo_processes(tmp_path):
    """Several runs in one distributed grid: the process group lives across runs (it is left once, at the
    end), every process trains every run, and only rank 0 writes the records and the table."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")
    out = tmp_path / "grid"
    script = Path(sys.executable).parent / "solace"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(script), "ablate", "--conditions", "k4,rho1", "--seeds", "0", "--out", str(out),
           *tiny_overrides(weights, tmp_path / "unused", **{"train.iterations": 1}), *EVAL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "ablation.json").read_text())
    assert [r["condition"] for r in doc["rows"]] == ["k4", "rho1"]
    for c in ("k4", "rho1"):
        rec = json.loads((out / c / "seed0" / "ablate_run.json").read_text())
        assert rec["evals"] and rec["condition"] == c  # written by rank 0, which evaluates
    assert done.stdout.count("wrote ") == 1  # one table, from rank 0
