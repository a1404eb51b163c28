"""Sampling options: ``sampling.negative_prompt`` (CFG's null conditioning) and non-square ``height`` x
``width`` (``resolution`` the square shorthand). SD3 and FLUX samples equal diffusers' own pipelines with
the same noise bitwise in float32; the toy model draws 32 x 32 only; configs and commands take the options
and reject bad or conflicting sizes in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_pipelines import TINY_T5_MAX_LEN as T5LEN
from tiny_pipelines import make_tiny_flux, save_tiny_pipeline, train_overrides
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.models import load_adapter
from solace.models.flux import FluxAdapter, latent_image_ids
from solace.models.sd3 import SD3Adapter
from solace.sampling.sampler import sample
from solace.trainer.config import load_config

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

PROMPTS = ["a red cat", "two dogs on grass"]
NEG = "blurry, low quality"


def _noise(adapter, seed: int) -> torch.Tensor:
    return torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ SD3 / FLUX == diffusers, bitwise


@pytest.mark.parametrize("height,width,negative", [(16, 24, NEG), (24, 16, ""), (16, 16, NEG)])
def test_sd3_negative_prompt_and_size_equal_the_pipeline(tiny_sd3_pipe, height, width, negative):
    a = SD3Adapter(tiny_sd3_pipe, height=height, width=width, max_sequence_length=T5LEN)
    assert a.latent_shape() == (16, height // 2, width // 2)
    z = _noise(a, 3)
    ref = tiny_sd3_pipe(
        prompt=PROMPTS, negative_prompt=[negative] * 2, height=height, width=width, num_inference_steps=3,
        guidance_scale=4.0, latents=z.clone(), output_type="latent", max_sequence_length=T5LEN,
    ).images  # fmt: skip
    # the pipeline encodes the negative prompt once per sample; so do we here, for the same rounding
    null = a.encode_prompts([negative] * 2)
    traj = sample(a, a.encode_prompts(PROMPTS), null, a.sigmas(3), z, cfg_scale=4.0, noise_level=0.0)
    assert float((traj.final - ref).abs().max()) == 0.0
    # the trainer encodes it once and repeats the row: the text encoders' batch rounding, nothing else
    once = a.encode_prompts([negative]).index([0, 0])
    traj1 = sample(a, a.encode_prompts(PROMPTS), once, a.sigmas(3), z, cfg_scale=4.0, noise_level=0.0)
    assert float((traj1.final - ref).abs().max()) < 1e-5
    # the negative prompt matters: the empty one gives other samples
    if negative:
        empty = a.encode_prompts([""] * 2)
        other = sample(a, a.encode_prompts(PROMPTS), empty, a.sigmas(3), z, cfg_scale=4.0, noise_level=0.0)
        assert float((other.final - ref).abs().max()) > 1e-4


@pytest.mark.parametrize("height,width", [(16, 32), (32, 16), (16, 16)])
def test_flux_negative_prompt_and_size_equal_the_pipeline(tiny_flux_pipe, height, width):
    b = FluxAdapter(tiny_flux_pipe, height=height, width=width, max_sequence_length=T5LEN)
    assert b.latent_shape() == ((height // 4) * (width // 4), 64)  # 2x2-packed latent of the 2x VAE
    assert torch.equal(b.img_ids(), latent_image_ids(height // 2, width // 2))
    z = _noise(b, 4)
    cond = b.encode_prompts(PROMPTS)
    common = dict(
        prompt=PROMPTS, height=height, width=width, num_inference_steps=3, guidance_scale=3.5,
        latents=z.clone(), output_type="latent", max_sequence_length=T5LEN,
    )  # fmt: skip
    # "true CFG" with a negative prompt (one row, repeated, as the trainer does)
    ref = tiny_flux_pipe(negative_prompt=[NEG] * 2, true_cfg_scale=3.0, **common).images
    null = b.encode_prompts([NEG]).index([0, 0])
    traj = sample(b, cond, null, b.sigmas(3), z, cfg_scale=3.0, noise_level=0.0)
    assert float((traj.final - ref).abs().max()) == 0.0
    # guidance-distilled use: no CFG
    ref1 = tiny_flux_pipe(**common).images
    traj1 = sample(b, cond, None, b.sigmas(3), z, cfg_scale=1.0, noise_level=0.0)
    assert float((traj1.final - ref1).abs().max()) == 0.0
    with torch.no_grad():
        img = b.decode(traj1.final)
        assert img.shape == (2, 3, height, width)
        assert b.encode_images(img).shape == z.shape
        pipe_img = tiny_flux_pipe(**{**common, "output_type": "pt"}).images
    torch.testing.assert_close(img, pipe_img, rtol=0, atol=1e-5)


def test_bad_and_conflicting_sizes_are_config_errors(tiny_sd3_pipe, tiny_flux_pipe):
    with pytest.raises(
        ConfigError, match=r"^width: must be a positive multiple of 2 \* vae_scale_factor = 4"
    ):
        FluxAdapter(tiny_flux_pipe, height=16, width=18)
    with pytest.raises(ConfigError, match=r"^height: .*vae_scale_factor \* patch_size = 4, got 10"):
        SD3Adapter(tiny_sd3_pipe, height=10, width=16)
    with pytest.raises(ConfigError, match="^resolution: 16 conflicts with width = 24"):
        SD3Adapter(tiny_sd3_pipe, resolution=16, width=24)
    a = SD3Adapter(tiny_sd3_pipe, resolution=16, height=16)  # agreeing values are fine
    assert (a.height, a.width, a.resolution) == (16, 16, 16)
    b = FluxAdapter(tiny_flux_pipe, height=16, width=32)
    assert b.resolution is None and b.image_seq_len() == 32


# ------------------------------------------------------------------------------------------------ toy


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def test_toy_model_is_32_by_32_only(weights):
    for kw in ({"height": 64}, {"width": 16}, {"resolution": 48}):
        with pytest.raises(ConfigError, match="32 x 32 images only"):
            load_adapter(str(weights), **kw)
    assert load_adapter(str(weights), height=32, width=32).latent_shape() == (3, 32, 32)
    with pytest.raises(ConfigError, match="^model.height: the toy model draws 32 x 32 images only"):
        load_config("toy", ["model.height=64"])
    with pytest.raises(ConfigError, match="^model.height: the toy model draws 32 x 32 images only, got 16"):
        load_config("toy", ["model.resolution=16"])  # the shorthand sets both
    assert load_config("toy", ["model.resolution=32"]).model.width == 32


def test_toy_generation_uses_the_negative_prompt(weights):
    from solace.sampling.generate import generate

    ad = load_adapter(str(weights))
    kw = dict(samples_per_prompt=2, num_steps=3, cfg_scale=4.0, seed=1, progress=False)
    with_neg = generate(ad, ["a photo of a red circle"], negative_prompt="a photo of a blue square", **kw)
    plain = generate(ad, ["a photo of a red circle"], **kw)
    assert not torch.equal(with_neg, plain)
    # the same as sampling with the negative prompt's embedding as the null conditioning
    null = ad.encode_prompts(["a photo of a blue square"]).index([0, 0])
    from solace.utils.seeding import prompt_seed

    noise = torch.stack(
        [
            torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(prompt_seed(1, 0, j)))
            for j in (0, 1)
        ]
    )
    cond = ad.encode_prompts(["a photo of a red circle"]).index([0, 0])
    traj = sample(ad, cond, null, ad.sigmas(3), noise, cfg_scale=4.0, noise_level=0.0)
    assert torch.equal(ad.decode(traj.final), with_neg)


def test_trainer_uses_the_negative_prompt_as_null(weights, tmp_path):
    from solace.trainer.trainer import Trainer

    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "r", **{"sampling.negative_prompt": NEG}))
    tr = Trainer(cfg)
    want = tr.adapter.encode_prompts([NEG])
    assert all(torch.equal(tr.null.tensors[k], want.tensors[k]) for k in want.tensors)
    from solace.evaluation.evaluators import base_eval_key
    from solace.trainer.config import eval_setup

    assert base_eval_key(eval_setup(cfg, tr.eval_cfg_scale))["negative_prompt"] == NEG
    assert tr.evaluator.negative_prompt == NEG
    ro = tr.sample_rollout(0)
    assert all(
        torch.equal(ro.null.tensors[k], want.tensors[k].expand_as(ro.null.tensors[k])) for k in want.tensors
    )


# ------------------------------------------------------------------------------------------- configs


def test_resolution_is_a_per_layer_shorthand(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("defaults: [sd35m.yaml]\nmodel: {resolution: 768}\n")
    c = load_config(str(base), check_paths=False)
    assert (c.model.height, c.model.width, c.model.resolution) == (768, 768, 768)
    c = load_config(str(base), ["model.width=1024"], check_paths=False)  # a later layer's width wins
    assert (c.model.height, c.model.width, c.model.resolution) == (768, 1024, 0)
    c = load_config(str(base), ["model.resolution=512"], check_paths=False)
    assert (c.model.height, c.model.width) == (512, 512)
    child = tmp_path / "child.yaml"  # a child preset's height over its base's resolution
    child.write_text("defaults: [base.yaml]\nmodel: {height: 256}\n")
    c = load_config(str(child), check_paths=False)
    assert (c.model.height, c.model.width, c.model.resolution) == (256, 768, 0)
    with pytest.raises(ConfigError, match="^model.resolution: 768 conflicts with model.height=512"):
        load_config(str(base), ["model.resolution=768", "model.height=512"], check_paths=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [sd35m.yaml]\nmodel: {resolution: 512, width: 256}\n")
    with pytest.raises(ConfigError, match="conflicts with model.width=256 in .*bad.yaml"):
        load_config(str(bad), check_paths=False)
    # a config recorded before height/width existed (a checkpoint's) reads as the same size
    old = load_config("sd35m", ["model.resolution=640"], check_paths=False)
    from omegaconf import OmegaConf

    again = load_config(
        None,
        check_paths=False,
        layers_after=[
            OmegaConf.create({"model": {"name": old.model.name, "family": "sd3", "resolution": 640}})
        ],
    )
    assert (again.model.height, again.model.width) == (old.model.height, old.model.width) == (640, 640)
    assert (
        load_config("sd35m", ["sampling.negative_prompt=ugly"], check_paths=False).sampling.negative_prompt
        == "ugly"
    )


# ---------------------------------------------------------------------------------------- commands


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    return text


def test_sample_command_takes_size_and_negative_prompt(tiny_sd3_folder, weights, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(tiny_sd3_folder), "-p", "a cat", "--seeds", "0,1", "--steps", "2",
            "--cfg", "3", "--height", "16", "--width", "24", "--negative-prompt", NEG, "--out", str(out),
            "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    w, h = Image.open(out).size
    assert w > h  # two 24 px wide, 16 px high images side by side
    text = _one_line_error(CliRunner().invoke(app, [*args[:-4], "--resolution", "16", "--out", str(out)]))
    assert "--resolution: 16 conflicts with --width 24" in text
    text = _one_line_error(
        CliRunner().invoke(app, ["sample", "--model", str(weights), "--height", "64", "--out", str(out)])
    )
    assert "32 x 32 images only" in text
    text = _one_line_error(
        CliRunner().invoke(
            app, ["score", "-p", "x", "--generate", "1", "--model", str(weights), "--width", "-1"]
        )
    )
    assert "--width: must be >= 0" in text


def test_score_generates_non_square_with_a_negative_prompt(tiny_flux_folder, tmp_path):
    import json

    args = ["score", "-p", "a cat", "--generate", "2", "--steps", "2", "--probes", "2", "--cfg", "2",
            "--model", str(tiny_flux_folder), "--height", "16", "--width", "32", "--negative-prompt", NEG,
            "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "s")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s" / "score.json").read_text())
    assert doc["settings"]["negative_prompt"] == NEG and len(doc["scores"]) == 2
    assert Image.open(tmp_path / "s" / doc["scores"][0]["image"]).size == (32, 16)
    # scoring given images reads them at the model's size
    res = CliRunner().invoke(
        app,
        ["score", "-p", "a cat", "--images", str(tmp_path / "s" / doc["scores"][0]["image"]), "--steps", "2",
         "--probes", "2", "--model", str(tiny_flux_folder), "--height", "16", "--width", "32", "--threads",
         "1", "--device", "cpu", "--out", str(tmp_path / "s2")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------ training


def test_flux_trains_non_square_with_a_negative_prompt(tmp_path):
    from solace.trainer.trainer import Trainer

    folder = save_tiny_pipeline(make_tiny_flux(seed=0), tmp_path / "pipe")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    extra = {"model.resolution": 0, "model.height": 16, "model.width": 32, "sampling.negative_prompt": NEG,
             "sampling.cfg_scale": 3.0, "train.report": False}  # fmt: skip
    cfg = load_config(None, train_overrides(folder, tmp_path / "run", prompts, **extra))
    tr = Trainer(cfg)
    assert tr.adapter.latent_shape() == (32, 64)
    res = tr.train()
    # the exported LoRA in a fresh pipeline gives the trainer's samples at that size and negative prompt
    z = _noise(tr.adapter, 5)
    ours = sample(
        tr.adapter, tr.adapter.encode_prompts(PROMPTS), tr.null.index([0, 0]), tr.adapter.sigmas(3), z,
        cfg_scale=3.0, noise_level=0.0,
    ).final  # fmt: skip
    fresh = make_tiny_flux(seed=0)
    fresh.load_lora_weights(res["lora"])
    theirs = fresh(
        prompt=PROMPTS, negative_prompt=[NEG] * 2, true_cfg_scale=3.0, height=16, width=32,
        num_inference_steps=3, guidance_scale=3.5, latents=z.clone(), output_type="latent",
        max_sequence_length=T5LEN,
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
