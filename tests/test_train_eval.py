"""Evaluation during training for every model (issue 16): `solace train` on tiny SD3 and FLUX pipelines with
registry metrics (a tiny offline CLIP for CLIPScore) writes base and current evaluations to evals.json,
tensorboard and the report, equal to `solace eval` on the same prompts, noise and LoRA; the metric
evaluator's base is sampled once (and read from the cache); config errors name the field."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.trainer.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import (  # noqa: E402
    TINY_RESOLUTION,
    TINY_T5_MAX_LEN,
    make_tiny_flux,
    make_tiny_sd3,
    save_tiny_pipeline,
    train_overrides,
)

torch.set_num_threads(1)

TRAIN = ["a red circle", "two blue squares", "a cat left of a dog"]
HELD_OUT = ["a green apple on a table", "three yellow stars", "a dog above a car"]
SAMPLES = 2
EVAL_STEPS = 3
# `solace eval` has no option for the T5 length: the runs use each adapter's default, as `solace eval` does
T5_DEFAULT = {"sd3": 256, "flux": 512}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random transformers CLIPModel + tokenizer saved offline (CLIPScore without downloads)."""
    from test_external_rewards import tiny_clip_config, tiny_clip_tokenizer
    from transformers import CLIPModel

    d = tmp_path_factory.mktemp("train_eval_clip")
    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tok), tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _files(tmp_path: Path) -> tuple[Path, Path]:
    train, held = tmp_path / "train.txt", tmp_path / "heldout.txt"
    train.write_text("\n".join(TRAIN) + "\n")
    held.write_text("\n".join(HELD_OUT) + "\n")
    return train, held


def _overrides(kind: str, folder: Path, out: Path, tmp_path: Path, clip: str, **extra: object) -> list[str]:
    train, held = _files(tmp_path)
    settings: dict[str, object] = {
        "eval.prompts": str(held),
        "model.max_sequence_length": T5_DEFAULT[kind],
        "eval.every": 1,
        "eval.samples_per_prompt": SAMPLES,
        "train.checkpoint_every": 10,
        "eval.num_steps": EVAL_STEPS,
        "eval.metrics": "[clip_score]",
        # no clamp at 0: a random tiny CLIP's cosines are as often negative as positive
        "eval.metric_args": f"{{clip_score: {{model: '{clip}', device: cpu, clamp: false}}}}",
        "eval.metric_grid_rows": 2,
    }
    if kind == "flux":
        settings["sampling.cfg_scale"] = 1.0
    settings.update(extra)
    return train_overrides(folder, out, train, **settings)


