"""Named random streams. Every random draw of a run comes from a generator whose seed says what it is for,
so that a sample's noise depends only on ``(seed, iteration, sample index)``: the same run on 1 or N
processes, or resumed after a kill, draws exactly the same numbers.

Training streams (:class:`TrainStreams`) hash ``(run seed, iteration, index, stream)`` (FNV-1a over 48-bit
parts, reduced to 63 bits). Evaluation without training (``solace score / rerank / analyze``) seeds the
samples of prompt ``i`` with :func:`prompt_seed`, a plain linear form kept so that recorded results stay
reproducible.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from solace.errors import check

SEED_MAX = 2**32 - 1  # seeds are derived by arithmetic (prompt_seed, seed + offsets): keep them in 32 bits


def check_seed(seed: int, field: str) -> None:
    """A seed is a whole number in [0, 2**32 - 1] (what torch, numpy and every derived seed accept)."""
    check(0 <= int(seed) <= SEED_MAX, field, f"must be a whole number from 0 to {SEED_MAX}, got {seed}")


def mix(*parts: int) -> int:
    """A 63-bit seed from integer parts (FNV-1a style); different parts give independent streams."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Stream(IntEnum):
    """What a training stream is for (the value is its salt in :func:`mix`)."""

    INITIAL_NOISE = 1  # z_1 of each sample (or of each group, with sampling.same_init_noise)
    SDE_NOISE = 2  # the SDE noise of every step of each sample
    GROUP_PROBES = 3  # self-confidence probes shared by a prompt group (probe_mode=group)
    SAMPLE_PROBES = 4  # self-confidence probes of one sample (probe_mode=per_sample_timestep)
    MINIBATCH_ORDER = 5  # the shuffle of the samples into optimizer steps, per inner epoch and process
    NFT_TIMESTEPS = 6  # DiffusionNFT: the training timesteps of one sample, per inner epoch
    NFT_NOISE = 7  # DiffusionNFT: the noise that re-noises one sample at them, per inner epoch
    STANDARDIZE_BATCHES = 8  # the shuffle of an iteration's samples into S_t standardisation batches


class TrainStreams:
    """The random streams of one training run with seed ``seed``."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def seed_of(self, stream: Stream, iteration: int, index: int, *extra: int) -> int:
        return mix(self.seed, iteration, index, int(stream), *extra)

    def generator(self, stream: Stream, iteration: int, index: int, *extra: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_of(stream, iteration, index, *extra))

    def initial_noise(self, iteration: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """z_1 of sample (or group) ``index``."""
        return torch.randn(shape, generator=self.generator(Stream.INITIAL_NOISE, iteration, index))

    def sde_noise(self, iteration: int, index: int, num_steps: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The (T, *latent) SDE noise of sample ``index``."""
        return torch.randn((num_steps, *shape), generator=self.generator(Stream.SDE_NOISE, iteration, index))


def prompt_seed(seed: int, prompt_index: int, sample: int = 0) -> int:
    """Seed of the samples of prompt ``prompt_index`` in ``solace score / rerank / analyze`` (probes: + 1)."""
    return seed * 1_000_003 + prompt_index * 1009 + sample
