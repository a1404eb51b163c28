"""The toy world's model adapter: :class:`~solace.toy.net.ToyFlowNet` behind the FlowModelAdapter interface.

Latents are pixels: ``z = 2 x - 1`` for an RGB image ``x`` in [0, 1] (shape 3x32x32); ``decode`` is the
inverse, clamped. The shipped base weights live in ``solace/toy/assets/toy_base.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from solace.errors import ConfigError
from solace.models.base import AdapterBase, Conditioning, SizeRule
from solace.sampling.schedule import flow_match_sigmas
from solace.toy.evaluate import batch_statistics, default_image_prompts
from solace.toy.net import MAX_TOKENS, ToyFlowNet
from solace.toy.world import vocabulary
from solace.utils.files import safetensors_problem

TOY_SHIFT = 3.0
BASE_WEIGHTS = "toy_base.safetensors"
TOY_SIDE = 32
"""The toy model draws TOY_SIDE x TOY_SIDE images, and no other size."""
TOY_SIZES = SizeRule(only=TOY_SIDE)
DEFAULT_NAMES = ("", "toy")
"""``model.name`` values that mean the shipped base weights (the embedded world's default)."""


class ToyTokenizer:
    """Whitespace word tokenizer over the toy vocabulary (lower-cased; unknown words map to ``<unk>``)."""

    def __init__(self) -> None:
        self.vocab = vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.lower().replace(",", " ").split()[:MAX_TOKENS]
            for j, w in enumerate(words):
                ids[i, j] = self.index.get(w, 1)
        return ids, ids != 0


def default_weights_path() -> Path:
    return Path(str(resources.files("solace.toy").joinpath("assets", BASE_WEIGHTS)))


def save_toy_weights(net: ToyFlowNet, path: str | Path, extra: dict[str, str] | None = None) -> None:
    """Safetensors with the architecture config in the metadata."""
    meta = {"config": json.dumps(net.config), **(extra or {})}
    sd = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(sd, str(path), metadata=meta)


def load_toy_net(path: str | Path | None = None) -> ToyFlowNet:
    path = Path(path) if path is not None else default_weights_path()
    if not path.exists():
        raise ConfigError(
            "model", f"toy weights not found at {path}; run `solace toy pretrain` or pass a path"
        )
    problem = safetensors_problem(path)
    if problem:
        raise ConfigError("model", f"{path}: {problem}; pass toy weights written by `solace toy pretrain`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta.get("config", "{}")) or {"vocab_size": len(vocabulary())}
    net = ToyFlowNet(cfg["vocab_size"], tuple(cfg.get("channels", (48, 96, 144))), cfg.get("cond_dim", 128))
    net.load_state_dict(load_file(str(path)))
    return net


class ToyAdapter(AdapterBase):
    """FlowModelAdapter over the toy U-Net (pixel latents, identity decode)."""

    name = "toy"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj"]

    def __init__(
        self,
        net: ToyFlowNet | None = None,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        shift: float = TOY_SHIFT,
    ):
        self.denoiser = (net if net is not None else load_toy_net(weights)).to(device)
        self.tokenizer = ToyTokenizer()
        self.shift = shift

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def latent_shape(self) -> tuple[int, ...]:
        return (3, TOY_SIDE, TOY_SIDE)

    @property
    def fsdp_ignored_modules(self) -> list[torch.nn.Module]:
        """What FSDP must leave whole: the text encoder, which :meth:`encode_prompts` calls outside the
        denoiser's forward (FSDP gathers a unit's weights only inside its forward)."""
        return [self._net().text]

    def _net(self) -> ToyFlowNet:
        m = self.denoiser
        while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
            m = m.module
        base = getattr(m, "base_model", None)
        return getattr(base, "model", m) if base is not None else m

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens, pooled = self._net().encode_text(ids, mask)
        return Conditioning({"text": tokens, "text_mask": mask, "pooled": pooled})

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = cond.tensors
        t = t.to(latents.device, torch.float32).expand(latents.shape[0])
        return (self.forward_module or self.denoiser)(latents, t, c["text"], c["text_mask"], c["pooled"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().to(self.device) * 2 - 1

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flow_match_sigmas(num_steps, self.shift)

    wants_batch_images = True

    def batch_statistics(self, images: torch.Tensor, metas: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Foreground, objects and (with GenEval metadata) strict correctness of a training batch."""
        return batch_statistics(images, metas)

    def image_prompts(self) -> list[str]:
        """One held-out prompt per category."""
        return default_image_prompts()


def base_weights_file(model: str) -> str:
    """The file whose content identifies the base ``model`` (a base-evaluation cache's key): the shipped
    weights for the default name, else the weights file ``model`` itself."""
    return str(default_weights_path()) if model in DEFAULT_NAMES else model


def is_toy_model(model: str, pipeline_class: str | None) -> bool:
    """``auto`` picks the toy family for the embedded default name (the shipped base) or a ``.safetensors``
    file (toy weights written by ``solace toy pretrain``)."""
    return pipeline_class is None and (model in DEFAULT_NAMES or model.endswith(".safetensors"))


def load_toy(
    model: str, device: str | torch.device = "cpu", shift: float = TOY_SHIFT, **settings: object
) -> ToyAdapter:
    """The toy family's loader: the shipped base for the default name, else the toy weights file ``model``;
    the settings of diffusers models (dtype, text encoders, memory switches) do not apply and are ignored
    (the size is checked by :data:`TOY_SIZES`)."""
    return ToyAdapter(weights=None if model in DEFAULT_NAMES else model, device=device, shift=shift)
