"""LoRA on a flow model's denoiser with PEFT: add, read, save (diffusers format + metadata), load, merge.

Files are always safetensors (never pickle). :func:`save_lora` writes diffusers' LoRA format: keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` plus the adapter's ``LoraConfig`` as JSON under
the ``lora_adapter_metadata`` header key. ``pipe.load_lora_weights(folder)`` therefore restores the exact
``lora_alpha`` (without metadata diffusers assumes ``alpha = rank``, which silently rescales a LoRA trained
with ``alpha != rank``).

:func:`load_lora` / ``add_lora(init_from=...)`` read that format, PEFT's ``save_pretrained`` format
(``adapter_model.safetensors`` + ``adapter_config.json``, keys ``base_model.model.<module>...``: what
Flow-GRPO's checkpoints contain) and bare PEFT state dicts. This is the "SOLACE on top of Flow-GRPO"
setting, in one of two ways:

* continue training the Flow-GRPO LoRA (``load_lora(denoiser, path)``): the KL reference
  (:func:`~solace.models.base.adapters_disabled`) is then the base model;
* ``load_lora(denoiser, path, merge=True)`` folds it into the base weights and removes it; a fresh LoRA
  added afterwards trains on top, and the KL reference becomes the Flow-GRPO model.

LoRA parameters are kept in ``lora_dtype`` (float32 by default, as diffusers' training scripts do with
``cast_training_params``) while the base model stays in bf16; PEFT casts activations to the LoRA weights'
dtype and the result back.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from solace.errors import ConfigError, check
from solace.utils.files import safetensors_problem

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PREFIX = "transformer"
FSDP_PREFIX = "_fsdp_wrapped_module."  # what torch's FSDP (version 1) adds to a wrapped block's names

__all__ = [
    "add_lora",
    "load_lora",
    "lora_parameters",
    "lora_state_dict",
    "lora_config",
    "lora_header",
    "merge_lora",
    "read_lora",
    "save_lora",
    "set_lora_state_dict",
]


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP/FSDP-style ``.module`` wrappers."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def _denoiser_of(obj: Any) -> nn.Module:
    den = getattr(obj, "denoiser", obj)
    check(
        isinstance(den, nn.Module),
        "denoiser",
        f"expected an nn.Module or an adapter, got {type(obj).__name__}",
    )
    return _unwrap(den)


def _is_diffusers_peft_model(module: nn.Module) -> bool:
    try:
        from diffusers.loaders.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - diffusers is a hard dependency
        return False
    return isinstance(module, PeftAdapterMixin)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, set | frozenset):
        return sorted(_jsonable(v) for v in x)
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return x.value
    return x


def _lora_config_from_dict(meta: dict[str, Any]) -> Any:
    """``LoraConfig(**meta)`` keeping only the fields this PEFT version knows (newer files may carry more)."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(meta) - known)
    if unknown:
        warnings.warn(f"ignoring LoRA metadata fields unknown to this peft version: {unknown}", stacklevel=3)
    kwargs = {k: v for k, v in meta.items() if k in known and k not in ("peft_type", "runtime_config")}
    return LoraConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- adding


def _inject(denoiser: nn.Module, config: Any, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    existing = getattr(denoiser, "peft_config", None) or {}
    check(
        adapter_name not in existing,
        "adapter_name",
        f"an adapter named {adapter_name!r} already exists on {type(denoiser).__name__}; pick another name",
    )
    try:
        if _is_diffusers_peft_model(denoiser):
            denoiser.add_adapter(config, adapter_name)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, denoiser, adapter_name)
    except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found" in str(e) or "Target modules" in str(e):
            raise ConfigError(
                "target_modules",
                f"{sorted(config.target_modules)} match no module of {type(denoiser).__name__}: {e}",
            ) from e
        raise
    configs = dict(existing)
    configs.update(getattr(denoiser, "peft_config", {}) or {})
    configs[adapter_name] = config
    denoiser.peft_config = configs


