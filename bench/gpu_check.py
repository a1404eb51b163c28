"""``solace train``'s own iterations at SD3.5-Medium size on a GPU, measured: the trainer's stage timers, peak
memory, the transformer rows each stage runs and model-FLOPs utilisation (MFU).

Nothing of the iteration is written here. The benchmark builds (once) a random-weight pipeline folder of
SD3.5-Medium's architecture (``bench/sd3_pipeline.py``: the 2.243 B MMDiT with its dual-attention blocks,
CLIP-L and CLIP-G, T5-XXL, the VAE), builds the run's ``SolaceConfig`` as ``solace train`` does
(``load_config(preset, overrides)``: the ``sd35m`` preset, the folder as ``model.name``, one prompt group, no
evaluation, then every ``key=value`` given on the command line), constructs ``Trainer(cfg)`` and calls its
``iteration(it)``: sampling (``Trainer.sample_rollout``), reward (``Trainer.score``), update
(``Trainer.update``: the configured ``train.algorithm``), guard, monitor and log, with the preset's sampling
batch (8), training micro-batch (4), reward batch (64), gradient checkpointing, dtype (bf16) and precision
settings (no TF32: the trainer does not turn it on).

It only observes, without changing what runs: the three stage methods are wrapped on the trainer instance (a
``torch.cuda.synchronize`` before and after each, so its seconds hold its kernels; the trainer's own
``time/sampling``, ``time/reward`` and ``time/update``, which do not synchronise, are reported beside them),
the peak memory of each stage, and a forward pre-hook on the transformer counts the rows each stage feeds it
(the update's rows split into those with gradients, the policy's, and those without, the LoRA-off reference).

FLOPs (model FLOPs, the MFU convention: what the algorithm needs, without recompute). One transformer row
(one sample at one timestep) costs, forward, 2 FLOPs per weight per token it is applied to, plus attention.
The rule of thumb ``2 x params x tokens`` overstates the MMDiT about 2.5 times: the image stream's weights
(about 0.80 B with the dual-attention blocks' second attention) see the image tokens only, the text stream's
(0.66 B) the text tokens only, and the adaLN modulation's (0.77 B of the 2.24 B) run once a row, not once a
token. So ``F ~ 2 x (0.80 B x image_tokens + 0.66 B x text_tokens) + attention``, attention being
``4 x tokens^2 x 1536`` per joint attention (24 blocks) and ``4 x image_tokens^2 x 1536`` per second attention
(13 blocks): at 512 px (1024 image + 333 text tokens) 2.09 TFLOP of matmuls + 0.36 of attention = 2.44 TFLOP
(``2 x params x tokens`` would say 6.09). ``torch.utils.flop_counter.FlopCounterMode`` counts exactly this
(matmuls 2mnk, SDPA; the CPU's SDPA kernel added by hand) on one row at the run's shapes, once, with the
trainer's own adapter and LoRA:

* forward ``F``: one no-grad row;
* forward + backward ``FB``: one row with gradients, as the update runs it: the base weights are frozen, so
  autograd computes input gradients only (one matmul per linear layer, about one forward: ``FB ~ 2 F``, not
  the ``3 F`` of full training) plus the LoRA weights' gradients (rank 32: small) and attention's backward
  (2.5 times its forward); counted with gradient checkpointing off; with it on the recomputed forward
  (hardware FLOPs, ``FB_hw``) is reported apart and left out of MFU.

Per stage, with the rows the hook counted (so CFG's doubled batch and every probe are in them):

* sampling: ``rows x F`` (rows = G x |T| x 2 with CFG);
* reward: ``rows x F`` (rows = K x |T| x G: the conditional velocity, no CFG);
* update: ``grad rows x FB + no-grad rows x F`` (Flow-GRPO: rows = window steps x G x 2 with CFG each,
  the reference's no-grad rows only when ``grpo.beta > 0``).

MFU = model FLOPs / synchronised seconds / the card's dense bf16 peak (H100 SXM and H200 989 TFLOP/s, H100
PCIe 756, A100 312; none on a CPU).

Usage:
    python bench/gpu_check.py --json sd35m.json                   # GPU: the sd35m preset, G=16, T=10, K=8
    python bench/gpu_check.py --iters 1 sampling.group_size=8     # any override, as on `solace train`
    OMP_NUM_THREADS=1 python bench/gpu_check.py --tiny            # the same path, tiny pipeline, CPU, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/sd3_pipeline.py beside this script
from sd3_pipeline import build  # noqa: E402

PROMPT = "a photo of a red apple on a wooden table, studio light"
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense; first match
STAGES = {"sample_rollout": "sampling", "score": "reward", "update": "update"}
STAT_KEYS = ("reward/mean", "reward/std", "train/loss", "train/kl", "train/clipfrac", "train/grad_norm")
STAT_KEYS += ("train/ratio_min", "train/ratio_max")
TRAINER_TIMERS = {"sampling": "time/sampling", "reward": "time/reward", "update": "time/update"}
# the tiny form: every size the sd35m preset sets that a CPU cannot afford, made tiny
TINY_OVERRIDES = [
    "model.dtype=fp32",
    "model.resolution=64",
    "model.max_sequence_length=16",
    "model.gradient_checkpointing=false",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "sampling.group_size=2",
    "sampling.num_steps=2",
    "reward.self_confidence.num_probes=2",
    "train.micro_batch_size=2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny pipeline on the CPU, fp32 (< 1 minute)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda, tiny: cpu")
    p.add_argument("--config", default="sd35m", help="the preset (or YAML) the run starts from")
    p.add_argument("--pipeline", default=None, help="the random pipeline folder (built there when missing)")
    p.add_argument("--out", default="runs/gpu_check", help="folder of the run (train.output_dir = OUT/run)")
    p.add_argument("--iters", type=int, default=2, help="iterations (the first warms up)")
    p.add_argument("--no-t5", action="store_true", help="model.text_encoder_3=false (T5 tokens are zeros)")
    p.add_argument(
        "--offload-text-encoders",
        choices=("off", "cpu", "free"),
        default="off",
        help="model.offload_text_encoders (free: with model.embedding_cache=OUT/embeddings)",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="key=value settings, as on `solace train` (applied last)")
    return p.parse_args(argv)


def run_overrides(args: argparse.Namespace, pipeline: Path, device: str) -> list[str]:
    """What the benchmark sets on top of the preset, then the command line's own overrides."""
    out = Path(args.out)
    prompts = out / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(PROMPT + "\n")
    ov = [
        f"model.name={pipeline}",
        f"model.text_encoder_3={not args.no_t5}",
        f"data.train_prompts={prompts}",
        f"eval.prompts={prompts}",
        "sampling.prompts_per_step=1",  # one group of G samples (the preset: 48 over 8 GPUs)
        "eval.metrics=[]",  # no metric models (they would download): nothing evaluates
        f"train.iterations={args.iters}",
        "eval.every=0",
        "eval.image_every=0",
        "train.report=false",
        "train.log_with=[]",
        f"train.output_dir={out / 'run'}",
        f"train.device={device}",
    ]
    if args.offload_text_encoders != "off":  # (an override "...=off" would read as YAML's false)
        ov.append(f"model.offload_text_encoders={args.offload_text_encoders}")
    if args.offload_text_encoders == "free":
        ov.append(f"model.embedding_cache={out / 'embeddings'}")
    return ov + (TINY_OVERRIDES if args.tiny else []) + list(args.overrides)


