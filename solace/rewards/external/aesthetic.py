"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

    e = E_img / ||E_img||                                      (CLIP ViT-L/14 image embedding, 768-d)
    score = MLP(e),  MLP = Linear 768-1024, Dropout, 1024-128, Dropout, 128-64, Dropout, 64-16, 16-1

(no activations -- the published head is purely linear; dropout is inactive at inference). The head weights
are the published ``sac+logos+ava1-l14-linearMSE.pth`` from github.com/christophschuhmann/
improved-aesthetic-predictor (keys ``layers.{0,2,4,6,7}.{weight,bias}``), read with
``torch.load(weights_only=True)`` or from ``.safetensors``; pass its local path as ``head``.

The score is on the predictor's 1-10 rating scale (~5-6.5 for typical generations); Flow-GRPO uses it raw
as the reward (``flow_grpo/aesthetic_scorer.py``), and papers tabulate it raw (1-10 scale).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import (
    batched,
    build_clip_embedder,
    check_batch_size,
    check_inputs,
    load_state_dict_file,
    looks_local,
)
from solace.rewards.registry import RewardFn, register_reward

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
_LINEAR_INDICES = (0, 2, 4, 6, 7)


class AestheticMLP(nn.Module):
    """The published head's exact layout (so its state dict loads as is); sizes come from the weights."""

    def __init__(self, sizes: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        a, b, c, d, e, f = sizes
        self.layers = nn.Sequential(
            nn.Linear(a, b),
            nn.Dropout(0.2),
            nn.Linear(b, c),
            nn.Dropout(0.2),
            nn.Linear(c, d),
            nn.Dropout(0.1),
            nn.Linear(d, e),
            nn.Linear(e, f),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_aesthetic_head(path: str, field: str = "reward.aesthetic.head") -> AestheticMLP:
    sd = load_state_dict_file(path, field=field, what="aesthetic MLP head")
    want = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    if set(sd) != want:
        raise ConfigError(
            field, f"not the LAION aesthetic head: expected keys {sorted(want)[:2]}..., got {sorted(sd)[:4]}"
        )
    sizes = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in _LINEAR_INDICES]
    if sizes[-1] != 1:
        raise ConfigError(field, f"the head must output one value, got {sizes[-1]}")
    head = AestheticMLP(sizes)
    head.load_state_dict(sd)
    return head


@register_reward("aesthetic")
def aesthetic(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 32,
    head: str | None = None,
    processor: str | None = None,
    local_files_only: bool | None = None,
) -> RewardFn:
    """Aesthetic score. ``model``: CLIP ViT-L/14 (hub id or path); ``head``: local path of the MLP weights."""
    check_batch_size(batch_size, "reward.aesthetic.batch_size")
    if head is None:
        raise MissingDependencyError(
            f"reward.aesthetic.head: pass the local path of the LAION aesthetic MLP ({HEAD_FILENAME} from "
            "github.com/christophschuhmann/improved-aesthetic-predictor)"
        )
    if not looks_local(head) or not os.path.isfile(os.path.expanduser(head)):
        raise MissingDependencyError(
            f"reward.aesthetic.head: no file at {head!r}; download {HEAD_FILENAME} from "
            "github.com/christophschuhmann/improved-aesthetic-predictor there"
        )
    emb = build_clip_embedder(
        model,
        name="aesthetic",
        device=device,
        dtype=dtype,
        tokenizer=processor,
        text=False,
        local_files_only=local_files_only,
    )
    mlp = load_aesthetic_head(os.path.expanduser(head))
    proj = int(emb.model.config.projection_dim)
    if mlp.layers[0].in_features != proj:
        raise ConfigError(
            "reward.aesthetic.head",
            f"head expects {mlp.layers[0].in_features}-d embeddings but the CLIP model gives {proj}-d "
            "(the published head is for ViT-L/14)",
        )
    mlp = mlp.eval().requires_grad_(False).to(device=emb.device, dtype=torch.float32)

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, _ = check_inputs(images, prompts, metadata, "reward.aesthetic")

        @torch.no_grad()
        def chunk(s: slice) -> torch.Tensor:
            e = F.normalize(emb.image(images[s]).float(), dim=-1)
            return mlp(e).squeeze(-1)

        return batched(chunk, n, batch_size, images.device)

    fn.embedder = emb  # type: ignore[attr-defined]
    fn.head = mlp  # type: ignore[attr-defined]
    return fn
