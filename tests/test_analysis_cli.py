"""Self-confidence without training: the selection/AUC math by hand, and `solace score / rerank / analyze
rationale` end to end on a tiny random toy model (and `score` on a tiny SD3 pipeline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import make_tiny_toy_weights
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.evaluation import analysis

torch.set_num_threads(1)


def _one_line_error(result) -> str:
    """The CLI's error output: exit status 2, no traceback, exactly one line."""
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    return text


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _finite_numbers(obj) -> int:
    """Count the numbers in a JSON document, asserting each is finite (``None`` is allowed: no AUC)."""
    if isinstance(obj, dict):
        return sum(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_finite_numbers(v) for v in obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return 0
    assert math.isfinite(obj), obj
    return 1


def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# ------------------------------------------------------------------------------------------------ math


def test_auc_by_hand():
    assert analysis.auc([3, 1, 2], [True, False, False]) == 1.0
    assert analysis.auc([1, 3, 2], [True, False, False]) == 0.0
    assert analysis.auc([2, 2, 1], [True, False, False]) == 0.75  # (1/2 tie + 1 win) / 2 pairs
    assert analysis.auc([1, 1], [True, False]) == 0.5
    assert analysis.auc([1, 2], [True, True]) is None and analysis.auc([1, 2], [False, False]) is None
    with pytest.raises(ConfigError, match="labels"):
        analysis.auc([1, 2, 3], [True, False])


def test_selection_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.9], [0.5, 0.4, 0.3, 0.2]])
    correct = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    # N = 4: picks 1 (right), 3 (wrong), 0 (wrong)
    assert analysis.best_of_n(scores, correct) == pytest.approx(1 / 3)
    assert analysis.random_pick(correct) == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert analysis.oracle(correct) == pytest.approx(2 / 3)
    # N = 1: the first sample of each group
    assert analysis.best_of_n(scores, correct, 1) == 0.0 and analysis.oracle(correct, 1) == 0.0
    # N = 2 prefixes: picks 1 (right), 0 (wrong), 0 (wrong); random (0.5 + 0 + 0) / 3
    sel = analysis.selection(scores, correct, [2, 4])
    assert sel[2] == pytest.approx({"best": 1 / 3, "random": 1 / 6, "oracle": 1 / 3})
    assert list(sel) == [2, 4]
    assert analysis.group_aucs(scores, correct) == [1.0, pytest.approx(1 / 3), None]  # 0.3 beats 0.1 only
    assert analysis.mean_auc(scores, correct) == {"auc": pytest.approx(2 / 3), "groups_with_both": 2}
    with pytest.raises(ConfigError, match="n:"):
        analysis.best_of_n(scores, correct, 5)


def test_mean_spread_and_summary(tmp_path):
    assert analysis.mean_spread([1.0]) == {"mean": 1.0, "std": 0.0, "values": [1.0]}
    ms = analysis.mean_spread([0.0, 1.0])
    assert ms["mean"] == 0.5 and ms["std"] == pytest.approx(math.sqrt(0.5))
    runs = [
        {2: {"best": 0.5, "random": 0.2, "oracle": 1.0}},
        {2: {"best": 0.7, "random": 0.4, "oracle": 1.0}},
    ]
    summ = analysis.summarize_selection(runs)
    assert summ[2]["best"]["mean"] == pytest.approx(0.6) and summ[2]["oracle"]["std"] == 0.0
    md = analysis.selection_markdown(summ)
    assert "| 2 | 0.600 ± 0.141 | 0.300 ± 0.141 | 1.000 ± 0.000 |" in md
    _valid_png(analysis.plot_selection(summ, tmp_path / "sel.png"))
    _valid_png(analysis.plot_distributions({"a": [1.0, 2.0], "b": [1.5]}, tmp_path / "d.png"))


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    return str(make_tiny_toy_weights(tmp_path_factory.mktemp("toy") / "tiny.safetensors"))


@pytest.fixture(scope="module")
def toy_prompt_file(tmp_path_factory):
    """Three held-out toy records of different categories, as GenEval-format .jsonl."""
    from solace.toy.world import load_heldout

    held = list(load_heldout())
    picks = [next(r for r in held if r.tag == c) for c in ("single_object", "two_object", "counting")]
    f = tmp_path_factory.mktemp("prompts") / "toy.jsonl"
    f.write_text("".join(json.dumps(r.to_json()) + "\n" for r in picks))
    return str(f)


FAST = ["--steps", "2", "--probes", "2", "--threads", "1", "--device", "cpu"]


