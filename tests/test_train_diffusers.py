"""`solace train` end to end on tiny SD3 (with and without T5) and tiny FLUX pipelines, and the LoRA it
exports loads into a fresh diffusers pipeline with `load_lora_weights` to the same outputs."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from solace.sampling.sampler import sample
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import (  # noqa: E402
    TINY_RESOLUTION,
    TINY_T5_MAX_LEN,
    make_tiny_flux,
    make_tiny_sd3,
    save_tiny_pipeline,
    train_overrides,
)

PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog"]


def _prompt_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _last_row(out: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(out / "log.csv")))
    return {k: float(v) for k, v in rows[-1].items() if v != ""}


def _pipeline_latents(pipe, noise: torch.Tensor, steps: int, cfg: float, flux: bool) -> torch.Tensor:
    kw = dict(
        prompt=PROMPTS[:2],
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=steps,
        latents=noise.clone(),
        output_type="latent",
        max_sequence_length=TINY_T5_MAX_LEN,
    )
    if flux:
        kw.update(guidance_scale=3.5)
    else:
        kw.update(guidance_scale=cfg)
    return pipe(**kw).images


def _trainer_latents(tr: Trainer, noise: torch.Tensor, steps: int, cfg: float) -> torch.Tensor:
    a = tr.adapter
    cond = a.encode_prompts(PROMPTS[:2])
    null = a.encode_prompts([""] * 2)
    return sample(a, cond, null, a.sigmas(steps), noise, cfg_scale=cfg, noise_level=0.0).final


@pytest.mark.parametrize("kind", ["sd3", "sd3_no_t5", "flux"])
def test_train_end_to_end_and_lora_round_trip(kind, tmp_path):
    flux = kind == "flux"
    pipe = make_tiny_flux(seed=0) if flux else make_tiny_sd3(seed=0, with_t5=kind == "sd3")
    folder = save_tiny_pipeline(pipe, tmp_path / "pipe")
    extra = {"sampling.cfg_scale": 1.0} if flux else {}
    if kind == "sd3_no_t5":
        extra["model.text_encoder_3"] = False
    cfg = load_config(None, train_overrides(folder, tmp_path / "run", _prompt_file(tmp_path), **extra))
    tr = Trainer(cfg)
    res = tr.train()
    row = _last_row(tmp_path / "run")
    for key in (
        "reward/mean",
        "train/kl",
        "train/policy_loss",
        "train/approx_kl",
        "train/grad_norm",
        "self_confidence/S_t00",
    ):
        assert math.isfinite(row[key]), key
    assert row["train/grad_norm"] > 0
    assert Path(res["report"]).exists()

    # The exported LoRA loads into a fresh pipeline and reproduces the trainer's LoRA model.
    noise = torch.randn(2, *tr.adapter.latent_shape(), generator=torch.Generator().manual_seed(5))
    ours = _trainer_latents(tr, noise, 3, cfg.sampling.cfg_scale if not flux else 1.0)
    fresh = make_tiny_flux(seed=0) if flux else make_tiny_sd3(seed=0, with_t5=kind == "sd3")
    base = _pipeline_latents(fresh, noise, 3, cfg.sampling.cfg_scale, flux)
    fresh.load_lora_weights(res["lora"])
    (loaded,) = fresh.transformer.peft_config.values()
    assert loaded.lora_alpha == 8 and loaded.r == 4
    theirs = _pipeline_latents(fresh, noise, 3, cfg.sampling.cfg_scale, flux)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    assert (theirs - base).abs().max() > 1e-6  # training moved the model
    # the model card beside it says what it is and gives the lines that load it; those lines run as written
    card = (Path(res["lora"]) / "README.md").read_text()
    cls = type(pipe).__name__
    assert card.startswith("---\nbase_model: ") and "library_name: diffusers" in card
    assert "rank 4, alpha 8" in card
    code = card.split("```python\n")[1].split("```")[0]
    assert f"from diffusers import {cls}" in code and f'pipe.load_lora_weights("{res["lora"]}")' in code
    scope: dict = {}
    exec(code.replace(f'{cls}.from_pretrained("{folder}")', "FRESH"), {"FRESH": make_tiny_flux(seed=0) if flux
         else make_tiny_sd3(seed=0, with_t5=kind == "sd3")}, scope)  # fmt: skip
    assert scope["pipe"].transformer.peft_config["default_0"].lora_alpha == 8

    if kind != "sd3":
        return
    # Start a new run from the exported LoRA (SOLACE on top of an existing LoRA): same model at start.
    cfg2 = load_config(
        None,
        train_overrides(
            folder,
            tmp_path / "run2",
            _prompt_file(tmp_path),
            **{"model.lora.init_from": res["lora"], "train.iterations": 1},
        ),
    )
    tr2 = Trainer(cfg2)
    torch.testing.assert_close(
        _trainer_latents(tr2, noise, 3, cfg.sampling.cfg_scale), theirs, rtol=0, atol=2e-5
    )
    res2 = tr2.train()
    fresh2 = make_tiny_sd3(seed=0, with_t5=True)
    fresh2.load_lora_weights(res2["lora"])
    torch.testing.assert_close(
        _trainer_latents(tr2, noise, 3, cfg.sampling.cfg_scale),
        _pipeline_latents(fresh2, noise, 3, cfg.sampling.cfg_scale, False),
        rtol=0,
        atol=2e-5,
    )

    # A fresh LoRA on top of that one folded into the base (model.lora.merge_init): its model card's lines
    # fold the first LoRA in, then load this one, and give the trainer's model; this LoRA alone does not.
    cfg3 = load_config(
        None,
        train_overrides(
            folder,
            tmp_path / "run3",
            _prompt_file(tmp_path),
            **{"model.lora.init_from": res["lora"], "model.lora.merge_init": True, "train.iterations": 1},
        ),
    )
    tr3 = Trainer(cfg3)
    res3 = tr3.train()
    ours3 = _trainer_latents(tr3, noise, 3, cfg.sampling.cfg_scale)
    card3 = (Path(res3["lora"]) / "README.md").read_text()
    assert "folded into the base" in card3 and str(res["lora"]) in card3
    code3 = card3.split("```python\n")[1].split("```")[0]
    scope3: dict = {}
    exec(
        code3.replace(f'{cls}.from_pretrained("{folder}")', "FRESH"), {"FRESH": make_tiny_sd3(seed=0)}, scope3
    )
    theirs3 = _pipeline_latents(scope3["pipe"], noise, 3, cfg.sampling.cfg_scale, False)
    torch.testing.assert_close(ours3, theirs3, rtol=0, atol=2e-5)
    alone = make_tiny_sd3(seed=0, with_t5=True)
    alone.load_lora_weights(res3["lora"])
    assert (_pipeline_latents(alone, noise, 3, cfg.sampling.cfg_scale, False) - ours3).abs().max() > 1e-4