class StageMeter:
    """Seconds, peak memory and transformer rows of the trainer's stages, observed from outside: its
    ``sample_rollout``, ``score`` and ``update`` wrapped on the instance (``Trainer.iteration`` and
    ``collect`` call them through ``self``), and a forward pre-hook on its transformer."""

    def __init__(self, trainer: Any):
        self.cuda = trainer.acc.device.type == "cuda"
        self.device = trainer.acc.device
        self.stage: str | None = None
        self.reset()
        for method, stage in STAGES.items():
            setattr(trainer, method, self._wrap(stage, getattr(trainer, method)))
        trainer.adapter.denoiser.register_forward_pre_hook(self._count, with_kwargs=True)

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.rows: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak_gib: dict[str, float] = defaultdict(float)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.stage is None:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        key = self.stage
        if key == "update":  # the policy's forwards (backward follows) or the no-grad ones (reference, EMA)
            key = "update_grad" if torch.is_grad_enabled() else "update_nograd"
        self.calls[key] += 1
        self.rows[key] += int(x.shape[0])

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _wrap(self, stage: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.stage, t0 = stage, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - t0
                self.stage = None
                self.peak_gib[stage] = max(self.peak_gib[stage], peak_gib(self.device))

        return timed


def peak_gib(device: torch.device) -> float:
    """CUDA: the peak allocated since the last reset; CPU: the process's peak RSS so far (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def row_flops(trainer: Any) -> dict[str, float]:
    """FLOPs of one transformer row at the run's shapes (``FlopCounterMode``, the trainer's adapter and LoRA):
    forward; forward + backward with the base frozen (input gradients + LoRA weight gradients), gradient
    checkpointing off; and the same with the run's checkpointing (its recompute included). Leaves no
    gradient behind."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = cpu_attention_flops()
    ad, den = trainer.adapter, trainer.adapter.denoiser
    gen = torch.Generator(device=ad.device).manual_seed(0)
    z = torch.randn(1, *ad.latent_shape(), generator=gen, device=ad.device)
    t = torch.full((1,), 0.5, device=ad.device)
    cond = trainer.null.to(ad.device)  # the empty prompt: the run's token count

    def count(grad: bool) -> float:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.set_grad_enabled(grad):
            v = ad.velocity(z, t, cond)
            if grad:
                v.float().square().mean().backward()
        return float(counter.get_total_flops())

    fwd = count(False)
    ckpt = bool(getattr(den, "is_gradient_checkpointing", False))
    if ckpt:
        den.disable_gradient_checkpointing()
    try:
        fb = count(True)
    finally:
        if ckpt:
            den.enable_gradient_checkpointing()
    fb_hw = count(True) if ckpt else fb
    for p in trainer.params:
        p.grad = None
    return {"forward": fwd, "forward_backward": fb, "forward_backward_recompute": fb_hw}


