"""`solace eval` on file prompt suites with registry metrics: suite loading, the table, and an end-to-end run
on a tiny SD3 pipeline + LoRA with a tiny offline CLIP (CLIPScore) and the real OCR recogniser."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.evaluation.metrics_eval import build_metrics, format_table, parse_metric_args, parse_metric_list
from solace.evaluation.suites import load_suite
from solace.prompts import read_prompt_file

torch.set_num_threads(1)

SHARED = Path("/work/shared/prompts")

GENEVAL_LINES = [  # GenEval's published metadata format
    '{"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": '
    '"wine glass", "count": 3}], "prompt": "a photo of two wine glasses"}',
    '{"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"}, {"class": '
    '"scissors", "count": 1, "color": "black"}], "prompt": "a photo of a pink handbag and a black scissors"}',
    '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}',
]


def _one_line_error(result) -> str:
    """The CLI's error output: exit status 2 (``_fail``), no traceback, exactly one line."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    text = result.stderr.strip()
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    return text


# ---------------------------------------------------------------------------------------------- suites


def test_txt_suite(tmp_path):
    f = tmp_path / "drawbench_test.txt"
    f.write_text(
        "A pyramid made of falafel with a partial solar eclipse in the background.\n"
        "\n"
        "  A maglev train going vertically downward in high speed.  \r\n"
        'New York Skyline with "Google Research Pizza Cafe" written with fireworks on the sky.\n'
    )
    suite = load_suite("drawbench", f)
    assert suite.prompts == [
        "A pyramid made of falafel with a partial solar eclipse in the background.",
        "A maglev train going vertically downward in high speed.",
        'New York Skyline with "Google Research Pizza Cafe" written with fireworks on the sky.',
    ]
    assert suite.metadata == [{}, {}, {}] and suite.name == "drawbench"
    assert load_suite("drawbench", f, limit=2).prompts == suite.prompts[:2]
    assert len(load_suite("drawbench", f, limit=10)) == 3


def test_jsonl_suite_keeps_geneval_metadata(tmp_path):
    f = tmp_path / "geneval_test_metadata.jsonl"
    f.write_text("\n".join(GENEVAL_LINES) + "\n\n")
    suite = load_suite("geneval", f, limit=2)
    assert suite.prompts == ["a photo of two wine glasses", "a photo of a pink handbag and a black scissors"]
    meta = suite.metadata
    assert meta[0]["tag"] == "counting" and meta[0]["include"] == [{"class": "wine glass", "count": 2}]
    assert meta[0]["exclude"] == [{"class": "wine glass", "count": 3}]
    assert meta[1]["include"][1] == {"class": "scissors", "count": 1, "color": "black"}


