"""Pretraining of the toy world's base model: rectified-flow loss with caption dropout (for CFG).

``solace toy pretrain`` runs :func:`pretrain`. It is reproducible from its seed (same data, init and batch
order; bitwise equality across machines also needs the same thread count), shows a progress bar, keeps an
EMA of the weights, checkpoints atomically every ``checkpoint_every`` steps (``--resume`` continues a killed
run) and writes the EMA weights as safetensors plus a learning curve (CSV and PNG).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from solace.errors import ConfigError
from solace.sampling.schedule import shift_sigmas
from solace.toy.adapter import TOY_SHIFT, ToyAdapter, ToyTokenizer, save_toy_weights
from solace.toy.evaluate import evaluate_records
from solace.toy.net import ToyFlowNet
from solace.toy.render import render_prompt
from solace.toy.world import CATEGORIES, balanced_subset, load_heldout, sample_train_prompt, vocabulary
from solace.utils.files import earlier_run, remove_earlier_run
from solace.utils.seeding import check_seed


@dataclass
class PretrainConfig:
    out: str = "runs/toy_pretrain"
    steps: int = 4000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    dataset_size: int = 80_000
    seed: int = 0
    threads: int = 2
    eval_every: int = 500
    eval_cfg: float = 5.0
    checkpoint_every: int = 250
    channels: tuple[int, int, int] = (48, 96, 144)
    init: str = ""  # continue from another run's checkpoint.safetensors with a fresh schedule


def check_config(cfg: PretrainConfig) -> None:
    """Every bound the run needs, checked before anything is rendered or written (fields as CLI options)."""
    for option, value, least in (
        ("--steps", cfg.steps, 1),
        ("--batch-size", cfg.batch_size, 1),
        ("--dataset-size", cfg.dataset_size, 1),
        ("--eval-every", cfg.eval_every, 1),
        ("--threads", cfg.threads, 1),
        ("checkpoint_every", cfg.checkpoint_every, 1),
        ("warmup", cfg.warmup, 0),
    ):
        if value < least:
            raise ConfigError(option, f"must be >= {least}, got {value}")
    if not cfg.lr > 0:
        raise ConfigError("--lr", f"must be > 0, got {cfg.lr}")
    check_seed(cfg.seed, "--seed")


def _render_chunk(args: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    seed, n = args
    rng = random.Random(seed)
    imgs = np.empty((n, 32, 32, 3), dtype=np.uint8)
    prompts = []
    for i in range(n):
        rec = sample_train_prompt(rng)
        imgs[i] = render_prompt(rec, rng.getrandbits(32))
        prompts.append(rec.prompt)
    return imgs, prompts


def build_dataset(size: int, seed: int, cache: Path, workers: int = 2) -> tuple[np.ndarray, list[str]]:
    """Render ``size`` training scenes (cached as .npz + .json next to the run)."""
    npz, js = cache.with_suffix(".npz"), cache.with_suffix(".json")
    if npz.exists() and js.exists():
        prompts = json.loads(js.read_text())
        if len(prompts) == size:
            return np.load(npz)["images"], prompts
    chunk = 2000
    jobs = [(seed * 1_000_003 + i, min(chunk, size - i * chunk)) for i in range(math.ceil(size / chunk))]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="rendering scenes"))
    images = np.concatenate([p[0] for p in parts])
    prompts = [q for p in parts for q in p[1]]
    tmp = npz.with_name(npz.name + ".tmp.npz")
    np.savez(tmp, images=images)
    os.replace(tmp, npz)
    js.write_text(json.dumps(prompts))
    return images, prompts


def sample_t(n: int, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps: half uniform, half shifted logit-normal (the density the sampler visits)."""
    u = torch.rand(n, generator=generator)
    ln = torch.sigmoid(torch.randn(n, generator=generator))
    ln = shift_sigmas(ln, TOY_SHIFT)
    pick = torch.rand(n, generator=generator) < 0.5
    return torch.where(pick, u, ln).clamp(1e-4, 1.0)