def cpu_attention_flops() -> dict[Any, Any]:
    """``FlopCounterMode`` counts the GPU's SDPA kernels (flash, efficient, cuDNN) but not the CPU's: the same
    formulas for it (forward ``4 x q_tokens x k_tokens x head_dim`` a head, backward 2.5 times that)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def fwd(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }


def text_encoders(trainer: Any) -> dict[str, dict[str, Any]]:
    """Each text encoder the pipeline holds: its parameters' GiB and the device they are on."""
    res = {}
    for k in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(getattr(trainer.adapter, "pipeline", None), k, None)
        if m is not None:
            ps = list(m.parameters())
            gib = sum(p.numel() * p.element_size() for p in ps) / 2**30
            res[k] = {"gib": gib, "device": str(ps[0].device)}
    return res


def device_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def stage_record(meter: StageMeter, stats: dict, flops: dict, peak: float | None) -> dict[str, Any]:
    """One iteration's stages: seconds (synchronised and the trainer's), rows, model FLOPs, TFLOP/s, MFU."""
    F, FB, FB_hw = flops["forward"], flops["forward_backward"], flops["forward_backward_recompute"]
    rows = meter.rows
    model = {  # the FLOP count of each stage (see the module docstring)
        "sampling": rows["sampling"] * F,
        "reward": rows["reward"] * F,
        "update": rows["update_grad"] * FB + rows["update_nograd"] * F,
    }
    hardware = dict(model, update=rows["update_grad"] * FB_hw + rows["update_nograd"] * F)
    out: dict[str, Any] = {}
    for s in ("sampling", "reward", "update"):
        sec = meter.seconds[s]
        tflops = model[s] / sec / 1e12 if sec > 0 else 0.0
        out[s] = {
            "seconds": sec,
            "trainer_seconds": stats.get(TRAINER_TIMERS[s]),
            "rows": rows[s] if s != "update" else rows["update_grad"] + rows["update_nograd"],
            "calls": meter.calls[s]
            if s != "update"
            else meter.calls["update_grad"] + meter.calls["update_nograd"],
            "model_tflop": model[s] / 1e12,
            "hardware_tflop": hardware[s] / 1e12,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_gib": meter.peak_gib[s],
        }
    out["update"] |= {"rows_grad": rows["update_grad"], "rows_nograd": rows["update_nograd"]}
    return out


