"""One SOLACE training iteration at SD3.5-Medium size on a GPU: time per stage, peak memory, reward TFLOP/s.

For a session lent a GPU. It needs no download: the SD3.5-Medium MMDiT is built from its real config with
random weights (bf16), and text conditioning is random tensors of the real shapes (CLIP-L + CLIP-G + T5:
333 tokens of 4096 channels, pooled 2048), so no text encoder or VAE is loaded. One iteration of the paper's
recipe (SOLACE on Flow-GRPO), orchestrated with solace's math functions directly (the trainer module is not
used):

1. sampling: G samples of one prompt with Flow-GRPO's SDE sampler (T steps, CFG, per-step log-probs);
2. reward: SOLACE self-confidence of each final latent, K antithetic probes at the sampler's T timesteps,
   conditional velocity of the current (LoRA) policy;
3. group advantages;
4. training: LoRA (rank/alpha 32/64) update with the PPO-clipped loss + beta * KL to the LoRA-off reference,
   on the last ceil(rho * T) steps, gradients accumulated over steps and micro-batches, one AdamW step.

Reported: seconds per stage (after ``torch.cuda.synchronize``), peak memory per stage and overall, the
transformer's forward count per stage, and achieved TFLOP/s, from FLOPs per forward row measured once with
``torch.utils.flop_counter.FlopCounterMode`` times the forward rows counted by a hook.

Trajectory latents and step log-probs are kept in float32 while the transformer runs in bf16 (as Flow-GRPO,
whose SDE step upcasts to fp32): ``--bf16-latents`` makes the sampler carry the latents, velocities and SDE
steps in bfloat16 instead (``sample(..., latent_dtype=torch.bfloat16)``), which is expected to show up as a
PPO ratio away from 1 (clipfrac > 0) on the on-policy first iteration.

Usage:
    python bench/gpu_check.py                 # GPU, SD3.5-Medium size, 512 px, G=16, T=10, CFG 7, K=8
    OMP_NUM_THREADS=1 python bench/gpu_check.py --tiny   # same pipeline on CPU with a tiny model (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from solace.grpo.advantages import group_advantages
from solace.grpo.loss import gaussian_kl, ppo_clip_loss
from solace.grpo.window import train_window
from solace.models.base import Conditioning, adapters_disabled
from solace.models.lora import add_lora, lora_parameters, save_lora
from solace.models.sd3 import SD3Adapter
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer
from solace.sampling.sampler import sample, step_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gpu_text.py beside this script

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
SD35_TEXT = dict(seq_len=77 + 256, dim=4096, pooled=2048)  # CLIP tokens + T5 tokens (max_sequence_length 256)

TINY: dict[str, Any] = dict(
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
TINY_TEXT = dict(seq_len=24, dim=32, pooled=32)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


class Meter:
    """Wall-clock seconds and peak memory per stage, plus transformer forward calls/rows per stage."""

    def __init__(self, device: torch.device, denoiser: torch.nn.Module):
        self.device = device
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: dict[str, int] = defaultdict(int)
        self.stage: str | None = None
        denoiser.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.stage is not None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.calls[self.stage] += 1
            self.rows[self.stage] += int(x.shape[0])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        prev, self.stage = self.stage, stage
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] += time.perf_counter() - t0
            self.stage = prev
            if self.cuda:
                gib = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.peak[stage] = max(self.peak[stage], gib)


def build_adapter(
    cfg: dict[str, Any],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
    grad_ckpt: bool,
    text_encoders: dict[str, Any] | None = None,
) -> SD3Adapter:
    """A VAE-free ``StableDiffusion3Pipeline`` around a randomly initialised MMDiT; without
    ``text_encoders`` (``bench/gpu_text.py``) it has none and conditioning is random tensors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" on .to(bf16)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**cfg)
    transformer.to(dtype=dtype)
    none = dict.fromkeys(
        ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **(none | (text_encoders or {})),
    )
    return SD3Adapter(pipe, resolution=resolution, gradient_checkpointing=grad_ckpt)


