"""`solace ablate --experiment FILE`: experiment definitions (bench/experiments/*.yaml) run by the ablation
runner: conditions with their own base config and settings, a control paired by seed, the evaluation after
training (base and trained model, the same noise), the per-seed and budget tables, and the errors of a bad
file. The bench files are read as data (YAML), never imported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from trainer_helpers import make_tiny_toy_weights, tiny_overrides
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.trainer.experiment import (
    budget_rows,
    load_experiment,
    minutes_to_gain,
    paired_rows,
    per_seed_markdown,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "bench" / "experiments").glob("*.yaml"))


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _one_line_error(result, field: str) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bench_experiments_load_and_lay_out_their_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their prompt files are relative to the repository
    assert {p.stem for p in EXPERIMENTS} >= {"nft_proof", "equal_wall", "toy_training"}
    for path in EXPERIMENTS:
        exp = load_experiment(path)
        r = CliRunner().invoke(
            app, ["ablate", "-e", str(path), "--dry-run", "--out", str(tmp_path / path.stem)]
        )
        _ok(r)
        lines = r.stdout.strip().splitlines()
        assert len(lines) == len(exp.select(None)) * len(exp.seeds)
        assert all(line.startswith("solace train --config ") for line in lines)
    # a condition with its own base config trains that config; the shared overrides and seeds reach every run
    wall = CliRunner().invoke(
        app, ["ablate", "-e", str(ROOT / "bench/experiments/equal_wall.yaml"), "--dry-run"]
    )
    by_cond = {
        line.split("output_dir=")[1].split()[0].split("/")[-2]: line
        for line in wall.stdout.strip().splitlines()
    }
    assert by_cond["flow_grpo"].startswith("solace train --config toy_verifiable ")
    assert by_cond["nft"].startswith("solace train --config toy_nft_verifiable ")
    assert all("train.max_minutes=22" in c and "train.seed=0" in c for c in by_cond.values())
    # the file's `run` list is the default; --conditions picks others of the file
    proof = ROOT / "bench/experiments/nft_proof.yaml"
    assert [c.name for c in load_experiment(proof).select(None)] == ["reward", "control"]
    r = CliRunner().invoke(
        app, ["ablate", "-e", str(proof), "--dry-run", "--seeds", "1", "--conditions", "solace_cfg"]
    )
    _ok(r)
    assert "--config toy_nft " in r.stdout and "reward.self_confidence.cfg_in_reward=True" in r.stdout
    assert "train.seed=1" in r.stdout and r.stdout.count("solace train") == 1


BAD = [
    ({"conditions": [{"name": "a"}], "colour": 1}, "--experiment"),
    ({"conditions": []}, "conditions"),
    ({"conditions": [{"name": "a", "sett": {}}]}, "conditions[0]"),
    ({"conditions": [{"set": {"optim.lr": 1e-3}}]}, "conditions[0].name"),
    ({"conditions": ["no_such_condition"]}, "--conditions"),
    ({"conditions": [{"name": "a"}, {"name": "a"}]}, "conditions"),
    ({"conditions": [{"name": "a"}], "control": "b"}, "control"),
    ({"conditions": [{"name": "a"}], "run": ["b"]}, "run"),
    ({"conditions": [{"name": "a"}], "tables": ["pie"]}, "tables"),
    ({"conditions": [{"name": "a"}], "curve": ["reward/mean", 3]}, "curve"),
    ({"conditions": [{"name": "a"}], "final_eval": {"seed": 5}}, "final_eval.seed"),
    ({"conditions": [{"name": "a"}], "final_eval": {"set": {"train.eval_samples": 8}}}, "final_eval.set"),
    # a key of an earlier version names the key that replaced it, in a condition and in the final evaluation
    ({"conditions": [{"name": "a", "set": {"train.eval_every": 5}}]}, "moved to eval.every"),
    ({"conditions": [{"name": "a"}], "final_eval": {"set": {"data.eval_prompts": "x"}}}, "to eval.prompts"),
    (
        {"conditions": [{"name": "a"}], "final_eval": {"set": {"eval.num_steps": 0}}},
        "eval.num_steps",
    ),
]


@pytest.mark.parametrize("doc,field", BAD)
def test_a_bad_experiment_file_is_a_one_line_error(tmp_path, doc, field):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert field in str(e.value)
    _one_line_error(CliRunner().invoke(app, ["ablate", "-e", str(path), "--dry-run"]), field)


def test_command_line_names_must_be_the_files(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"conditions": [{"name": "a"}, {"name": "b"}]}))
    _one_line_error(
        CliRunner().invoke(app, ["ablate", "-e", str(path), "--conditions", "c", "--dry-run"]), "'c'"
    )
    r = CliRunner().invoke(app, ["ablate", "-e", str(path), "--dry-run", "final_eval.train.seed=3"])
    _one_line_error(r, "final_eval")  # the file has no final evaluation to override
    path.write_text(yaml.safe_dump({"conditions": [{"name": "a"}], "final_eval": {"seed": 2000}}))
    bad_final = [("final_eval.seed=5", "final_eval.seed"), ("final_eval.eval.every=-1", "eval.every")]
    for bad, field in bad_final:
        _one_line_error(CliRunner().invoke(app, ["ablate", "-e", str(path), "--dry-run", bad]), field)
    exp = load_experiment(path)
    assert exp.split_overrides(["final_eval.seed=3000", "optim.lr=1e-3"]) == ["optim.lr=1e-3"]
    assert exp.final_eval.seed == 3000 and exp.final_overrides == ["final_eval.seed=3000"]
    _one_line_error(CliRunner().invoke(app, ["ablate", "-e", str(tmp_path / "none.yaml")]), "--experiment")


def _history(times: list[float]) -> list[dict[str, float]]:
    return [{"time/sampling": t / 2, "time/reward": t / 4, "time/update": t / 4} for t in times]


def test_minutes_to_gain_by_hand():
    hist = _history([10.0, 10.0, 20.0, 20.0])  # 60 s logged; the run took 120 s: each second counts twice
    evals = [
        {"iteration": 0, "strict": 0.30},
        {"iteration": 2, "strict": 0.33},
        {"iteration": 4, "strict": 0.36},
    ]
    assert minutes_to_gain(hist, evals, 120.0, 0.05) == pytest.approx(2 * 60 / 60)  # all 4 iterations
    assert minutes_to_gain(hist, evals, 120.0, 0.02) == pytest.approx(2 * 20 / 60)  # reached at iteration 2
    assert minutes_to_gain(hist, evals, 120.0, 0.10) is None  # never reached
    assert minutes_to_gain([], evals, 120.0, 0.05) is None


def _run(cond: str, seed: int, base: float, after: float, final: tuple[float, float] | None = None) -> dict:
    ev = [
        {"iteration": 0, "strict": base, "lenient": base, "categories": {"counting": {"strict": base}}},
        {"iteration": 4, "strict": after, "lenient": after, "categories": {"counting": {"strict": after}}},
    ]
    rec = {"condition": cond, "seed": seed, "evals": ev, "wall_s": 120.0, "samples_per_iteration": 8}
    rec["history"] = _history([30.0] * 4)
    if final:
        rec["final_evals"] = [{**ev[0], "strict": final[0]}, {**ev[1], "strict": final[1]}]
    return rec


def test_paired_budget_and_per_seed_tables_by_hand():
    raw = [
        _run("reward", 0, 0.30, 0.40, (0.20, 0.26)),
        _run("control", 0, 0.30, 0.32, (0.20, 0.21)),
        _run("reward", 1, 0.50, 0.45, (0.40, 0.41)),  # seed 1 has no control: no paired row
    ]
    rows = paired_rows(raw, "control", [0, 1])
    assert len(rows) == 1 and rows[0]["seed"] == 0 and rows[0]["condition"] == "reward"
    r = rows[0]
    assert (r["train_eval_base"], r["train_eval"], r["train_eval_control"]) == (0.30, 0.40, 0.32)
    assert (r["final_base"], r["final"], r["final_control"]) == (0.20, 0.26, 0.21)
    assert r["minutes"] == r["minutes_control"] == 2.0
    budget = {(b["condition"], b["seed"]): b for b in budget_rows(raw, 0.05)}
    b = budget[("reward", 0)]
    assert b["iterations"] == 4 and b["samples_per_s"] == pytest.approx(8 * 4 / 120.0)
    assert b["train_eval"] == (0.30, 0.40) and b["final"] == (0.20, 0.26)
    assert b["minutes_to_gain"] == pytest.approx(2.0) and budget[("reward", 1)]["minutes_to_gain"] is None
    assert math.isnan(b["kl_last"])  # nothing logged

    class Cond:
        name, label = "reward", "the reward"

    md = "\n".join(per_seed_markdown(raw, Cond()))
    # the final evaluation when there is one: base = mean of the seeds' bases, change = mean of the changes
    assert "| seed 0 | seed 1 |" in md
    assert "| **overall strict** | 0.300 | 0.260 | 0.410 | +0.035 |" in md
    assert "| training wall time (s) | | 120 | 120 | |" in md


def test_experiment_end_to_end_on_tiny_toy(tmp_path):
    """Two conditions (one on its own base config and settings, one the random-reward control) x two seeds,
    one iteration each, the evaluation after training on other settings with a fixed seed."""
    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")
    prompts = ROOT / "bench" / "data" / "heldout_2_per_category.jsonl"
    exp = {
        "config": "toy",
        "seeds": [0, 1],
        "overrides": [*tiny_overrides(weights, tmp_path / "unused", **{"train.iterations": 1})],
        "conditions": [
            {
                "name": "nft",
                "config": "toy_nft_verifiable",
                "set": {"train.micro_batch_size": 4},
                "label": "NFT",
            },
            {"name": "control", "from": "random_reward"},
        ],
        "control": "control",
        "final_eval": {
            "set": {
                "eval.prompts": str(prompts),
                "eval.num_steps": 2,
                "eval.cfg_scale": 3.0,
            },
            "seed": 1234,
        },
        "tables": ["per_seed", "budget"],
        "curve": ["reward/mean", "monitor/texture"],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    out = tmp_path / "grid"
    evals = ["train.report=true", "eval.prompts_limit=2", "eval.samples_per_prompt=1"]
    evals += ["eval.num_steps=2"]
    args = [
        "ablate",
        "-e",
        str(path),
        "--out",
        str(out),
        *evals,
        "final_eval.eval.samples_per_prompt=1",
    ]
    _ok(CliRunner().invoke(app, args))
    recs = {
        (c, s): json.loads((out / c / f"seed{s}" / "ablate_run.json").read_text())
        for c in ("nft", "control")
        for s in (0, 1)
    }
    # the condition's own base config and settings; the control's reward over the experiment's base
    assert "algorithm: nft" in (out / "nft" / "seed0" / "config.yaml").read_text()
    assert "algorithm: flow_grpo" in (out / "control" / "seed0" / "config.yaml").read_text()
    assert "name: random" in (out / "control" / "seed0" / "config.yaml").read_text()
    # the evaluation after training: base then trained, paired; with a fixed seed one base for every run
    finals = [r["final_evals"] for r in recs.values()]
    assert all(len(f) == 2 and f[1]["iteration"] == 1 for f in finals)
    assert len({json.dumps(f[0], sort_keys=True) for f in finals}) == 1
    cache = json.loads((out / "base_eval_cache.json").read_text())["entries"]
    final_keys = [e["key"] for e in cache if e["key"]["eval_prompts"] == str(prompts)]
    assert len(final_keys) == 1 and final_keys[0]["seed"] == 1234 - 999 and final_keys[0]["samples"] == 1
    # the training evaluations' bases: per seed (and per evaluation set: the nft preset has its own)
    assert sorted(e["key"]["seed"] for e in cache if e["key"] not in final_keys) == [0, 0, 1, 1]
    doc = json.loads((out / "ablation.json").read_text())
    assert [(p["condition"], p["seed"]) for p in doc["paired"]] == [("nft", 0), ("nft", 1)]
    assert doc["paired"][0]["final_base"] == finals[0][0]["strict"]
    assert {(b["condition"], b["seed"]) for b in doc["budget"]} == set(recs)
    assert all(b["iterations"] == 1 and b["samples_per_s"] > 0 for b in doc["budget"])
    md = (out / "ablation.md").read_text()
    for text in ("Final evaluation", "Against the control `control`", "NFT, seed by seed", "Budget:"):
        assert text in md, text
    assert "solace ablate --experiment" in md and "final_eval.eval.samples_per_prompt=1" in md
    assert (out / "paired_curves.png").stat().st_size > 1000 and "paired_curves.png" in md
    assert load_experiment(path).curve == ["reward/mean", "monitor/texture"]  # a row of panels each
    w, h = Image.open(out / "paired_curves.png").size
    assert h > 0.6 * w  # two seeds side by side (11 in), two rows of 4 in (one row: 0.36)
    # --collect-only tabulates the finished runs again without training or evaluating
    stamp = (out / "nft" / "seed0" / "ablate_run.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, [*args, "--collect-only"])
    _ok(again)
    assert again.stdout.count("done before, kept") == 4
    assert (out / "nft" / "seed0" / "ablate_run.json").stat().st_mtime_ns == stamp


def test_final_evaluation_of_a_run_on_a_merged_lora_starts_from_that_model(tmp_path: Path) -> None:
    """A run on top of an earlier LoRA folded into the base (``model.lora.merge_init``, the two-stage runs)
    is evaluated after training against that model, not the bare base: its base record is the merged
    model's, and with a fresh (no-op) LoRA exported the trained record equals it. Without merge_init (the
    earlier LoRA trained on, exported with the run) the base is the bare one, which the earlier LoRA visibly
    changes."""
    from solace.models.lora import add_lora, save_lora
    from solace.toy.adapter import ToyAdapter
    from solace.trainer.config import load_config
    from solace.trainer.experiment import FinalEval, final_evaluation

    weights = make_tiny_toy_weights(tmp_path / "toy.safetensors")
    stage1 = ToyAdapter(weights=weights)
    add_lora(stage1.denoiser, 4, 8, ToyAdapter.lora_target_modules)
    with torch.no_grad():
        for name, p in stage1.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # PEFT's LoRA starts as a no-op: make the earlier LoRA act
    init = save_lora(stage1, tmp_path / "stage1")
    run = tmp_path / "run"
    fresh = ToyAdapter(weights=weights)
    add_lora(fresh.denoiser, 4, 8, ToyAdapter.lora_target_modules)  # the run's exported LoRA: a no-op
    save_lora(fresh, run / "lora")
    final = FinalEval(
        {"eval": {"prompts": str(ROOT / "bench" / "data" / "heldout_2_per_category.jsonl"), "num_steps": 2}},
        1234,
    )

    def evaluate(**lora: object) -> list[dict]:
        over = {"eval.samples_per_prompt": 2, "model.lora.init_from": str(init), **lora}
        cfg = load_config("toy", tiny_overrides(weights, run, **over))
        return final_evaluation(cfg, final, 1)

    def same(a: dict, b: dict) -> bool:
        """The same images up to float rounding (a no-op LoRA's forward rounds like the bare layer's on
        some CPUs only: under ATEN_CPU_CAPABILITY=default they differ in the 9th digit)."""
        stats = [(x["images"]["foreground"], x["images"]["pixel_std"]) for x in (a, b)]
        return a["strict"] == b["strict"] and stats[0] == pytest.approx(stats[1], rel=1e-6, abs=1e-9)

    merged_base, merged_trained = evaluate(**{"model.lora.merge_init": True})
    kept_apart = evaluate(**{"model.lora.merge_init": False})[0]
    bare = evaluate(**{"model.lora.init_from": ""})[0]
    assert same(merged_trained, merged_base)  # a no-op LoRA on the merged model
    assert not same(merged_base, bare)  # the earlier LoRA is in the merged run's base (foreground 0.47, 0.39)
    assert same(kept_apart, bare)  # a LoRA kept apart (trained on): the base is the bare one