def test_suite_errors(tmp_path):
    with pytest.raises(ConfigError, match="--prompts"):
        load_suite("drawbench", None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite("ocr", tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="unknown suite"):
        load_suite("parti", tmp_path / "x.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GENEVAL_LINES[0] + "\n{not json\n")
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_prompt_file(bad, "--prompts")
    noprompt = tmp_path / "noprompt.jsonl"
    noprompt.write_text('{"tag": "counting"}\n')
    with pytest.raises(ConfigError, match="'prompt'"):
        read_prompt_file(noprompt, "--prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompt_file(empty, "--prompts")


@pytest.mark.skipif(not SHARED.is_dir(), reason="the published prompt files are not on this machine")
def test_published_files_load():
    for name, file in [
        ("drawbench", "drawbench_test.txt"),
        ("geneval", "geneval_test_metadata.jsonl"),
        ("ocr", "ocr_test.txt"),
        ("pickscore", "pickscore_test.txt"),
    ]:
        suite = load_suite(name, SHARED / file)
        assert len(suite) > 100 and all(p and p == p.strip() for p in suite.prompts)
    geneval = load_suite("geneval", SHARED / "geneval_test_metadata.jsonl")
    assert all("include" in m and "tag" in m for m in geneval.metadata)
    ocr = load_suite("ocr", SHARED / "ocr_test.txt", limit=5)
    assert len(ocr) == 5 and all(p.count('"') >= 2 for p in ocr.prompts)


# ---------------------------------------------------------------------------------------------- metrics


def test_markdown_table_layout():
    summary = {
        "base": {"clip_score": 30.1234, "ocr": 0.41236, "pickscore": 21.5, "geneval": 0.63},
        "lora": {"clip_score": 31.0, "ocr": 0.5, "pickscore": 22.004, "geneval": float("nan")},
    }
    table = format_table(summary, ["geneval", "ocr", "pickscore", "clip_score"], title="**drawbench**")
    assert table.splitlines() == [
        "**drawbench**",
        "",
        "| model | GenEval | OCR | PickScore | CLIPScore |",
        "|---|---:|---:|---:|---:|",
        "| base | 0.630 | 0.412 | 21.50 | 30.12 |",
        "| LoRA | n/a | 0.500 | 22.00 | 31.00 |",
    ]
    one = format_table(
        {"base": {"hps": 0.2871, "image_reward": -0.0416, "aesthetic": 5.5}},
        ["hps", "image_reward", "aesthetic"],
    )
    assert one.splitlines() == [
        "| model | HPSv2.1 | ImageReward | Aesthetic |",
        "|---|---:|---:|---:|",
        "| base | 0.287 | -0.042 | 5.500 |",
    ]


def test_metric_arguments():
    assert parse_metric_list(" clip_score, ocr ,clip_score") == ["clip_score", "ocr"]
    args = parse_metric_args(
        ["clip_score.model=/tmp/clip", "clip_score.batch_size=4", "clip_score.clamp=false",
         'ocr.ocr_params={"Det.limit_side_len": 256}'],
        ["clip_score", "ocr"],
    )  # fmt: skip
    assert args == {
        "clip_score": {"model": "/tmp/clip", "batch_size": 4, "clamp": False},
        "ocr": {"ocr_params": {"Det.limit_side_len": 256}},
    }
    with pytest.raises(ConfigError, match="not in --metrics"):
        parse_metric_args(["pickscore.divisor=1"], ["clip_score"])
    with pytest.raises(ConfigError, match="METRIC.KEY=VALUE"):
        parse_metric_args(["clip_score=/tmp"], ["clip_score"])
    with pytest.raises(ConfigError, match="unknown metric 'fid'"):
        build_metrics(["fid"])
    with pytest.raises(ConfigError, match="takes no argument 'modle'"):
        build_metrics(["ocr"], {"ocr": {"modle": "x"}})


# ---------------------------------------------------------------------------------------------- CLI


def test_named_suite_needs_prompts():
    text = _one_line_error(CliRunner().invoke(app, ["eval", "--suite", "drawbench"]))
    assert "--prompts" in text


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    runner = CliRunner()
    text = _one_line_error(
        runner.invoke(app, ["eval", "--suite", "pickscore", "--prompts", str(f), "--metrics", "fid"])
    )
    assert "unknown metric 'fid'" in text
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # the optional package cannot be imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nor is ImageReward.pt cached for the transformers backend
    text = _one_line_error(
        runner.invoke(app, ["eval", "--suite", "pickscore", "--prompts", str(f), "--metrics", "image_reward"])
    )
    assert "reward.image_reward.model" in text and "pip install image-reward" in text
    text = _one_line_error(
        runner.invoke(app, ["eval", "--suite", "drawbench", "--prompts", str(tmp_path / "no.txt")])
    )
    assert "--prompts" in text and "does not exist" in text
    text = _one_line_error(runner.invoke(app, ["eval", "--suite", "toy", "--metrics", "ocr"]))
    assert "--suite toy" in text


def test_generate_in_slices_matches_whole(tiny_sd3_pipe):
    from tiny_pipelines import TINY_RESOLUTION, TINY_T5_MAX_LEN

    from solace.models.sd3 import SD3Adapter
    from solace.sampling.generate import generate

    a = SD3Adapter(tiny_sd3_pipe, resolution=TINY_RESOLUTION, max_sequence_length=TINY_T5_MAX_LEN)
    prompts = ["a red cat", "two dogs", "a blue sign"]
    whole = generate(a, prompts, 2, 2, 3.0, seed=5, progress=False)
    tail = generate(a, prompts[1:], 2, 2, 3.0, seed=5, progress=False, first_index=1)
    torch.testing.assert_close(tail, whole[2:], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from test_external_rewards import tiny_clip_config, tiny_clip_tokenizer
    from transformers import CLIPModel

    d = tmp_path_factory.mktemp("eval_clip")
    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tok), tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def sd3_with_lora(tmp_path_factory):
    """A tiny SD3 pipeline folder and a LoRA for it whose lora_B is non-zero (so base and LoRA differ)."""
    from test_sd3_flux import perturb_lora
    from tiny_pipelines import make_tiny_sd3, save_tiny_pipeline

    from solace.models.lora import add_lora, save_lora
    from solace.models.sd3 import SD3_LORA_TARGETS

    root = tmp_path_factory.mktemp("eval_sd3")
    pipe = make_tiny_sd3(seed=0)
    save_tiny_pipeline(pipe, root / "pipe")
    add_lora(pipe.transformer, rank=2, alpha=2, target_modules=SD3_LORA_TARGETS)
    perturb_lora(pipe.transformer, std=0.5)
    save_lora(pipe.transformer, root / "lora", pipeline_class=type(pipe))
    return str(root / "pipe"), str(root / "lora")


def test_eval_end_to_end_tiny_sd3(tmp_path, tiny_clip, sd3_with_lora):
    pipe_dir, lora_dir = sd3_with_lora
    prompts = tmp_path / "ocr_test.txt"
    prompts.write_text(
        'a neon sign that says "open" at night\n'
        'a birthday cake with "happy birthday" written on it\n'
        'a wooden door with a plaque reading "exit"\n'
        'a street sign "main st"\n'
    )
    out = tmp_path / "eval"
    ocr_params = '{"Det.limit_side_len": 64, "EngineConfig.onnxruntime.intra_op_num_threads": 1}'
    args = [
        "eval", "--suite", "ocr", "--prompts", str(prompts), "--limit", "3", "--model", pipe_dir,
        "--lora", lora_dir, "--metrics", "clip_score,ocr", "--metric-arg", f"clip_score.model={tiny_clip}",
        "--metric-arg", "clip_score.device=cpu", "--metric-arg", f"ocr.ocr_params={ocr_params}",
        "--steps", "2", "--cfg", "3.0", "--resolution", "32", "--batch-size", "2", "--device", "cpu",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| model | CLIPScore | OCR |" in result.stdout
    for name in ("results.json", "results.md", "grid.png", "index.html"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["metrics"] == ["clip_score", "ocr"] and set(doc["summary"]) == {"base", "lora"}
    assert doc["settings"]["num_prompts"] == 3 and doc["settings"]["image_size"] == [32, 32]
    for label in ("base", "lora"):
        row = doc["summary"][label]
        assert set(row) == {"clip_score", "ocr"}
        assert 0.0 <= row["clip_score"] <= 100.0
        assert 0.0 <= row["ocr"] <= 1.0
    assert len(doc["per_prompt"]) == 3
    for rec in doc["per_prompt"]:
        for label in ("base", "lora"):
            assert 0.0 <= rec["scores"][label]["ocr"] <= 1.0
            (f,) = rec["images"][label]
            assert (out / f).is_file()
    # the same noise, different weights: the LoRA changes the images and so the CLIPScore
    from PIL import Image

    first = doc["per_prompt"][0]["images"]
    a, b = (np.asarray(Image.open(out / first[k][0]), dtype=np.float32) for k in ("base", "lora"))
    assert np.abs(a - b).mean() > 1.0
    assert doc["summary"]["base"]["clip_score"] != doc["summary"]["lora"]["clip_score"]
    md = (out / "results.md").read_text().splitlines()
    assert md[2:4] == ["| model | CLIPScore | OCR |", "|---|---:|---:|"]
    assert md[4].startswith("| base | ") and md[5].startswith("| LoRA | ")
    page = (out / "index.html").read_text()
    assert "images/lora/0002_0.png" in page and "CLIPScore" in page and "&quot;open&quot;" in page
    assert Image.open(out / "grid.png").size[1] > 3 * 32
