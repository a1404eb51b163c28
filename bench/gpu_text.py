"""Random-weight text encoders of SD3.5's real sizes (or tiny ones), built offline for the GPU checks.

SD3.5 conditions on CLIP-L (hidden 768), OpenCLIP bigG (hidden 1280) and T5-XXL's encoder (d_model 4096,
24 layers, 4.8 B parameters): about 11 GiB in bf16 together, which is what offloading them frees. The
tokenizers are character-level and built in memory (no download); their ids index the real-size embedding
tables, so the encoders' cost per prompt is the real one.
"""

from __future__ import annotations

import string
from typing import Any

import torch

_CHARS = string.ascii_lowercase + string.digits + " .,!?-'"

# (hidden, intermediate, layers, heads, projection) of CLIP-L/14 and OpenCLIP bigG/14's text towers
CLIP_L = (768, 3072, 12, 12, 768)
CLIP_G = (1280, 5120, 32, 20, 1280)
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128)
TINY_CLIP = (16, 37, 2, 4, 16)
TINY_T5 = dict(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=128)


def tokenizers() -> tuple[Any, Any]:
    """A character-level CLIP BPE tokenizer (77 tokens) and a character-level T5 tokenizer."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return clip, T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip(dims: tuple[int, ...], vocab: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden, inter, layers, heads, proj = dims
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=proj, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg)


def _t5(dims: dict[str, int]) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        **dims, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(cfg)


def sd35_text_encoders(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    """The six text components of a ``StableDiffusion3Pipeline`` (random weights, real or tiny sizes)."""
    clip_tok, t5_tok = tokenizers()
    torch.manual_seed(1)
    with torch.device(device):
        enc = {
            "text_encoder": _clip(TINY_CLIP if tiny else CLIP_L, 128 if tiny else 49408),
            "text_encoder_2": _clip(TINY_CLIP if tiny else CLIP_G, 128 if tiny else 49408),
            "text_encoder_3": _t5(TINY_T5 if tiny else T5_XXL),
        }
    for m in enc.values():
        m.to(dtype=dtype).eval().requires_grad_(False)
    return enc | {"tokenizer": clip_tok, "tokenizer_2": clip_tok, "tokenizer_3": t5_tok}


def parameters_gib(modules: dict[str, Any]) -> float:
    """GiB held by the parameters of the ``text_encoder*`` modules."""
    return (
        sum(
            p.numel() * p.element_size()
            for k, m in modules.items()
            if k.startswith("text_encoder") and m is not None
            for p in m.parameters()
        )
        / 2**30
    )