def _lr(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def quick_eval(
    net: ToyFlowNet,
    cfg_scale: float,
    per_category: int = 2,
    samples: int = 4,
    steps: int = 10,
    seed: int = 1234,
) -> dict:
    """Strict/lenient accuracy on a small fixed held-out subset (for the learning curve)."""
    recs = balanced_subset(load_heldout(), per_category * len(CATEGORIES))
    adapter = ToyAdapter(net=net)
    return evaluate_records(
        adapter,
        recs,
        samples_per_prompt=samples,
        num_steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        progress=False,
    )["summary"]


def _load_init(path: str, net: ToyFlowNet, ema: ToyFlowNet, opt: torch.optim.Optimizer) -> None:
    """Weights, EMA and AdamW moments of another pretraining run's checkpoint (``--init``): a continuation
    with a fresh warm-up and cosine schedule, on this run's own data and batch order."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("init", f"no pretraining checkpoint at {p}; pass a run's checkpoint.safetensors")
    sd = load_file(str(p))
    if not any(k.startswith("net.") for k in sd):
        raise ConfigError("init", f"{p} is not a pretraining checkpoint (no net.* tensors)")
    try:
        _load_state(sd, net, ema, opt, adam_step=1000)
    except RuntimeError as e:
        raise ConfigError("init", f"{p} holds another architecture (--channels must match): {e}") from None


def _load_state(
    sd: dict[str, torch.Tensor], net: ToyFlowNet, ema: ToyFlowNet, opt: torch.optim.Optimizer, adam_step: int
) -> None:
    """Weights, EMA and AdamW moments from a checkpoint's tensors. ``adam_step`` sets Adam's bias correction:
    the run's own step on resume; 1000 for ``--init`` (warm moments: the correction is then 1 to 4e-5)."""
    net.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("ema.")})
    for i, q in enumerate(opt.param_groups[0]["params"]):
        if f"opt.{i}.exp_avg" in sd:
            opt.state[q] = {
                "step": torch.tensor(float(adam_step)),
                "exp_avg": sd[f"opt.{i}.exp_avg"],
                "exp_avg_sq": sd[f"opt.{i}.exp_avg_sq"],
            }


def _init_provenance(init: str, steps: int, seconds: float) -> dict[str, str]:
    """For a continuation: the command, seed, steps and time of the run it continued (read from that run's
    final weights next to its checkpoint, when present) and the totals."""
    if not init:
        return {}
    from safetensors import safe_open

    src = Path(init).with_name("toy_base.safetensors")
    if not src.exists():
        return {"init_from": str(init)}
    with safe_open(str(src), "pt") as f:
        m = f.metadata() or {}
    out = {"init_from": str(init), **{f"init_from_{k}": v for k, v in m.items() if k != "config"}}
    if "steps" in m and "train_seconds" in m:
        out["total_steps"] = str(int(m.get("total_steps", m["steps"])) + steps)
        before = float(m.get("total_train_seconds", m["train_seconds"]))
        out["total_train_seconds"] = f"{before + seconds:.0f}"
    return out


# What a pretraining run writes into its folder (``dataset/`` is a cache of the seed's scenes, reused).
RUN_FILES = (
    "config.json",
    "log.csv",
    "checkpoint.safetensors",
    "checkpoint_state.json",
    "toy_base.safetensors",
    "learning_curve.png",
)


