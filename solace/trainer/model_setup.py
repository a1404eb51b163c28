"""The run's model and its prompt embeddings (memory switches of ``model.*``).

* :func:`load_model`: the adapter ``model.*`` describes, with the SD3/FLUX settings (dtype, height / width,
  T5, guidance, gradient checkpointing, embedding cache on disk, VAE slicing / tiling).
* :func:`merge_init`: ``model.lora.init_from`` folded into that model under ``model.lora.merge_init``: the
  base a run's fresh LoRA trains on, is held to by the KL and is evaluated against.
* :func:`run_prompts`: every prompt a run encodes: the empty prompt, the training prompts, what the reward
  components encode for them (the ``edits`` variant's minimal edits), the image-grid prompts.
* :func:`offload_text_encoders`: ``model.offload_text_encoders``: those prompts encoded once (into the disk
  cache, or into the in-memory LRU without one), then the text encoders moved to the CPU or freed.
* :func:`embed_prompts`: ``solace embed``, the same prompts written to the disk cache ahead of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from solace.errors import ConfigError, check
from solace.models import load_adapter
from solace.models.base import Conditioning
from solace.models.lora import load_lora
from solace.models.text_cache import precompute
from solace.prompts import Prompt, PromptSource, evaluation_prompts, is_prompt_set
from solace.rewards.mixture import component_prompts

if TYPE_CHECKING:
    from solace.trainer.config import ModelCfg, SolaceConfig

MorePrompts = Callable[[Sequence[Prompt]], list[str]]


def load_model(m: ModelCfg, device: torch.device | str) -> Any:
    """The adapter of ``model.name`` on ``device``, loaded by its family (``model.family``), which takes the
    ``model.*`` settings it reads (dtype, height / width, T5, guidance, gradient checkpointing, embedding
    cache on disk, VAE slicing / tiling)."""
    settings = dict(
        dtype=m.dtype,
        height=m.height or None,  # 0: the adapter's own size
        width=m.width or None,
        max_sequence_length=m.max_sequence_length,
        gradient_checkpointing=m.gradient_checkpointing,
        embedding_cache=m.embedding_cache or None,
        vae_slicing=m.vae_slicing,
        vae_tiling=m.vae_tiling,
        guidance_scale=m.guidance_scale,
        text_encoder_3=m.text_encoder_3,
    )
    return load_adapter(m.name, m.family, device=device, **settings)


def merge_init(m: ModelCfg, denoiser: torch.nn.Module) -> bool:
    """Under ``model.lora.merge_init``, fold the LoRA of ``model.lora.init_from`` into ``denoiser``'s weights
    (its ``model.lora.alpha`` for a file without metadata), so that the loaded model is the one the run
    starts from: the base of its fresh LoRA, of its KL term and of every evaluation of it. True when it
    did."""
    if not (m.lora.init_from and m.lora.merge_init):
        return False
    load_lora(denoiser, m.lora.init_from, merge=True, alpha=m.lora.alpha)
    return True


def run_prompts(cfg: SolaceConfig, source: PromptSource, more: MorePrompts) -> list[str]:
    """The prompts a run encodes, each once, in a fixed order: the empty and the negative prompt (CFG),
    every training prompt, ``eval.image_prompts``, the evaluation prompts of an ``eval.prompts`` file
    and what the reward components encode for the training prompts (``more``: the ``edits`` variant's
    edits)."""
    if source.items is None:
        raise ConfigError(
            "data.train_prompts",
            f"{source.spec!r} is a generated distribution; precomputed embeddings need a prompt file",
        )
    items = source.all()
    texts = [
        "",
        cfg.sampling.negative_prompt,
        *(p.text for p in items),
        *cfg.eval.image_prompts,
        *_eval_prompt_texts(cfg),
        *more(items),
    ]
    return list(dict.fromkeys(texts))


def _eval_prompt_texts(cfg: SolaceConfig) -> list[str]:
    """The prompts of ``eval.prompts`` when it is a file (a registered prompt set's are not
    precomputed)."""
    e = cfg.eval
    if is_prompt_set(e.prompts):
        return []
    return [p.text for p in evaluation_prompts(e.prompts, e.prompts_limit)]


def offload_text_encoders(
    m: ModelCfg,
    adapter: Any,
    acc: Any,
    prompts: Callable[[], list[str]],
    encode: Callable[[list[str]], Conditioning],
) -> None:
    """``model.offload_text_encoders`` (cpu | free): encode the run's ``prompts()`` (:func:`run_prompts`)
    once, the first process first (it writes the disk cache, the others read it), then move the encoders
    off the compute device.

    With a disk cache every prompt lands on disk (nothing kept in memory); without one (``cpu`` only) the
    first ``model.embedding_lru_size`` prompts go through ``encode`` (filling the trainer's LRU) and later
    misses bring the encoders back to the device for their encoding."""
    if m.offload_text_encoders == "off":
        return
    text = adapter.text
    texts = prompts()
    with acc.main_process_first():
        if text.store is not None:
            precompute(text, adapter.encode_prompts, texts)
        else:
            with text.on_device():
                for p in texts[: m.embedding_lru_size]:
                    encode([p])
    adapter.offload_text_encoders(m.offload_text_encoders)


def embed_prompts(cfg: SolaceConfig, prompts: str | None, device: str) -> dict[str, Any]:
    """``solace embed``: the embeddings of :func:`run_prompts` of ``prompts`` (default
    ``data.train_prompts``) into ``model.embedding_cache``; what was computed and what was already there."""
    check(
        bool(cfg.model.embedding_cache),
        "model.embedding_cache",
        "name the folder to write the embeddings to, e.g. model.embedding_cache=cache/embeddings",
    )
    field = "--prompts" if prompts else "data.train_prompts"
    source = PromptSource(prompts or cfg.data.train_prompts, cfg.train.seed, field)
    texts = run_prompts(cfg, source, lambda items: component_prompts(cfg, items))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_model(cfg.model, device)
    counts = precompute(adapter.text, adapter.encode_prompts, texts)
    return {"cache": str(adapter.text.store.root), **counts}