def _scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_metric_evaluations_during_training_equal_solace_eval(kind, tmp_path, tiny_clip):
    pipe = make_tiny_flux(seed=0) if kind == "flux" else make_tiny_sd3(seed=0, with_t5=True)
    folder = save_tiny_pipeline(pipe, tmp_path / "pipe")
    run = tmp_path / "run"
    preset = tmp_path / "empty.yaml"
    preset.write_text("{}\n")
    over = _overrides(kind, folder, run, tmp_path, tiny_clip)
    res = CliRunner().invoke(app, ["train", "--config", str(preset), *over])
    assert res.exit_code == 0, res.output
    assert "heldout.txt (base -> iteration 2): CLIPScore" in res.stdout

    evals = json.loads((run / "evals.json").read_text())
    assert [e["iteration"] for e in evals] == [0, 1, 2]  # before training, eval.every=1, at the end
    base = evals[0]["base"]
    for e in evals:
        assert e["evaluator"] == "metrics" and set(e["metrics"]) == {"clip_score"}
        assert e["base"] == base  # the LoRA-off base, evaluated once
        assert len(e["per_prompt"]["clip_score"]) == len(HELD_OUT)
        assert e["settings"]["seed"] == 999 and e["settings"]["samples_per_prompt"] == SAMPLES
        assert math.isfinite(e["metrics"]["clip_score"]) and e["images"]["pixel_std"] > 0
        assert (run / e["grid"]).is_file()
    assert evals[0]["metrics"] == base  # the zero LoRA is the base
    assert evals[-1]["metrics"]["clip_score"] != base["clip_score"]  # training moved the images

    # tensorboard: the current model and the base at every evaluation
    now = _scalars(run / "tb", "eval/clip_score")
    assert [s for s, _ in now] == [0, 1, 2]
    for (_, v), e in zip(now, evals, strict=True):
        assert v == pytest.approx(e["metrics"]["clip_score"], rel=1e-6)
    assert [v for _, v in _scalars(run / "tb", "eval_base/clip_score")] == pytest.approx(
        [base["clip_score"]] * 3, rel=1e-6
    )

    # the report: table (base and every evaluation), curves, the last evaluation's grid
    report = (run / "report.md").read_text()
    assert "## Held-out metrics" in report and "| model | CLIPScore |" in report
    assert "| base | " in report and "| iteration 2 | " in report
    assert f"![eval grid]({evals[-1]['grid']})" in report and (run / "report_curves.png").is_file()

    # `solace eval` on the same prompts, noise (seed 999), steps, CFG, batching and the exported LoRA
    cfg = load_config(None, over)
    args = [
        "eval", "--suite", "drawbench", "--prompts", cfg.eval.prompts, "--model", str(folder),
        "--lora", str(run / "lora"), "--metrics", "clip_score",
        "--metric-arg", f"clip_score.model={tiny_clip}", "--metric-arg", "clip_score.device=cpu",
        "--metric-arg", "clip_score.clamp=false", "--samples", str(SAMPLES), "--steps", str(EVAL_STEPS),
        "--cfg", str(cfg.eval.cfg_scale or cfg.sampling.cfg_scale), "--seed", "999",
        "--batch-size", str(cfg.eval.batch_size), "--resolution", str(TINY_RESOLUTION), "--device", "cpu",
        "--out", str(tmp_path / "eval"),
    ]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["summary"]["base"]["clip_score"] == pytest.approx(base["clip_score"], rel=1e-5)
    assert doc["summary"]["lora"]["clip_score"] == pytest.approx(evals[-1]["metrics"]["clip_score"], rel=1e-5)
    for i, rec in enumerate(doc["per_prompt"]):
        assert rec["scores"]["lora"]["clip_score"] == pytest.approx(
            evals[-1]["per_prompt"]["clip_score"][i], rel=1e-5
        )


def test_metric_evaluator_samples_the_base_once_and_caches_it(tmp_path, tiny_clip):
    """Evaluations of the base and the current model are paired (the same noise): with the LoRA unchanged
    every evaluation repeats the same numbers; the base is sampled once a run, and not at all on a cache
    hit; a LoRA kept apart from the base (init_from) is evaluated at iteration 0 rather than assumed zero."""
    from test_sd3_flux import perturb_lora

    from solace.evaluation.cache import BaseEvalCache
    from solace.evaluation.evaluators import MetricsEvaluator, eval_suite
    from solace.evaluation.metrics_eval import build_metrics
    from solace.models.lora import add_lora
    from solace.models.sd3 import SD3_LORA_TARGETS, SD3Adapter

    _, held = _files(tmp_path)
    a = SD3Adapter(make_tiny_sd3(seed=0), resolution=TINY_RESOLUTION, max_sequence_length=TINY_T5_MAX_LEN)
    add_lora(a.denoiser, rank=2, alpha=2, target_modules=SD3_LORA_TARGETS)
    clip = {"model": tiny_clip, "device": "cpu", "clamp": False}
    metrics = build_metrics(["clip_score"], {"clip_score": clip})
    cache = BaseEvalCache(tmp_path / "cache.json", {"k": 1})
    kw = dict(samples=1, steps=2, cfg_scale=3.0, seed=5, out_dir=tmp_path, grid_prompts=2, cache=cache)
    ev = MetricsEvaluator(a, eval_suite(str(held), limit=2), metrics, **kw)
    first = ev.evaluate(0)
    assert ev.base_passes == 1 and first["metrics"] == first["base"]
    perturb_lora(a.denoiser, std=0.5)
    later = [ev.evaluate(3), ev.evaluate(6)]
    assert ev.base_passes == 1
    assert later[0]["metrics"] == later[1]["metrics"] != first["base"]  # same noise, same weights
    assert all(r["base"] == first["base"] for r in later)
    assert (tmp_path / "eval_images" / "iter_000006.png").is_file()
    # a second run with the same key reads the base from the cache
    again = MetricsEvaluator(a, eval_suite(str(held), limit=2), metrics, **{**kw, "starts_at_base": False})
    rec = again.evaluate(0)
    assert again.base_passes == 0 and rec["base"] == first["base"]
    assert rec["metrics"] == later[0]["metrics"]  # init_from-like: iteration 0 sampled with the LoRA on


