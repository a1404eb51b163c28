"""FLUX.1-dev-sized memory check on one GPU: what the paper's recipe needs at 512 px, stage by stage.

The FLUX.1-dev transformer (19 double + 38 single blocks, 24 heads x 128, 11.9 B parameters) is built with
random weights in bf16 (no download) behind :class:`solace.models.flux.FluxAdapter`, with LoRA r = 32 /
alpha = 64 on its attention projections and gradient checkpointing. Text conditioning is random tensors of the
real shapes (T5 512 tokens x 4096, CLIP pooled 768). Measured: allocated memory of the weights, then the
peak of each stage and its seconds (after ``torch.cuda.synchronize``):

* ``sampling``: one no-grad forward of G rows (FLUX.1-dev is guidance-distilled: one forward per step);
* ``reward``: one no-grad forward of ``--probe-batch`` rows (the self-confidence pass' batch);
* ``train``: forward + backward of ``--train-batch`` rows through the LoRA (the policy's training step).

    python bench/flux_memory.py --json flux.json          # GPU
    OMP_NUM_THREADS=1 python bench/flux_memory.py --tiny  # a tiny FLUX on CPU (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from solace.models.base import Conditioning
from solace.models.flux import FluxAdapter
from solace.models.lora import add_lora, lora_parameters

FLUX_DEV: dict[str, Any] = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def build(cfg: dict[str, Any], resolution: int, seq: int, device, dtype, ckpt: bool) -> FluxAdapter:
    """A text-encoder-free, VAE-free ``FluxPipeline`` around a random FLUX transformer, as an adapter."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" on .to(bf16)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**cfg)
    transformer.to(dtype=dtype)
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, **none)
    return FluxAdapter(pipe, resolution=resolution, max_sequence_length=seq, gradient_checkpointing=ckpt)


def stage(device: torch.device, res: dict, name: str, fn) -> None:
    """Run ``fn`` once, recording its seconds and peak allocated GiB under ``res[name]``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    res[name] = {"seconds": time.perf_counter() - t0, "peak_gib": peak}
    print(f"  {name:<10} {res[name]['seconds']:8.2f}s  peak {peak:7.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny FLUX on CPU, fp32 (a smoke test)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; tiny 32)")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--probe-batch", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.tiny
    if not a.tiny and not cuda:
        print("no CUDA device: run with --tiny for the CPU smoke test")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg, seq, dim, pooled = (TINY, 8, 32, 32) if a.tiny else (FLUX_DEV, 512, 4096, 768)
    a.resolution = a.resolution or (32 if a.tiny else 512)
    res: dict[str, Any] = {
        "settings": vars(a).copy(),
        "device": torch.cuda.get_device_name() if cuda else "CPU",
    }
    ad = build(cfg, a.resolution, seq, device, dtype, ckpt=cuda)
    res["frozen_params"] = sum(p.numel() for p in ad.denoiser.parameters())
    add_lora(ad, 4 if a.tiny else 32, 8.0 if a.tiny else 64.0, ad.lora_target_modules)
    res["lora_params"] = sum(p.numel() for p in lora_parameters(ad))
    res["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30 if cuda else 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    emb = torch.randn(1, seq, dim, generator=gen, device=device, dtype=dtype)
    pool = torch.randn(1, pooled, generator=gen, device=device, dtype=dtype)
    one = Conditioning({"prompt_embeds": emb, "pooled_prompt_embeds": pool}, {"img_ids": ad.img_ids()})

    def forward(rows: int, grad: bool) -> None:
        z = torch.randn(rows, *ad.latent_shape(), device=device, dtype=dtype)
        t = torch.full((rows,), 0.5, device=device)
        with torch.set_grad_enabled(grad):
            v = ad.velocity(z, t, one.expand(rows))
            if grad:
                v.float().pow(2).mean().backward()

    print(
        f"{res['device']}: FLUX {'tiny' if a.tiny else '.1-dev size'}, "
        f"{res['frozen_params'] / 1e9:.2f} B params"
    )
    print(f"  weights + LoRA: {res['weights_gib']:.2f} GiB allocated")
    ad.denoiser.eval()
    stage(device, res, "sampling", lambda: forward(a.group_size, False))
    stage(device, res, "reward", lambda: forward(a.probe_batch, False))
    ad.denoiser.train()
    stage(device, res, "train", lambda: forward(a.train_batch, True))
    res["lora_grads_finite"] = all(
        bool(torch.isfinite(p.grad).all()) for p in lora_parameters(ad) if p.grad is not None
    )
    if cuda:
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
