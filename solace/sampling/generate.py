"""Seeded image generation: the one place evaluation, image grids, ``solace sample``, the metric
evaluations, the self-confidence analyses and the benchmarks draw their initial noise and sample.

Two ways of seeding, each written once:

* by sample (:func:`generate_jobs`, :func:`generate`): sample ``j`` of prompt ``i`` starts from noise of
  its own seed ``prompt_seed(seed, first_index + i, j)``, whatever batch it shares, so an evaluation split
  over processes or batched differently samples the same images (ODE; the SDE noise of a batch comes from
  ``seed + batch start``);
  :func:`generate_shared` splits such samples over the processes of a run (an image grid);
* by group (:func:`generate_group`): ``n`` samples of one prompt from one generator seeded ``seed``, their
  initial noise drawn in one call, the SDE noise from the same generator (``solace score / rerank /
  analyze``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from solace.errors import check
from solace.models.base import Conditioning, FlowModelAdapter
from solace.sampling.sampler import sample
from solace.utils.images import to_uint8
from solace.utils.seeding import prompt_seed

SDE_NOISE_LEVEL = 0.7  # Flow-GRPO's training sampler
SAMPLERS = ("sde", "ode")


def job_noise(adapter: FlowModelAdapter, jobs: Sequence[tuple[int, int]], seed: int, first_index: int = 0):
    """The initial noise (len(jobs), *latent) of the samples ``jobs`` (``(i, j)``: sample ``j`` of prompt
    ``i``), each from its own generator seeded ``prompt_seed(seed, first_index + i, j)``, on the CPU."""
    return torch.stack(
        [
            torch.randn(
                adapter.latent_shape(),
                generator=torch.Generator().manual_seed(prompt_seed(seed, first_index + i, j)),
            )
            for i, j in jobs
        ]
    )


@torch.no_grad()
def generate(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    samples_per_prompt: int,
    num_steps: int,
    cfg_scale: float,
    seed: int = 0,
    batch_size: int = 64,
    noise_level: float = 0.0,
    progress: bool = True,
    first_index: int = 0,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Images (P * S, 3, H, W) in [0, 1], prompt-major, deterministic given ``seed`` (ODE by default).
    CFG's null conditioning is ``negative_prompt`` ("": the empty prompt).

    The initial noise of sample ``j`` of prompt ``i`` depends only on ``(seed, first_index + i, j)``, not on
    batching: generating a long list in slices (``first_index`` = the slice's start) gives the same noise.
    """
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    return generate_jobs(
        adapter, prompts, jobs, num_steps, cfg_scale, seed, batch_size, noise_level, progress, first_index,
        negative_prompt,
    )  # fmt: skip


@torch.no_grad()
def generate_jobs(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    jobs: Sequence[tuple[int, int]],
    num_steps: int,
    cfg_scale: float,
    seed: int = 0,
    batch_size: int = 64,
    noise_level: float = 0.0,
    progress: bool = True,
    first_index: int = 0,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Images (len(jobs), 3, H, W) of the samples ``jobs``: ``(i, j)`` is sample ``j`` of ``prompts[i]``, its
    initial noise from ``(seed, first_index + i, j)`` alone (:func:`job_noise`: what :func:`generate`
    samples for it, whichever other samples share its batch; a process's block of an evaluation,
    :mod:`solace.evaluation.sharding`). Only the prompts the jobs use are encoded."""
    sigmas = adapter.sigmas(num_steps)
    null = adapter.encode_prompts([negative_prompt])
    uniq = list(dict.fromkeys(prompts[i] for i, _ in jobs))
    enc = adapter.encode_prompts(uniq)
    where = {p: k for k, p in enumerate(uniq)}
    out = []
    bar = tqdm(total=len(jobs), desc="sampling", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        noise = job_noise(adapter, chunk, seed, first_index).to(adapter.device)
        cond = enc.index([where[prompts[i]] for i, _ in chunk])
        null_b = null.index([0] * len(chunk))
        g = torch.Generator().manual_seed(seed + s)
        traj = sample(
            adapter,
            cond,
            null_b,
            sigmas,
            noise,
            cfg_scale=cfg_scale,
            noise_level=noise_level,
            generator=g,
            keep_trajectory=False,
        )
        out.append(adapter.decode(traj.final).cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def generate_group(
    adapter: FlowModelAdapter,
    cond: Conditioning,
    null: Conditioning,
    n: int,
    num_steps: int,
    cfg_scale: float,
    seed: int,
    sampler: str = "sde",
    batch_size: int = 16,
) -> torch.Tensor:
    """``n`` clean latents (n, *latent) for one prompt (``cond``/``null``: one row each), from one generator
    seeded ``seed``: the initial noise of all ``n`` first, then each batch's SDE noise (``sampler``: ``sde``,
    the training sampler's noise level, or ``ode``)."""
    check(sampler in SAMPLERS, "sampler", f"must be one of {SAMPLERS}, got {sampler!r}")
    sigmas = adapter.sigmas(num_steps)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *adapter.latent_shape()), generator=gen)
    out = []
    for s in range(0, n, batch_size):
        b = noise[s : s + batch_size].to(adapter.device)
        traj = sample(
            adapter,
            cond.index([0] * len(b)),
            null.index([0] * len(b)),
            sigmas,
            b,
            cfg_scale=cfg_scale,
            noise_level=SDE_NOISE_LEVEL if sampler == "sde" else 0.0,
            generator=gen,
            keep_trajectory=False,
        )
        out.append(traj.final.float())
    return torch.cat(out)


@torch.no_grad()
def generate_shared(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    samples_per_prompt: int,
    num_steps: int,
    cfg_scale: float,
    shards: Any,
    what: str = "grid",
    seed: int = 0,
    negative_prompt: str = "",
) -> list[np.ndarray]:
    """:func:`generate`'s images as uint8 (H, W, 3) arrays (what a grid's PNG holds), every process sampling
    its block of them (``shards``: a :class:`solace.evaluation.sharding.Shards`) and receiving all of them,
    prompt-major."""
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    mine, real = shards.share(len(jobs), what)
    pairs: list[tuple[int, np.ndarray]] = []
    if mine:
        images = generate_jobs(
            adapter, prompts, [jobs[k] for k in mine], num_steps, cfg_scale, seed=seed, progress=False,
            negative_prompt=negative_prompt,
        )  # fmt: skip
        arr = to_uint8(images[:real])
        pairs = [(k, np.ascontiguousarray(a)) for k, a in zip(mine[:real], arr, strict=True)]
    return shards.gather(pairs, len(jobs))