def test_score_images_on_toy(tmp_path, tiny_toy):
    paths = []
    for k in range(2):
        arr = np.random.default_rng(k).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        p = tmp_path / f"img{k}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    out = tmp_path / "score"
    args = [
        "score",
        "--model",
        tiny_toy,
        "--prompt",
        "a photo of a circle",
        "--images",
        *paths,
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args + FAST)
    _ok(result)
    doc = json.loads((out / "score.json").read_text())
    assert set(doc) == {"settings", "timesteps", "scores"} and len(doc["timesteps"]) == 2
    assert [r["image"] for r in doc["scores"]] == paths
    for r in doc["scores"]:
        assert set(r) == {"prompt", "image", "R", "S_t"} and len(r["S_t"]) == 2
        assert r["R"] == pytest.approx(sum(r["S_t"]) / 2)  # uniform weights
    assert _finite_numbers(doc) > 0
    assert "img1.png" in result.stdout


def test_score_generated_on_tiny_sd3(tmp_path, tiny_sd3_folder):
    out = tmp_path / "score"
    args = ["score", "--model", str(tiny_sd3_folder), "--prompt", "a red cat", "--generate", "2",
            "--resolution", "16", "--cfg", "3", "--out", str(out)]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    doc = json.loads((out / "score.json").read_text())
    assert doc["settings"]["source"] == "generated" and doc["settings"]["samples_per_prompt"] == 2
    assert len(doc["scores"]) == 2 and _finite_numbers(doc) > 0
    for r in doc["scores"]:
        assert _valid_png(out / r["image"]) == (16, 16)
    # the written images scored back through the VAE encoder (encode_images)
    paths = [str(out / r["image"]) for r in doc["scores"]]
    back = tmp_path / "back"
    args = ["score", "--model", str(tiny_sd3_folder), "--prompt", "a red cat", "--images", *paths,
            "--resolution", "16", "--out", str(back)]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    doc = json.loads((back / "score.json").read_text())
    assert doc["settings"]["source"] == "images" and len(doc["scores"]) == 2 and _finite_numbers(doc) > 0


def test_score_on_tiny_flux(tmp_path, tiny_flux_folder):
    out = tmp_path / "score"
    args = ["score", "--model", str(tiny_flux_folder), "--prompt", "a red cat", "--generate", "2",
            "--resolution", "16", "--cfg", "1", "--out", str(out)]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    doc = json.loads((out / "score.json").read_text())
    paths = [str(out / r["image"]) for r in doc["scores"]]
    args = ["score", "--model", str(tiny_flux_folder), "--prompt", "a red cat", "--images", *paths,
            "--resolution", "16", "--out", str(tmp_path / "back")]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    back = json.loads((tmp_path / "back" / "score.json").read_text())
    assert len(doc["scores"]) == len(back["scores"]) == 2
    assert _finite_numbers(doc) > 0 and _finite_numbers(back) > 0


def test_rerank_on_toy(tmp_path, tiny_toy, toy_prompt_file):
    out = tmp_path / "rerank"
    args = ["rerank", "--model", tiny_toy, "--prompts", toy_prompt_file, "--limit", "2", "--n", "1,2,3",
            "--seeds", "0,1", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args + FAST)
    _ok(result)
    doc = json.loads((out / "rerank.json").read_text())
    assert {"settings", "timesteps", "summary", "per_seed", "per_prompt"} <= set(doc)
    assert set(doc["summary"]) == {"1", "2", "3"}
    for row in doc["summary"].values():
        assert set(row) == {"best", "random", "oracle"}
        for v in row.values():
            assert len(v["values"]) == 2 and 0.0 <= v["mean"] <= 1.0
    # best-of-1 is the first sample, i.e. its expected value is the random pick of N = 1
    assert doc["summary"]["1"]["best"]["mean"] == doc["summary"]["1"]["random"]["mean"]
    assert len(doc["per_prompt"]) == 4 and len(doc["per_prompt"][0]["R"]) == 3
    assert _finite_numbers(doc) > 0
    assert (out / "rerank.md").read_text().count("\n| ") == 4  # header + 3 rows
    _valid_png(out / "rerank.png")
    assert "best-of-N" in result.stdout


def test_rerank_without_evaluator_writes_selected_images(tmp_path, tiny_toy):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    out = tmp_path / "rerank"
    args = [
        "rerank",
        "--model",
        tiny_toy,
        "--prompts",
        str(prompts),
        "--n",
        "2",
        "--seeds",
        "0",
        "--out",
        str(out),
    ]
    _ok(CliRunner().invoke(app, args + FAST))
    doc = json.loads((out / "rerank.json").read_text())
    assert "summary" not in doc and not (out / "rerank.png").exists()
    for row in doc["per_prompt"]:
        assert 0 <= row["selected"]["2"] < 2
        _valid_png(out / row["images"]["2"])


def test_analyze_rationale_on_toy(tmp_path, tiny_toy, toy_prompt_file):
    out = tmp_path / "rationale"
    args = ["analyze", "rationale", "--model", tiny_toy, "--prompts", toy_prompt_file, "--samples", "2",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args + FAST)
    _ok(result)
    doc = json.loads((out / "rationale.json").read_text())
    assert list(doc["regimes"]) == ["2 steps, no CFG", "2 steps, CFG 7", "4 steps, CFG 7"]
    for r in doc["regimes"].values():
        assert {
            "R_mean",
            "R_std",
            "R",
            "auc",
            "auc_per_category",
            "auc_per_timestep",
            "strict_accuracy",
        } <= set(r)
        assert np.asarray(r["R"]).shape == (3, 2) and len(r["auc_per_timestep"]) == 2
    assert _finite_numbers(doc) > 0
    assert "AUC of S_t alone" in (out / "rationale.md").read_text()
    _valid_png(out / "rationale.png")