def _adapter_params(denoiser: nn.Module, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
    tag = f".{adapter_name}."
    return [(n, p) for n, p in denoiser.named_parameters() if "lora_" in n and tag in n]


def lora_parameters(denoiser: nn.Module | Any, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (what the optimizer trains)."""
    return [p for _, p in _adapter_params(_denoiser_of(denoiser), adapter_name)]


def _finalize(
    denoiser: nn.Module, adapter_name: str, lora_dtype: torch.dtype | None, trainable: bool
) -> None:
    params = _adapter_params(denoiser, adapter_name)
    check(len(params) > 0, "target_modules", f"adapter {adapter_name!r} got no LoRA parameters")
    for _, p in params:
        if lora_dtype is not None and p.dtype != lora_dtype:
            p.data = p.data.to(lora_dtype)
        p.requires_grad_(trainable)


def add_lora(
    denoiser: nn.Module | Any,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    init_from: str | Path | None = None,
    adapter_name: str = "default",
    init_lora_weights: bool | str = "gaussian",
    dropout: float = 0.0,
    lora_dtype: torch.dtype | None = torch.float32,
    trainable: bool = True,
) -> Any:
    """Attach a PEFT LoRA (``scaling = alpha / rank``) to ``denoiser`` (or ``adapter.denoiser``).

    ``lora_B`` starts at zero, so a fresh LoRA is an exact no-op. With ``init_from`` (a file or folder
    readable by :func:`read_lora`), its weights are loaded into the new adapter; the file's rank must equal
    ``rank`` and, when it carries metadata, its ``lora_alpha`` must equal ``alpha`` (else ``ConfigError``).

    Returns the ``peft.LoraConfig`` used. Base weights are left frozen; the LoRA is trainable.
    """
    from peft import LoraConfig

    den = _denoiser_of(denoiser)
    check(isinstance(rank, int) and rank >= 1, "rank", f"must be an integer >= 1, got {rank!r}")
    check(alpha > 0, "alpha", f"must be > 0, got {alpha}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    check(len(targets) > 0, "target_modules", "must name at least one module")
    state = None
    if init_from is not None:
        state, meta = read_lora(init_from)
        ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
        check(ranks == {rank}, "rank", f"{init_from} holds LoRA rank(s) {sorted(ranks)}, but rank={rank}")
        if meta is None:
            warnings.warn(
                f"{init_from} has no LoRA metadata; assuming its alpha equals the given alpha={alpha}",
                stacklevel=2,
            )
        elif float(meta.get("lora_alpha", alpha)) != float(alpha):
            raise ConfigError(
                "alpha",
                f"{init_from} was trained with lora_alpha={meta.get('lora_alpha')}, "
                f"not {alpha}; pass alpha={meta.get('lora_alpha')} or use load_lora()",
            )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=init_lora_weights,
        lora_dropout=dropout,
    )
    _inject(den, config, adapter_name)
    if state is not None:
        _load_weights(den, state, adapter_name, str(init_from))
    _finalize(den, adapter_name, lora_dtype, trainable)
    return config


# --------------------------------------------------------------------------------------------- reading


def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if not found and pickles:
            raise ConfigError(
                "lora_path",
                f"{path} holds only pickle files {pickles}; solace loads safetensors "
                "only (convert them with safetensors.torch.save_file)",
            )
        raise ConfigError(
            "lora_path",
            f"{path} holds {len(found)} .safetensors files; expected exactly one "
            f"(or {LORA_WEIGHT_NAME} / {PEFT_WEIGHT_NAME})",
        )
    if not path.is_file():
        raise ConfigError("lora_path", f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise ConfigError("lora_path", f"{path} is not a .safetensors file; solace never unpickles weights")
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a LoRA file or folder (safetensors only) into PEFT keys and its ``LoraConfig`` dict, if any.

    Returns ``(state_dict, metadata)``: keys like ``transformer_blocks.0.attn.to_q.lora_A.weight`` (no
    adapter name, no ``transformer.``/``base_model.model.`` prefix), and the adapter config as a dict from
    the diffusers header metadata or a PEFT ``adapter_config.json`` (``None`` when the file has neither).
    Keys of other pipeline components (``text_encoder.*``) are ignored with a warning.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = _resolve_file(Path(path))
    problem = safetensors_problem(file)
    if problem:
        raise ConfigError(
            "lora", f"{file}: {problem}; pass a LoRA saved by solace or diffusers (.safetensors)"
        )
    raw = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    meta: dict[str, Any] | None = None
    if header.get(METADATA_KEY):
        packed = json.loads(header[METADATA_KEY])
        meta = {k[len(PREFIX) + 1 :]: v for k, v in packed.items() if k.startswith(PREFIX + ".")} or None
    elif (file.parent / PEFT_CONFIG_NAME).is_file():
        meta = json.loads((file.parent / PEFT_CONFIG_NAME).read_text())
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        k = key
        for pre in ("base_model.model.", PREFIX + "."):
            if k.startswith(pre):
                k = k[len(pre) :]
                break
        else:
            if k.split(".", 1)[0] in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet"):
                ignored.append(key)
                continue
        if ".lora_A." not in k and ".lora_B." not in k:
            raise ConfigError(
                "lora_path",
                f"{file}: key {key!r} is not a PEFT/diffusers LoRA weight "
                "(kohya-style or DoRA files are not supported; convert with diffusers first)",
            )
        state[k] = value
    if ignored:
        warnings.warn(
            f"{file}: ignoring {len(ignored)} non-transformer LoRA weights (e.g. {ignored[0]})", stacklevel=2
        )
    check(len(state) > 0, "lora_path", f"{file} holds no transformer LoRA weights")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    check(
        not bad,
        "lora",
        f"{file} holds non-finite weights ({len(bad)} tensors, e.g. {bad[:1]}): it would draw black or noise "
        "images; use an earlier checkpoint of its run",
    )
    return state, meta


def _config_for(
    state: dict[str, torch.Tensor], meta: dict[str, Any] | None, source: str, alpha: float | None = None
) -> Any:
    """The file's ``LoraConfig``; a file without metadata needs its ``alpha`` given (assuming alpha = rank,
    as diffusers does, silently rescales a LoRA trained with another alpha)."""
    from peft import LoraConfig

    if meta is not None:
        return _lora_config_from_dict(meta)
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    check(len(ranks) == 1, "lora_path", f"{source} mixes ranks {sorted(ranks)} and has no metadata")
    rank = ranks.pop()
    check(
        alpha is not None,
        "lora",
        f"{source} carries no LoRA metadata (rank {rank}, alpha unknown; assuming alpha = rank could rescale "
        "it silently): give its alpha (--lora-alpha) or re-save it with its metadata",
    )
    targets = sorted({k.split(".lora_")[0] for k in state})
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)


def _load_weights(
    denoiser: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, source: str
) -> None:
    from peft import set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
        except RuntimeError as e:  # shapes that do not fit: a LoRA of another base model
            first = str(e).strip().splitlines()[-1].strip()[:200]
            raise ConfigError(
                "lora", f"{source} does not fit this model ({first}); was it trained on another base model?"
            ) from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ConfigError(
            "target_modules",
            f"{source} has LoRA weights for modules the adapter does not target "
            f"(e.g. {unexpected[:3]}); use the file's target_modules or load_lora()",
        )
    tag = f".{adapter_name}."
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and tag in k]
    if missing:
        warnings.warn(
            f"{source} has no weights for {len(missing)} LoRA tensors (e.g. {missing[0]}); "
            "they keep their initialisation",
            stacklevel=3,
        )


def load_lora(
    denoiser: nn.Module | Any,
    path: str | Path,
    adapter_name: str = "default",
    trainable: bool = True,
    merge: bool = False,
    lora_dtype: torch.dtype | None = torch.float32,
    alpha: float | None = None,
) -> Any:
    """Attach an existing LoRA (e.g. a Flow-GRPO checkpoint) with the rank/alpha/targets it was saved with.

    ``merge=True`` folds it into the base weights and removes the LoRA layers (see the module docstring).
    Returns the ``peft.LoraConfig`` read from the file; a file without metadata needs ``alpha`` (its rank and
    targets are read from the weights), else a ``ConfigError``.
    """
    den = _denoiser_of(denoiser)
    state, meta = read_lora(path)
    config = _config_for(state, meta, str(path), alpha)
    _inject(den, config, adapter_name)
    _load_weights(den, state, adapter_name, str(path))
    _finalize(den, adapter_name, lora_dtype if not merge else None, trainable and not merge)
    if merge:
        merge_lora(den, adapter_name)
    return config


def merge_lora(denoiser: nn.Module | Any, adapter_name: str = "default") -> None:
    """Fold one LoRA into the base weights (``W += scaling * B A``) and remove its layers entirely, so that
    :func:`~solace.models.base.adapters_disabled` no longer switches it off. The layers must carry only this
    adapter."""
    from peft.tuners.lora import LoraLayer

    den = _denoiser_of(denoiser)
    replaced = 0
    for name, module in list(den.named_modules()):
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        check(
            set(module.lora_A.keys()) == {adapter_name},
            "adapter_name",
            f"{name} carries adapters {sorted(module.lora_A.keys())}; merge before adding others",
        )
        base = module.get_base_layer()
        with torch.no_grad():
            delta = module.get_delta_weight(adapter_name)
            base.weight.data += delta.to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = den.get_submodule(parent_name) if parent_name else den
        setattr(parent, child, base)
        replaced += 1
    check(replaced > 0, "adapter_name", f"no LoRA layer carries adapter {adapter_name!r}")
    configs = dict(getattr(den, "peft_config", {}) or {})
    configs.pop(adapter_name, None)
    if configs:
        den.peft_config = configs
    else:
        if hasattr(den, "peft_config"):
            del den.peft_config
        if hasattr(den, "_hf_peft_config_loaded"):
            den._hf_peft_config_loaded = False


# --------------------------------------------------------------------------------------------- saving


def lora_config(denoiser: nn.Module | Any, adapter_name: str = "default") -> Any:
    """The ``peft.LoraConfig`` of one adapter."""
    den = _denoiser_of(denoiser)
    configs = getattr(den, "peft_config", None) or {}
    check(
        adapter_name in configs,
        "adapter_name",
        f"{type(den).__name__} has no LoRA adapter {adapter_name!r} (has {sorted(configs)})",
    )
    return configs[adapter_name]


def _fsdp_named_state(den: nn.Module) -> dict[str, torch.Tensor] | None:
    """The parameters of a denoiser whose blocks FSDP wrapped (their names as ``named_modules`` gives them,
    which PEFT matches its layers by), sharing storage; None when nothing in it is FSDP-wrapped."""
    named = dict(den.named_parameters())
    if not any(FSDP_PREFIX in n for n in named):
        return None
    lora = [p for n, p in named.items() if "lora_" in n and n.endswith("weight")]
    if any(p.ndim < 2 for p in lora):
        raise ConfigError(
            "LoRA",
            "the LoRA weights are FSDP shards here; gather them first "
            "(solace.trainer.fsdp.ShardedParams.summoned(), on every process)",
        )
    return {n: p.detach() for n, p in named.items()}


def lora_state_dict(denoiser: nn.Module | Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's LoRA weights with PEFT keys (``<module>.lora_A.weight``), detached. Inside FSDP (blocks
    wrapped, use_orig_params) the same keys, from the gathered weights (an error on shards)."""
    from peft import get_peft_model_state_dict

    den = _denoiser_of(denoiser)
    lora_config(den, adapter_name)
    sd = get_peft_model_state_dict(den, state_dict=_fsdp_named_state(den), adapter_name=adapter_name)
    return {k.replace(FSDP_PREFIX, ""): v.detach() for k, v in sd.items()}


@torch.no_grad()
def set_lora_state_dict(
    denoiser: nn.Module | Any, state: dict[str, torch.Tensor], adapter_name: str = "default"
) -> list[str]:
    """Load LoRA weights keyed as :func:`lora_state_dict` writes them into ``denoiser`` in place; returns
    the keys that fit no LoRA weight. Inside FSDP: call it on the gathered weights (with writeback)."""
    from peft import set_peft_model_state_dict

    den = _denoiser_of(denoiser)
    if _fsdp_named_state(den) is None:
        return list(getattr(set_peft_model_state_dict(den, state, adapter_name), "unexpected_keys", []))
    target = lora_state_dict(den, adapter_name)  # views of the (gathered) weights
    for k in state.keys() & target.keys():
        target[k].copy_(state[k])
    now = lora_state_dict(den, adapter_name)
    check(all(torch.equal(now[k], state[k].to(now[k])) for k in state.keys() & now.keys()), "LoRA",
          "did not load into the FSDP-wrapped denoiser; gather with writeback first")  # fmt: skip
    return sorted(state.keys() - target.keys())


def _header(meta: dict[str, Any]) -> dict[str, str]:
    packed = {f"{PREFIX}.{k}": v for k, v in meta.items()}
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def lora_header(denoiser: nn.Module | Any, adapter_name: str = "default") -> dict[str, str]:
    """The safetensors header that carries an adapter's ``LoraConfig`` as diffusers writes it, so that every
    LoRA file the project writes (exports and checkpoints) loads with its own rank and alpha."""
    return _header(_jsonable(lora_config(_denoiser_of(denoiser), adapter_name).to_dict()))


def _write_diffusers_lora(
    folder: Path, weight_name: str, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {f"{PREFIX}.{k}": v for k, v in state.items()}
    save_file(state, str(folder / weight_name), metadata=_header(meta))


def save_lora(
    adapter_or_denoiser: Any,
    path: str | Path,
    pipeline_class: type | None = None,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: torch.dtype | None = None,
) -> Path:
    """Export one adapter in diffusers' LoRA format, with its ``LoraConfig`` as metadata, to folder ``path``.

    ``pipeline_class`` (e.g. ``StableDiffusion3Pipeline``) does the writing through its
    ``save_lora_weights(..., transformer_lora_adapter_metadata=...)``; by default it is the class of
    ``adapter.pipeline``. Without one (a bare denoiser) the same format is written directly. ``dtype`` casts
    the weights (default: as trained). Returns the written file.
    """
    den = _denoiser_of(adapter_or_denoiser)
    meta = _jsonable(lora_config(den, adapter_name).to_dict())
    state = {
        k: (v.to(dtype) if dtype is not None else v).contiguous().cpu()
        for k, v in lora_state_dict(den, adapter_name).items()
    }
    if pipeline_class is None and getattr(adapter_or_denoiser, "pipeline", None) is not None:
        pipeline_class = type(adapter_or_denoiser.pipeline)
    folder = Path(path)
    check(not folder.is_file(), "path", f"{folder} is a file; save_lora writes a folder")
    saver = getattr(pipeline_class, "save_lora_weights", None) if pipeline_class is not None else None
    if saver is not None and "transformer_lora_adapter_metadata" in inspect.signature(saver).parameters:
        saver(
            save_directory=str(folder),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=meta,
            weight_name=weight_name,
            safe_serialization=True,
        )
    else:
        _write_diffusers_lora(folder, weight_name, state, meta)
    return folder / weight_name