def test_eval_config_errors_name_the_field(tmp_path, tiny_sd3_folder):
    train, held = _files(tmp_path)

    def load(**extra: object):
        return load_config(None, train_overrides(tiny_sd3_folder, tmp_path / "r", train, **extra))

    with pytest.raises(ConfigError, match=r"^eval\.every: nothing evaluates .*eval\.metrics="):
        load(**{"eval.every": 5, "eval.prompts": str(held)})
    with pytest.raises(ConfigError, match=r"^eval\.metrics: unknown metric 'fid'"):
        load(**{"eval.metrics": "[fid]"})
    with pytest.raises(ConfigError, match=r"^eval\.metric_args\.clip_score: clip_score takes no argument"):
        load(**{"eval.metrics": "[clip_score]", "eval.metric_args": "{clip_score: {modle: x}}"})
    with pytest.raises(ConfigError, match=r"^eval\.metric_args: has arguments for 'ocr'"):
        load(**{"eval.metrics": "[clip_score]", "eval.metric_args": "{ocr: {a: 1}}"})
    with pytest.raises(ConfigError, match=r"^eval\.metrics: eval\.evaluator=metrics needs at least one"):
        load(**{"eval.evaluator": "metrics"})
    with pytest.raises(ConfigError, match=r"^eval\.evaluator: toy: the exact evaluator scores the toy world"):
        load(**{"eval.evaluator": "toy"})
    with pytest.raises(ConfigError, match=r"^eval\.batch_size: must be >= 1"):
        load(**{"eval.batch_size": 0})
    with pytest.raises(ConfigError, match=r"^eval\.prompts: the GenEval metric needs GenEval metadata"):
        from solace.evaluation.evaluators import make_evaluator
        from solace.trainer.config import eval_setup

        cfg = load(**{"eval.metrics": "[geneval]", "eval.prompts": str(held)})
        make_evaluator(eval_setup(cfg, 4.0), None, tmp_path)
    # evaluations switched off explicitly: no error, nothing evaluates
    cfg = load(**{"eval.every": 5, "eval.evaluator": "none"})
    assert cfg.eval.evaluator == "none"


def test_resume_check_knows_the_eval_and_tracker_fields():
    """Trackers and the grid's rows may change on --resume; the evaluator's settings may not (the recorded
    evaluations would no longer compare), and say why."""
    from dataclasses import asdict

    from solace.trainer.config import SolaceConfig
    from solace.trainer.resume_check import check_resume

    old, new = asdict(SolaceConfig()), asdict(SolaceConfig())
    new["train"]["log_with"] = ["tensorboard", "wandb"]
    new["eval"]["metric_grid_rows"] = 2
    assert len(check_resume(old, new)) == 2
    new["eval"]["metrics"] = ["clip_score"]
    with pytest.raises(ConfigError, match=r"eval\.metrics: \[\] -> \['clip_score'\] \(evaluation only"):
        check_resume(old, new)
