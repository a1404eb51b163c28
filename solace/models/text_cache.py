"""Prompt embeddings computed once: a bounded in-memory LRU, a safetensors store on disk, and where the
text encoders of an SD3 / FLUX pipeline live (on the compute device, offloaded to the CPU, or freed).

* :class:`ConditioningLRU`: the trainer's per-prompt cache in memory, at most ``max_items`` prompts, the
  least recently used evicted first, kept in CPU memory (the trainer moves each batch to its device).
* :class:`EmbeddingStore`: one safetensors file per prompt under ``<folder>/<identity key>/``. The key is a
  hash of everything the embedding depends on (:func:`text_identity`: model family, ``max_sequence_length``,
  each text encoder's class, config and a sample of its weights, each tokenizer's vocabulary), the file name
  a hash of the prompt. Files are read with ``safetensors`` only (nothing is unpickled) and checked: a file
  that is not a complete safetensors file, or holds another prompt or identity, is *corrupt*.
* :class:`TextEncoders`: an adapter's text encoders and the store in front of them. With a store, every
  prompt is encoded alone (as the trainer always did) and read back bit for bit; a corrupt file is
  recomputed and rewritten (with a warning) while the encoders exist, and is a ``ConfigError`` naming the
  file once they were freed. Offloaded to the CPU, the encoders come back to the compute device for the
  prompts the caches miss; freed, a miss is a ``ConfigError`` naming the prompt.

An embedding read from disk is the one encoded where it was first computed (a GPU's kernels may round
differently from a CPU's); the device is not part of the key.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from solace.errors import ConfigError, SolaceError, check
from solace.models.base import Conditioning
from solace.utils.files import safetensors_problem, write_text_atomic

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")
FORMAT = "solace-prompt-embedding/1"
_WEIGHT_SAMPLES = 16  # values read from every parameter tensor for a text encoder's fingerprint

Encode = Callable[[list[str]], Conditioning]


class CorruptEmbeddingError(SolaceError):
    """A cache file that cannot be used (unreadable, not safetensors, another prompt or identity)."""


def digest(text: str) -> str:
    """sha256 hex digest of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------ in memory


class ConditioningLRU:
    """Per-prompt conditioning in memory: at most ``max_items`` prompts, least recently used evicted first.

    ``lru(prompts, encode)`` returns one row per prompt, on ``device``; a miss calls ``encode([prompt])``
    (one prompt a call, so a row never depends on which other prompts missed with it) and keeps the row on
    ``device``. The CPU by default: 4096 SD3.5 prompts are about 11 GB (README), which belongs in host
    memory, not beside the model on the GPU; the caller moves each batch to the compute device."""

    def __init__(self, max_items: int, device: torch.device | str = "cpu") -> None:
        check(
            isinstance(max_items, int) and max_items >= 1,
            "model.embedding_lru_size",
            f"must be >= 1, got {max_items!r}",
        )
        self.max_items = max_items
        self.device = torch.device(device)
        self._rows: OrderedDict[str, Conditioning] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def get(self, prompt: str, encode: Encode) -> Conditioning:
        """One prompt's row, encoded on a miss (and the oldest row evicted when full)."""
        if prompt in self._rows:
            self._rows.move_to_end(prompt)
            return self._rows[prompt]
        row = encode([prompt]).to(self.device)
        self._rows[prompt] = row
        if len(self._rows) > self.max_items:
            self._rows.popitem(last=False)
        return row

    def __call__(self, prompts: Sequence[str], encode: Encode) -> Conditioning:
        rows = [self.get(p, encode) for p in prompts]  # every row first: one may evict another's
        return Conditioning.cat(rows)


# ------------------------------------------------------------------ identity


def module_fingerprint(module: nn.Module | None) -> str | None:
    """sha256 of a text encoder's class, config (paths and library versions left out) and of
    ``_WEIGHT_SAMPLES`` evenly strided values of every parameter (their dtype included); None for None."""
    if module is None:
        return None
    h = hashlib.sha256(type(module).__name__.encode())
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        skip = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}
        d = {k: v for k, v in cfg.to_dict().items() if k not in skip}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    samples = []
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _WEIGHT_SAMPLES)
        samples.append(flat[::step][:_WEIGHT_SAMPLES].float())
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's class, ``model_max_length`` and vocabulary; None for None."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([type(tokenizer).__name__, int(tokenizer.model_max_length), vocab])
    return digest(text)