def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    check_config(cfg)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    found = earlier_run(out, RUN_FILES)
    if found and overwrite:
        removed = remove_earlier_run(out, RUN_FILES)
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)
    elif found and not resume:
        raise ConfigError(
            "--out",
            f"{out} holds an earlier pretraining run ({', '.join(found)}); `--resume` continues it, "
            "`--overwrite` replaces it, or choose another --out",
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    images, prompts = build_dataset(cfg.dataset_size, cfg.seed, out / "dataset", workers=cfg.threads)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # z = 2x - 1
    tok = ToyTokenizer()
    ids_all, mask_all = tok(prompts)
    null_ids, null_mask = tok([""])

    torch.manual_seed(cfg.seed)
    net = ToyFlowNet(len(vocabulary()), tuple(cfg.channels))
    ema = ToyFlowNet(len(vocabulary()), tuple(cfg.channels))
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    ckpt = out / "checkpoint.safetensors"
    if cfg.init and not (resume and ckpt.exists()):
        _load_init(cfg.init, net, ema, opt)
    if resume and ckpt.exists():
        sd = load_file(str(ckpt))
        state = json.loads((out / "checkpoint_state.json").read_text())
        _load_state(sd, net, ema, opt, adam_step=state["step"])
        step = state["step"]
        gen.set_state(sd["rng.generator"].to(torch.uint8))
        torch.set_rng_state(sd["rng.torch"].to(torch.uint8))
    log_path = out / "log.csv"
    new_log = not (resume and log_path.exists())
    logf = open(log_path, "a", newline="")
    writer = csv.writer(logf)
    if new_log:
        writer.writerow(["step", "loss", "lr", "elapsed_s", "eval_strict", "eval_lenient"])
    t0 = time.time() - (json.loads((out / "checkpoint_state.json").read_text())["elapsed"] if step else 0.0)
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain toy", dynamic_ncols=True)
    smooth = None
    n = data.shape[0]
    while step < cfg.steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = data[idx]
        ids, mask = ids_all[idx].clone(), mask_all[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        ids[drop], mask[drop] = null_ids, null_mask
        t = sample_t(cfg.batch_size, gen)
        eps = torch.randn(x0.shape, generator=gen)
        tb = t[:, None, None, None]
        zt = (1 - tb) * x0 + tb * eps
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        tokens, pooled = net.encode_text(ids, mask)
        loss = F.mse_loss(net(zt, t, tokens, mask, pooled), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(pn, 1 - d)
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{_lr(step, cfg):.2e}")
        ev_s = ev_l = ""
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ema.eval()
            summ = quick_eval(ema, cfg.eval_cfg)
            ev_s, ev_l = f"{summ['overall']['strict']:.4f}", f"{summ['overall']['lenient']:.4f}"
            tqdm.write(
                f"step {step}: quick eval strict {ev_s} lenient {ev_l} "
                + " ".join(f"{c}={v['strict']:.2f}" for c, v in summ["categories"].items())
            )
        if step % 50 == 0 or ev_s:
            writer.writerow(
                [step, f"{smooth:.5f}", f"{_lr(step, cfg):.3e}", f"{time.time() - t0:.1f}", ev_s, ev_l]
            )
            logf.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tensors = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
            tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
            for i, p in enumerate(opt.param_groups[0]["params"]):
                st = opt.state.get(p)
                if st:
                    tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].contiguous()
                    tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors["rng.generator"] = gen.get_state().clone()
            tensors["rng.torch"] = torch.get_rng_state().clone()
            _atomic_save(tensors, ckpt, {"step": str(step)})
            state_tmp = out / "checkpoint_state.json.tmp"
            state_tmp.write_text(json.dumps({"step": step, "elapsed": time.time() - t0}))
            os.replace(state_tmp, out / "checkpoint_state.json")
    bar.close()
    logf.close()
    command = "solace " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    final = out / "toy_base.safetensors"
    meta = {
        "command": command,
        "seed": str(cfg.seed),
        "steps": str(step),
        "train_seconds": f"{time.time() - t0:.0f}",
        **_init_provenance(cfg.init, step, time.time() - t0),
    }
    half = ToyFlowNet(len(vocabulary()), tuple(cfg.channels))
    half.load_state_dict(ema.state_dict())
    half.half()
    tmp = final.with_name(final.name + ".tmp")
    save_toy_weights(half, tmp, meta)
    os.replace(tmp, final)
    plot_learning_curve(log_path, out / "learning_curve.png")
    return final


def plot_learning_curve(log_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_csv)))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    ev = [
        (int(r["step"]), float(r["eval_strict"]), float(r["eval_lenient"])) for r in rows if r["eval_strict"]
    ]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, loss)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("flow-matching loss (EMA 0.98)")
    ax[0].set_yscale("log")
    if ev:
        ax[1].plot([e[0] for e in ev], [e[1] for e in ev], "o-", label="strict")
        ax[1].plot([e[0] for e in ev], [e[2] for e in ev], "s-", label="lenient")
        ax[1].legend()
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("quick held-out accuracy")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