def flops_per_row(adapter: SD3Adapter, cond: Conditioning, rows: int = 2) -> float:
    """FLOPs of one transformer forward per batch row, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(rows, *adapter.latent_shape(), device=adapter.device)
    t = torch.full((rows,), 0.5, device=adapter.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.velocity(z, t, cond.index(list(range(rows))))
    return counter.get_total_flops() / rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny MMDiT on CPU, fp32 (a smoke test, < 1 minute)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; tiny: 64)")
    p.add_argument("--group-size", type=int, default=16, help="G samples of the prompt")
    p.add_argument("--steps", type=int, default=10, help="T sampling steps")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (sampling and training)")
    p.add_argument("--probes", type=int, default=8, help="K self-confidence probes (even)")
    p.add_argument("--noise-level", type=float, default=0.7, help="Flow-GRPO SDE noise level a")
    p.add_argument("--rho", type=float, default=0.6, help="train on the last ceil(rho*T) steps")
    p.add_argument("--lora-rank", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 64 (tiny: 8)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight")
    p.add_argument("--clip-range", type=float, default=1e-4, help="PPO clip range")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-batch", type=int, default=4, help="samples per training micro-batch")
    p.add_argument(
        "--probe-batch", type=int, default=None, help="rows per reward forward (default 64; tiny 640)"
    )
    p.add_argument("--iters", type=int, default=None, help="iterations (default 2: the first warms up)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    p.add_argument(
        "--bf16-latents", action="store_true", help="carry the sampler's latents and SDE steps in bfloat16"
    )
    p.add_argument("--save-lora", default=None, help="export the LoRA (diffusers format) to this folder")
    p.add_argument(
        "--text-encoders",
        action="store_true",
        help="load CLIP-L + CLIP-G + T5-XXL of SD3.5's sizes (random weights) and encode real prompts",
    )
    p.add_argument(
        "--offload-text-encoders",
        choices=("off", "cpu", "free"),
        default="off",
        help="with --text-encoders: after encoding, move the encoders to the CPU or free them",
    )
    p.add_argument(
        "--json", default=None, help="write the results (settings, memory, stages) to this JSON file"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def latent_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the sampler carries the trajectory in: bfloat16 with ``--bf16-latents``, else float32."""
    return torch.bfloat16 if args.bf16_latents else torch.float32


def run_iteration(
    args: argparse.Namespace,
    adapter: Any,
    cond: Conditioning,
    null: Conditioning,
    opt: torch.optim.Optimizer,
    meter: Meter,
    it: int,
) -> dict[str, float]:
    dev = adapter.device
    G, T = args.group_size, args.steps
    sigmas = adapter.sigmas(T)
    gen = torch.Generator(device=dev).manual_seed(args.seed + it)
    noise = torch.randn(G, *adapter.latent_shape(), generator=gen, device=dev)

    with meter("sampling"):
        traj = sample(
            adapter,
            cond,
            null,
            sigmas,
            noise,
            cfg_scale=args.cfg,
            noise_level=args.noise_level,
            generator=gen,
            latent_dtype=latent_dtype(args),
        )

    with meter("reward"):
        scorer = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=args.probes, max_batch=args.probe_batch))
        rewards, _ = scorer.score_group(adapter, traj.final, cond, sigmas[:-1], probe_seed=args.seed + it)

    with meter("advantages"):
        adv = group_advantages(rewards.float(), group_size=G, clip=5.0)

    window = train_window(T, args.rho)
    chunks = [list(range(s, min(s + args.train_batch, G))) for s in range(0, G, args.train_batch)]
    n_terms = len(window) * len(chunks)
    stats: dict[str, float] = defaultdict(float)
    adapter.denoiser.train()
    opt.zero_grad(set_to_none=True)
    for idx in chunks:
        c, n = cond.index(idx), null.index(idx)
        a = adv[idx].to(dev)
        for j in window:
            z, z_next = traj.latents[idx, j], traj.latents[idx, j + 1]
            with meter("train_reference"), torch.no_grad(), adapters_disabled(adapter.denoiser):
                ref = step_policy(adapter, z, z_next, sigmas, j, c, n, args.cfg, args.noise_level)
            with meter("train_policy"):
                cur = step_policy(adapter, z, z_next, sigmas, j, c, n, args.cfg, args.noise_level)
                old = traj.log_probs[idx, j].to(cur.log_prob)
                pg, st = ppo_clip_loss(cur.log_prob.float(), old.float(), a.float(), args.clip_range)
                kl = gaussian_kl(cur.mean.float(), ref.mean.float(), cur.std.float()).mean()
                loss = (pg + args.beta * kl) / n_terms
                loss.backward()
            stats["loss"] += float(loss.detach())
            stats["kl"] += float(kl.detach()) / n_terms
            stats["clipfrac"] += float(st["clipfrac"]) / n_terms
            stats["ratio_dev"] = max(
                stats["ratio_dev"], float((st["ratio_max"] - 1).abs()), float((1 - st["ratio_min"]).abs())
            )
    with meter("optimizer"):
        params = lora_parameters(adapter.denoiser)
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
    adapter.denoiser.eval()
    stats["reward_mean"] = float(rewards.mean())
    stats["reward_std"] = float(rewards.std())
    stats["finite"] = float(bool(torch.isfinite(traj.final).all()) and math.isfinite(stats["loss"]))
    stats["latents_bf16"] = float(traj.latents.dtype == torch.bfloat16)
    return stats