def text_identity(pipeline: Any, family: str, max_sequence_length: int) -> dict[str, Any]:
    """Everything an SD3 / FLUX prompt embedding depends on (the disk cache's key is its hash)."""
    return {
        "format": FORMAT,
        "family": family,
        "max_sequence_length": int(max_sequence_length),
        "encoders": {n: module_fingerprint(getattr(pipeline, n, None)) for n in TEXT_ENCODER_NAMES},
        "tokenizers": {n: tokenizer_fingerprint(getattr(pipeline, n, None)) for n in TOKENIZER_NAMES},
    }


# ------------------------------------------------------------------ on disk


class EmbeddingStore:
    """One safetensors file per prompt: ``<directory>/<key>/<d[:2]>/<d>.safetensors`` with ``key`` the first
    16 hex digits of the identity's hash and ``d`` the prompt's sha256. Each file holds the prompt's row
    (``tensors.<name>``, batch dimension 1) and the shared tensors (``shared.<name>``); its metadata names
    the format, the identity key and the prompt; ``identity.json`` beside them says what the key stands
    for."""

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        directory = Path(directory)
        check(not directory.is_file(), "model.embedding_cache", f"{directory} is a file; name a folder")
        self.identity = identity
        self.key = digest(json.dumps(identity, sort_keys=True))[:16]
        self.root = directory / self.key

    def path(self, prompt: str) -> Path:
        d = digest(prompt)
        return self.root / d[:2] / f"{d}.safetensors"

    def load(self, prompt: str) -> Conditioning | None:
        """The stored row of ``prompt`` (CPU tensors), None when there is none; CorruptEmbeddingError when the
        file cannot be used. Only ``safetensors`` reads it: nothing is unpickled."""
        path = self.path(prompt)
        if not path.exists():
            return None
        problem = safetensors_problem(path)
        if problem:
            raise CorruptEmbeddingError(f"embedding cache file {path}: {problem}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptEmbeddingError(f"embedding cache file {path}: unreadable ({e})") from None
        expected = {"format": FORMAT, "identity": self.key, "prompt": prompt}
        wrong = [k for k, v in expected.items() if meta.get(k) != v]
        if wrong:
            raise CorruptEmbeddingError(f"embedding cache file {path}: its metadata {wrong} do not match")
        return _conditioning_from(tensors, path)

    def save(self, prompt: str, cond: Conditioning) -> Path:
        """Write one prompt's row atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        check(len(cond) == 1, "prompts", "the embedding cache stores one prompt's row at a time")
        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.root / "identity.json").exists():
            write_text_atomic(self.root / "identity.json", json.dumps(self.identity, indent=1))
        tensors = {f"tensors.{k}": v for k, v in cond.tensors.items()}
        tensors.update({f"shared.{k}": v for k, v in cond.shared.items()})
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "identity": self.key, "prompt": prompt})
        os.replace(tmp, path)
        return path


def _conditioning_from(tensors: dict[str, torch.Tensor], path: Path) -> Conditioning:
    """``tensors.*`` / ``shared.*`` entries back into a one-row Conditioning (else corrupt)."""
    rows = {k.removeprefix("tensors."): v for k, v in tensors.items() if k.startswith("tensors.")}
    shared = {k.removeprefix("shared."): v for k, v in tensors.items() if k.startswith("shared.")}
    if not rows or len(rows) + len(shared) != len(tensors) or any(v.shape[:1] != (1,) for v in rows.values()):
        raise CorruptEmbeddingError(f"embedding cache file {path}: not one prompt's row of embeddings")
    return Conditioning(rows, shared)


# ------------------------------------------------------------------ the encoders


Placement = Literal["device", "cpu", "freed"]


class TextEncoders:
    """A pipeline's text encoders, where they live, and the disk store in front of them.

    Args:
        pipeline: the diffusers pipeline whose ``text_encoder*`` attributes are managed.
        identity: called once, while the encoders exist, for the store's key (:func:`text_identity`).
        device: called for the compute device the encoders must be on to encode.
    """

    def __init__(
        self, pipeline: Any, identity: Callable[[], dict[str, Any]], device: Callable[[], torch.device]
    ) -> None:
        self.pipeline = pipeline
        self._identity = identity
        self._device = device
        self.placement: Placement = "device"
        self.store: EmbeddingStore | None = None
        self._depth = 0  # nesting of on_device()

    def modules(self) -> dict[str, nn.Module]:
        """The pipeline's text encoders that exist."""
        return {n: m for n in TEXT_ENCODER_NAMES if (m := getattr(self.pipeline, n, None)) is not None}

    def use_store(self, directory: str | Path) -> EmbeddingStore:
        """Read and write prompt embeddings under ``directory`` (keyed by this pipeline's identity)."""
        check(self.placement != "freed", "model.embedding_cache", "set it before the text encoders are freed")
        self.store = EmbeddingStore(directory, self._identity())
        return self.store

    def offload(self, mode: Literal["cpu", "free"]) -> None:
        """Move the text encoders to the CPU (``cpu``), or drop them from pipeline and memory (``free``)."""
        check(mode in ("cpu", "free"), "model.offload_text_encoders", f"use off, cpu or free, not {mode!r}")
        if mode == "cpu":
            for m in self.modules().values():
                m.to("cpu")
            self.placement = "cpu"
        else:
            for n in self.modules():
                setattr(self.pipeline, n, None)
            self.placement = "freed"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def on_device(self, missing: Sequence[str] = ()) -> Iterator[None]:
        """The encoders on the compute device for the block (offloaded ones brought in once, however deeply
        nested, and sent back after); freed ones: a ConfigError naming the ``missing`` prompts."""
        if self.placement == "freed":
            raise ConfigError(
                "model.offload_text_encoders",
                f"the text encoders were freed (free) and the prompt(s) {list(missing)[:3]} are not in the "
                f"embedding cache {self.store.root if self.store else '(none)'}; precompute them "
                "(`solace embed --prompts FILE`) or use model.offload_text_encoders=cpu",
            )
        move = self.placement == "cpu" and self._depth == 0
        if move:
            for m in self.modules().values():
                m.to(self._device())
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if move:
                for m in self.modules().values():
                    m.to("cpu")

    def encode(self, prompts: list[str], raw: Encode) -> Conditioning:
        """``raw(prompts)`` (the pipeline's own encoding) behind the store and the encoders' placement; with
        neither in play exactly ``raw(prompts)``."""
        if self.store is None:
            if self.placement == "device":
                return raw(prompts)
            with self.on_device(prompts):
                return raw(prompts)
        unique = _unique(prompts)
        todo = [p for p in unique if not self.store.path(p).exists()]
        with self.on_device(todo) if todo else contextlib.nullcontext():  # brought in once for the misses
            rows = {p: self._cached(p, raw) for p in unique}
        return Conditioning.cat([rows[p] for p in prompts])

    def _cached(self, prompt: str, raw: Encode) -> Conditioning:
        """One prompt's row from the store, or encoded alone and stored; a corrupt file is recomputed and
        rewritten while the encoders exist (a warning says so), a ConfigError once they were freed."""
        assert self.store is not None
        try:
            row = self.store.load(prompt)
        except CorruptEmbeddingError as e:
            if self.placement == "freed":
                raise ConfigError(
                    "model.embedding_cache",
                    f"{e}; the text encoders were freed, so it cannot be recomputed: delete the file and run "
                    "`solace embed` again (or use model.offload_text_encoders=cpu)",
                ) from None
            warnings.warn(f"{e}: recomputed and rewritten", stacklevel=3)
            row = None
        if row is not None:
            return row.to(self._device())
        with self.on_device([prompt]):
            row = raw([prompt])
        self.store.save(prompt, row)
        return row


def precompute(text: TextEncoders, encode: Encode, prompts: Sequence[str]) -> dict[str, int]:
    """Encode every prompt into ``text``'s store (the encoders brought to the device once); counts of the
    prompts computed now and of those already stored. Nothing is kept in memory."""
    check(text.store is not None, "model.embedding_cache", "set a folder to precompute embeddings into")
    assert text.store is not None
    unique = _unique(prompts)
    counts = {"prompts": len(unique), "computed": 0, "cached": 0}
    todo = [p for p in unique if not text.store.path(p).exists()]
    counts["cached"] = len(unique) - len(todo)
    with text.on_device(todo) if todo else contextlib.nullcontext():
        for p in unique:  # stored ones are read back too: a corrupt file is recomputed now, not mid-run
            encode([p])
    counts["computed"] = len(todo)
    return counts
