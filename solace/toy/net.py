"""The toy text-to-image flow model: a small U-Net on 32x32 RGB pixels with a word-level text encoder.

Pixel space (identity decode, ``z = 2 x - 1``) was chosen over a learned latent space because the exact
evaluator and the self-confidence reward then see the very same tensor, no autoencoder has to be trained
or shipped, and at 32x32x3 = 3,072 numbers a latent space would save little compute.

Architecture (about 4M parameters): 2x2 pixel-unshuffle, then channels 48/96/144 at 16/8/4 px; GroupNorm
residual blocks with FiLM on (time embedding + pooled text); *joint* attention at 8 and 4 px where image
tokens attend over the concatenation of image and text tokens (as in SD3's MM-DiT, single-stream here).
The attention projections are ``nn.Linear`` layers named like diffusers' (``to_q``, ``to_k``, ``to_v``,
``to_out``) so PEFT LoRA targets them the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TEXT_DIM = 128
MAX_TOKENS = 16


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TextEncoder(nn.Module):
    """Word embeddings + learned positions + a 2-layer pre-norm transformer."""

    def __init__(self, vocab_size: int, dim: int = TEXT_DIM, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: (B, L). Returns tokens (B, L, D) and pooled (B, D) (masked mean; zeros if empty)."""
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        # An all-padding row (the empty prompt) would make attention NaN: let padding attend there.
        pad = ~mask
        pad = pad & mask.any(1, keepdim=True)
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return x * m, pooled


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, cout)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class JointAttention(nn.Module):
    """Image tokens attend over [image tokens; text tokens] (text keys masked where padded)."""

    def __init__(self, channels: int, text_dim: int = TEXT_DIM, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.text_norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(text_dim, channels)
        self.add_v_proj = nn.Linear(text_dim, channels)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # in the norm's dtype: under FSDP's bf16 mixed precision the weights are bf16 while the text tokens
        # (an input, from the unsharded float32 text encoder) are float32, a mix CPU's layer_norm refuses
        # (CUDA's autocast runs layer_norm in float32); a no-op otherwise
        t = self.text_norm(text.to(self.text_norm.weight.dtype))
        q = self.to_q(h)
        k = torch.cat([self.to_k(h), self.add_k_proj(t)], dim=1)
        v = torch.cat([self.to_v(h), self.add_v_proj(t)], dim=1)
        d = C // self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(B, -1, self.heads, d).transpose(1, 2)

        keep = torch.cat([torch.ones(B, H * W, dtype=torch.bool, device=x.device), text_mask], dim=1)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=keep[:, None, None, :])
        o = o.transpose(1, 2).reshape(B, H * W, C)
        return x + self.to_out(o).transpose(1, 2).reshape(B, C, H, W)


class ToyFlowNet(nn.Module):
    """Predicts the rectified-flow velocity ``v = eps - x0`` of 3x32x32 pixel latents.

    The image is pixel-unshuffled (2x2) to 12x16x16 first, so the U-Net runs at 16/8/4 px: about 3x less
    compute than a U-Net at full resolution, which is what 2 CPU cores can pretrain in an hour.
    """

    def __init__(self, vocab_size: int, channels: tuple[int, int, int] = (48, 96, 144), cond_dim: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.config = {"vocab_size": vocab_size, "channels": list(channels), "cond_dim": cond_dim}
        self.text = TextEncoder(vocab_size)
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.pool_proj = nn.Linear(TEXT_DIM, cond_dim)
        self.cin = nn.Conv2d(12, c1, 3, padding=1)
        self.d1 = ResBlock(c1, c1, cond_dim)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.d2 = ResBlock(c2, c2, cond_dim)
        self.a2 = JointAttention(c2)
        self.down2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.d3 = ResBlock(c3, c3, cond_dim)
        self.a3 = JointAttention(c3)
        self.mid = ResBlock(c3, c3, cond_dim)
        self.mid_attn = JointAttention(c3)
        self.u3 = nn.ModuleList([ResBlock(2 * c3, c3, cond_dim), ResBlock(c3, c3, cond_dim)])
        self.ua3 = JointAttention(c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1)
        self.u2 = nn.ModuleList([ResBlock(2 * c2, c2, cond_dim), ResBlock(c2, c2, cond_dim)])
        self.ua2 = JointAttention(c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.u1 = nn.ModuleList([ResBlock(2 * c1, c1, cond_dim), ResBlock(c1, c1, cond_dim)])
        self.out_norm = nn.GroupNorm(8, c1)
        self.cout = nn.Conv2d(c1, 12, 3, padding=1)
        nn.init.zeros_(self.cout.weight)
        nn.init.zeros_(self.cout.bias)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(ids, mask)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """z (B, 3, 32, 32), t (B,) in [0, 1], text (B, L, 128), text_mask (B, L), pooled (B, 128)."""
        cond = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features)) + self.pool_proj(pooled)
        cond = F.silu(cond)
        h = self.d1(self.cin(F.pixel_unshuffle(z, 2)), cond)
        s1 = h
        h = self.a2(self.d2(self.down1(h), cond), text, text_mask)
        s2 = h
        h = self.a3(self.d3(self.down2(h), cond), text, text_mask)
        s3 = h
        h = self.mid_attn(self.mid(h, cond), text, text_mask)
        h = self.u3[0](torch.cat([h, s3], 1), cond)
        h = self.ua3(self.u3[1](h, cond), text, text_mask)
        h = self.up2(h)
        h = self.u2[0](torch.cat([h, s2], 1), cond)
        h = self.ua2(self.u2[1](h, cond), text, text_mask)
        h = self.up1(h)
        h = self.u1[0](torch.cat([h, s1], 1), cond)
        h = self.u1[1](h, cond)
        return F.pixel_shuffle(self.cout(F.silu(self.out_norm(h))), 2)