def gib_allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def conditioning(args: argparse.Namespace, base: SD3Adapter, text: dict, device, dtype, res: dict):
    """G rows of the prompt's conditioning and of the null one: encoded by the text encoders (then offloaded
    as asked, memory recorded in ``res``) or, without them, random tensors of the real shapes."""
    G = args.group_size
    if not args.text_encoders:
        gen = torch.Generator(device=device).manual_seed(1234)
        emb = torch.randn(1, text["seq_len"], text["dim"], generator=gen, device=device, dtype=dtype)
        pooled = torch.randn(1, text["pooled"], generator=gen, device=device, dtype=dtype)
        cond = Conditioning({"prompt_embeds": emb, "pooled_prompt_embeds": pooled}).repeat_interleave(G)
        null = Conditioning({"prompt_embeds": emb * 0.1, "pooled_prompt_embeds": pooled * 0.1})
        return cond, null.repeat_interleave(G)
    from gpu_text import parameters_gib

    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    res["text_encoders_gib"] = parameters_gib({k: getattr(base.pipeline, k, None) for k in names})
    res["allocated_gib_with_encoders"] = gib_allocated(device)
    t0 = time.perf_counter()
    cond = base.encode_prompts(["a photo of a red apple on a wooden table, studio light"])
    null = base.encode_prompts([""])
    res["encode_seconds"] = time.perf_counter() - t0
    if args.offload_text_encoders != "off":
        base.offload_text_encoders(args.offload_text_encoders)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["allocated_gib_after_offload"] = gib_allocated(device)
    return cond.index([0] * G), null.index([0] * G)