def test_rerank_and_rationale_on_tiny_sd3(tmp_path, tiny_sd3_folder):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\ntwo blue squares\n")
    sd3 = ["--model", str(tiny_sd3_folder), "--prompts", str(prompts), "--resolution", "16"]
    out = tmp_path / "rerank"
    _ok(CliRunner().invoke(app, ["rerank", *sd3, "--n", "1,2", "--seeds", "0", "--out", str(out)] + FAST))
    doc = json.loads((out / "rerank.json").read_text())
    assert "summary" not in doc and len(doc["per_prompt"]) == 2  # no exact evaluator: selections only
    for row in doc["per_prompt"]:
        assert len(row["R"]) == 2 and 0 <= row["selected"]["2"] < 2
        assert _valid_png(out / row["images"]["2"]) == (16, 16)
    out = tmp_path / "rationale"
    _ok(CliRunner().invoke(app, ["analyze", "rationale", *sd3, "--samples", "2", "--out", str(out)] + FAST))
    doc = json.loads((out / "rationale.json").read_text())
    assert list(doc["regimes"]) == ["2 steps, no CFG", "2 steps, CFG 7", "4 steps, CFG 7"]
    for r in doc["regimes"].values():
        assert np.asarray(r["R"]).shape == (2, 2) and np.isfinite(r["R_mean"])
    _valid_png(out / "rationale.png")


def test_bad_options_are_one_line_errors(tmp_path, tiny_toy):
    runner = CliRunner()
    cases = [
        (["rerank", "--n", "0,4"], "--n"),
        (["rerank", "--n", "four"], "--n"),
        (["rerank", "--seeds", ""], "--seeds"),
        (["rerank", "--probes", "3"], "--probes"),
        (["rerank", "--prompts", str(tmp_path / "none.txt")], "--prompts"),
        (["analyze", "rationale", "--samples", "0"], "--samples"),
        (["analyze", "rationale", "--sampler", "euler"], "--sampler"),
        (["analyze", "rationale", "--limit", "-1"], "--limit"),
        (["score", "--prompt", "a circle"], "--images"),
        (["score", "--prompt", "a circle", "--generate", "2", "--images", "x.png"], "--images"),
        (["score", "--generate", "2"], "--prompt"),
        (["score", "--prompt", "a circle", "--images", str(tmp_path / "no.png")], "--images"),
    ]
    for args, option in cases:
        text = _one_line_error(runner.invoke(app, [*args, "--model", tiny_toy, "--threads", "1"]))
        assert f"error: {option}:" in text, (args, text)


def test_toy_figures_with_a_stub_evaluator(tmp_path, tiny_toy, toy_prompt_file, monkeypatch):
    """A random tiny model is never right, so stub the evaluator (even samples correct) to check the wiring
    of best-of-N / random / oracle and of the per-category and per-timestep AUCs."""
    from solace.evaluation import confidence

    def stub(adapter, z0, judge, i):
        return np.arange(z0.shape[0]) % 2 == 0

    monkeypatch.setattr(confidence, "judged", stub)
    out = tmp_path / "rerank"
    args = ["rerank", "--model", tiny_toy, "--prompts", toy_prompt_file, "--n", "1,2,3", "--seeds", "0,1",
            "--out", str(out)]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    summ = json.loads((out / "rerank.json").read_text())["summary"]
    assert [summ[n]["oracle"]["mean"] for n in ("1", "2", "3")] == [1.0, 1.0, 1.0]
    assert [summ[n]["random"]["mean"] for n in ("1", "2", "3")] == pytest.approx([1.0, 0.5, 2 / 3])
    assert summ["1"]["best"]["mean"] == 1.0 and summ["2"]["best"]["std"] >= 0.0
    out = tmp_path / "rationale"
    args = ["analyze", "rationale", "--model", tiny_toy, "--prompts", toy_prompt_file, "--samples", "2",
            "--out", str(out)]  # fmt: skip
    _ok(CliRunner().invoke(app, args + FAST))
    for r in json.loads((out / "rationale.json").read_text())["regimes"].values():
        assert r["groups_with_both"] == 3 and r["strict_accuracy"] == 0.5
        assert 0.0 <= r["auc"] <= 1.0 and all(0.0 <= x <= 1.0 for x in r["auc_per_timestep"])
        assert set(r["auc_per_category"]) == {"single_object", "two_object", "counting"}
    assert "| regime | single_object | two_object | counting |" in (out / "rationale.md").read_text()