def print_iteration(it: int, rec: dict, warm: bool, cuda: bool) -> None:
    st, nan = rec["stages"], float("nan")
    s = {k: rec["stats"].get(k, nan) for k in STAT_KEYS}
    mem = "peak GiB" if cuda else "RSS GiB"
    print(f"\niteration {it}{' (warm-up)' if warm else ''}: {rec['seconds']:.2f}s")
    head = f"{'seconds':>9}{'trainer s':>10}{'rows':>8}{'TFLOP':>9}{'TFLOP/s':>9}{'MFU':>7}{mem:>10}"
    print(f"  {'stage':<10}{head}")
    for name, r in st.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"  {name:<10}{r['seconds']:>9.3f}{r['trainer_seconds'] or 0:>10.3f}{r['rows']:>8}"
            f"{r['model_tflop']:>9.3g}{r['tflops']:>9.3g}{mfu:>7}{r['peak_gib']:>10.2f}"
        )
    print(
        f"  update rows: {st['update']['rows_grad']} with gradients, {st['update']['rows_nograd']} without; "
        f"reward mean {s['reward/mean']:.4f} std {s['reward/std']:.4f}; "
        f"loss {s['train/loss']:.4e}, kl {s['train/kl']:.4e}, clipfrac {s['train/clipfrac']:.3f}, "
        f"ratio [{s['train/ratio_min']:.6f}, {s['train/ratio_max']:.6f}], "
        f"grad norm {s['train/grad_norm']:.4e}"
    )


def setup(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The pipeline folder, the config as ``solace train`` builds it, the trainer; what the setup measured."""
    from solace.trainer.config import load_config
    from solace.trainer.trainer import Trainer

    cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cpu" if args.tiny or not cuda else "cuda")
    size, dtype = ("tiny", "fp32") if args.tiny else ("sd35m", "bf16")
    t0 = time.perf_counter()
    pipeline = Path(args.pipeline or f"runs/bench_pipelines/{size}")
    build(pipeline, size, dtype, device, t5=not args.no_t5)
    overrides = run_overrides(args, pipeline, device)
    cfg = load_config(args.config, overrides)  # as `solace train --config CONFIG OVERRIDES...`
    run_dir = Path(cfg.train.output_dir)  # (Trainer.train would lock it; iteration() only appends log.csv)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.csv").unlink(missing_ok=True)
    trainer = Trainer(cfg)
    dev = trainer.acc.device
    res: dict[str, Any] = {
        "settings": vars(args).copy(),
        "overrides": overrides,
        "config": dataclasses.asdict(cfg),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "dtype": str(trainer.adapter.dtype),
        "pipeline": str(pipeline),
        "transformer_params": sum(
            p.numel() for p in trainer.adapter.denoiser.parameters() if not p.requires_grad
        ),
        "lora_params": sum(p.numel() for p in trainer.params),
        "image_tokens": trainer.adapter.image_seq_len(),
        "text_tokens": int(trainer.null.tensors["prompt_embeds"].shape[1]),
        "gradient_checkpointing": bool(getattr(trainer.adapter.denoiser, "is_gradient_checkpointing", False)),
        "text_encoders": text_encoders(trainer),
        "allocated_gib_after_setup": torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    res["flops_per_row"] = row_flops(trainer)
    res["setup_seconds"] = time.perf_counter() - t0
    res["iterations"] = []
    return trainer, res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and args.device == "auto" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny (or --device cpu for the full size, slowly)")
        return 2
    trainer, res = setup(args)
    dev = trainer.acc.device
    f = res["flops_per_row"]
    print(
        f"device: {res['device']}  dtype: {res['dtype']}  pipeline: {res['pipeline']} "
        f"({res['transformer_params'] / 1e9:.3f} B transformer params, {res['lora_params'] / 1e6:.3f} M LoRA)"
    )
    print(f"config: {args.config} + {' '.join(res['overrides'])}")
    print(
        f"tokens {res['image_tokens']} image + {res['text_tokens']} text; FLOPs a row: forward "
        f"{f['forward']:.4g}, forward+backward {f['forward_backward']:.4g} "
        f"(backward = {(f['forward_backward'] - f['forward']) / f['forward']:.2f} forwards), with recompute "
        f"{f['forward_backward_recompute']:.4g}; gradient checkpointing {res['gradient_checkpointing']}"
    )
    print(f"text encoders: {res['text_encoders']}; setup {res['setup_seconds']:.1f}s")
    meter = StageMeter(trainer)
    peak = device_peak(res["device"])
    for it in range(args.iters):
        meter.reset()
        t0 = time.perf_counter()
        stats = trainer.iteration(it)  # the trainer's iteration: sample, score, update, guard, monitor, log
        rec = {"seconds": time.perf_counter() - t0, "stats": stats}
        rec["stages"] = stage_record(meter, stats, f, peak)
        print_iteration(it, rec, it == 0 and args.iters > 1, dev.type == "cuda")
        res["iterations"].append(rec)
    if dev.type == "cuda":
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
        print(f"\npeak memory (whole run): {res['peak_reserved_gib']:.2f} GiB reserved")
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