def report_iteration(
    args, res: dict, meter: Meter, stats: dict, total: float, it: int, fpr: float, name: str
):
    """Print one iteration's stage table and throughput, and keep them in ``res["iterations"]``."""
    cuda = meter.cuda
    stages = ("sampling", "reward", "advantages", "train_reference", "train_policy", "optimizer")
    tag = " (warm-up)" if it == 0 and args.iters > 1 else ""
    print(f"\niteration {it}{tag}: {total:.2f}s")
    print(f"  {'stage':<16}{'seconds':>9}{'share':>8}{'fwd calls':>10}{'fwd rows':>10}{'peak GiB':>10}")
    rec: dict[str, Any] = {"seconds": total, "stages": {}, "tflops": {}, "stats": dict(stats)}
    for s in stages:
        print(
            f"  {s:<16}{meter.seconds[s]:>9.3f}{meter.seconds[s] / total:>8.1%}{meter.calls[s]:>10}"
            f"{meter.rows[s]:>10}{meter.peak[s]:>10.2f}"
        )
        rec["stages"][s] = {
            "seconds": meter.seconds[s],
            "calls": meter.calls[s],
            "rows": meter.rows[s],
            "peak_gib": meter.peak[s],
        }
    # Training: policy = forward + backward (~3 forwards, +1 recompute with checkpointing).
    train_mult = 4 if (cuda and not args.no_grad_ckpt) else 3
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    for s, mult in (("sampling", 1), ("reward", 1), ("train_policy", train_mult), ("train_reference", 1)):
        if meter.seconds[s] > 0:
            tflops = meter.rows[s] * fpr * mult / meter.seconds[s] / 1e12
            frac = tflops / peak if peak and cuda else None
            rec["tflops"][s] = {"tflops": tflops, "fraction_of_bf16_peak": frac}
            mfu = f" ({frac:.1%} of {peak:g} bf16 peak)" if frac is not None else ""
            print(f"  {s} achieved: {tflops:.4g} TFLOP/s{mfu}")
    print(
        f"  reward mean {stats['reward_mean']:.4f} std {stats['reward_std']:.4f}; "
        f"loss {stats['loss']:.3e}, "
        f"kl {stats['kl']:.3e}, clipfrac {stats['clipfrac']:.3f}, max|ratio-1| {stats['ratio_dev']:.2e}, "
        f"grad norm {stats['grad_norm']:.3e}, finite {bool(stats['finite'])}, "
        f"trajectory latents {'torch.bfloat16' if stats['latents_bf16'] else 'torch.float32'}"
    )
    res["iterations"].append(rec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print("no CUDA device: run with --tiny for the CPU smoke test")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg, text = (TINY, TINY_TEXT) if args.tiny else (SD35_MEDIUM, SD35_TEXT)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.lora_rank = args.lora_rank or (4 if args.tiny else 32)
    args.lora_alpha = args.lora_alpha or (8.0 if args.tiny else 64.0)
    args.probe_batch = args.probe_batch or (640 if args.tiny else 64)
    args.iters = args.iters or 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    res: dict[str, Any] = {"settings": vars(args).copy(), "iterations": []}

    t0 = time.perf_counter()
    encoders = None
    if args.text_encoders:
        from gpu_text import sd35_text_encoders

        encoders = sd35_text_encoders(device, dtype, args.tiny)
    base = build_adapter(cfg, args.resolution, device, dtype, not args.no_grad_ckpt and cuda, encoders)
    add_lora(base, args.lora_rank, args.lora_alpha, base.lora_target_modules)
    n_params = sum(p.numel() for p in base.denoiser.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in lora_parameters(base))
    cond, null = conditioning(args, base, text, device, dtype, res)
    del encoders
    opt = torch.optim.AdamW(lora_parameters(base), lr=args.lr, weight_decay=1e-4)
    fpr = flops_per_row(base, cond)
    setup_s = time.perf_counter() - t0

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    tokens = base.image_seq_len()
    res |= {"device": name, "dtype": str(dtype), "frozen_params": n_params, "lora_params": n_lora}
    res |= {"setup_seconds": setup_s, "flops_per_row": fpr, "image_tokens": tokens}
    res["text_tokens"] = int(cond.tensors["prompt_embeds"].shape[1])
    print(
        f"device: {name}  dtype: {dtype}  model: {'tiny' if args.tiny else 'SD3.5-Medium'} MMDiT "
        f"({n_params / 1e6:,.2f} M frozen params, LoRA r={args.lora_rank} alpha={args.lora_alpha:g}: "
        f"{n_lora / 1e6:,.3f} M trainable)"
    )
    print(
        f"recipe: {args.resolution}px ({tokens} image + {res['text_tokens']} text tokens), "
        f"G={args.group_size}, T={args.steps}, CFG={args.cfg:g}, K={args.probes}, "
        f"train steps {train_window(args.steps, args.rho)}, "
        f"beta={args.beta:g}, latents {latent_dtype(args)}, "
        f"grad ckpt {'on' if (cuda and not args.no_grad_ckpt) else 'off'}"
    )
    if args.text_encoders:
        print(
            f"text encoders: {res['text_encoders_gib']:.2f} GiB; allocated "
            f"{res['allocated_gib_with_encoders']:.2f} GiB with them, "
            f"{res['allocated_gib_after_offload']:.2f} GiB after offload "
            f"({args.offload_text_encoders}); encoding {res['encode_seconds']:.2f}s"
        )
    print(f"setup {setup_s:.1f}s; FLOPs per forward row (FlopCounterMode): {fpr:.4g}")

    for it in range(args.iters):
        meter = Meter(device, base.denoiser)
        t_it = time.perf_counter()
        stats = run_iteration(args, base, cond, null, opt, meter, it)
        report_iteration(args, res, meter, stats, time.perf_counter() - t_it, it, fpr, name)
    if cuda:
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        print(f"\npeak memory (whole run): {res['peak_reserved_gib']:.2f} GiB reserved")
    if args.save_lora:
        print(f"LoRA saved to {save_lora(base, args.save_lora)}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
