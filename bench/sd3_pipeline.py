"""Random-weight ``StableDiffusion3Pipeline`` folders for the benchmarks, SD3.5-Medium-sized or tiny, built
once and saved with ``save_pretrained``: ``solace train model.name=FOLDER`` loads them like a downloaded model
(no hub).

Components (random weights, ``torch.manual_seed(seed)``):

* transformer: ``SD3Transformer2DModel`` of SD3.5-Medium's config (24 blocks, 1536 channels, dual attention in
  blocks 0-12, RMS qk-norm, ``pos_embed_max_size`` 384: 2.243 B parameters), or a 2-block tiny one;
* text: CLIP-L and OpenCLIP-bigG text towers of their real hidden sizes (768 and 1280, projections 768 and
  1280: the transformer's 2048 pooled channels, and 2048 token channels that the pipeline zero-pads to T5's
  4096) at their real depth (12 and 32 layers) or ``--clip-layers N``; T5-XXL's encoder (4.762 B), unless
  ``--no-t5`` (``model.text_encoder_3=false`` never loads it anyway); character-level tokenizers
  (``bench/gpu_text.py``), so the cost per prompt is the real one;
* VAE: the SD3.5 ``AutoencoderKL`` architecture (4 blocks 128-512 channels, 16 latent channels, 84 M
  parameters; ``vae_scale_factor`` 8), or a 4-block tiny one (8 channels) with the same factor;
* scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD3.5's.

A folder is reused when its ``bench_pipeline.json`` records the same settings; it is written to a temporary
folder first and renamed, so an interrupted build leaves nothing that looks finished.

    python bench/sd3_pipeline.py runs/bench_pipelines/sd35m --size sd35m --dtype bf16 --device cuda
    python bench/sd3_pipeline.py runs/bench_pipelines/tiny --size tiny --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_text import CLIP_G, CLIP_L, T5_XXL, TINY_CLIP, TINY_T5, _clip, _t5, tokenizers  # noqa: E402

SD35_MEDIUM: dict[str, Any] = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
TINY: dict[str, Any] = dict(  # CLIP 16 + 16 = 32 = joint_attention_dim = T5 d_model; pooled 16 + 16 = 32
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
SD35_VAE: dict[str, Any] = dict(  # stabilityai/stable-diffusion-3.5-medium vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
TINY_VAE: dict[str, Any] = SD35_VAE | dict(
    block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64
)
SIZES = {
    "sd35m": (SD35_MEDIUM, SD35_VAE, CLIP_L, CLIP_G, T5_XXL, 49408),
    "tiny": (TINY, TINY_VAE, TINY_CLIP, TINY_CLIP, TINY_T5, 128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STAMP = "bench_pipeline.json"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype`` from the start (no fp32 copy of 2.2 B parameters first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def spec_of(size: str, dtype: str, t5: bool, clip_layers: int, seed: int) -> dict[str, Any]:
    """What a folder is built from (its ``bench_pipeline.json``): equal specs, the same folder."""
    return {"size": size, "dtype": dtype, "t5": t5, "clip_layers": clip_layers, "seed": seed}


def make_pipeline(size: str, dtype: str, device: str, t5: bool, clip_layers: int, seed: int) -> Any:
    """The pipeline in memory: every component random, on ``device`` in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    mmdit, vae_cfg, clip_l, clip_g, t5_cfg, vocab = SIZES[size]
    if clip_layers:  # (hidden, intermediate, layers, heads, projection): the depth only
        clip_l, clip_g = (c[:2] + (clip_layers,) + c[3:] for c in (clip_l, clip_g))
    clip_tok, t5_tok = tokenizers()
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(DTYPES[dtype]):
        parts = {
            "transformer": SD3Transformer2DModel(**mmdit),
            "vae": AutoencoderKL(**vae_cfg),
            "text_encoder": _clip(clip_l, vocab),
            "text_encoder_2": _clip(clip_g, vocab),
            "text_encoder_3": _t5(t5_cfg) if t5 else None,
        }
    for m in parts.values():
        if m is not None:
            m.to(dtype=DTYPES[dtype]).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=clip_tok,
        tokenizer_2=clip_tok,
        tokenizer_3=t5_tok if t5 else None,
        **parts,
    )


def build(
    folder: str | Path,
    size: str = "sd35m",
    dtype: str = "bf16",
    device: str = "cpu",
    t5: bool = True,
    clip_layers: int = 0,
    seed: int = 0,
) -> Path:
    """``folder`` holding the random pipeline of these settings: reused when it already does, else built."""
    from diffusers.utils import logging as diffusers_logging

    folder = Path(folder)
    spec = spec_of(size, dtype, t5, clip_layers, seed)
    stamp = folder / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") in (spec, spec | {"t5": True}):
        print(f"pipeline: {folder} (reused)")  # a folder with T5 serves a run without (never loaded)
        return folder
    diffusers_logging.set_verbosity_error()
    t0 = time.perf_counter()
    pipe = make_pipeline(size, dtype, device, t5, clip_layers, seed)
    params = {
        k: sum(p.numel() for p in getattr(pipe, k).parameters())
        for k in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(pipe, k, None) is not None
    }
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    del pipe
    seconds = time.perf_counter() - t0
    (tmp / STAMP).write_text(
        json.dumps({"spec": spec, "parameters": params, "build_seconds": seconds}, indent=1)
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"pipeline: {folder} built in {seconds:.1f}s, parameters {params}")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--size", choices=tuple(SIZES), default="sd35m")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to init")
    p.add_argument("--no-t5", action="store_true", help="leave T5-XXL out of the folder")
    p.add_argument("--clip-layers", type=int, default=0, help="CLIP depth (0: the real 12 / 32 layers)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build(a.folder, a.size, a.dtype, a.device, not a.no_t5, a.clip_layers, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
