"""Tiny, randomly initialised SD3 and FLUX.1 pipelines built entirely in code (no hub, no files).

Every component is a real diffusers/transformers class with a tiny config, so the pipelines run their own
``__call__`` end to end in milliseconds on a CPU. Tokenizers are built from in-memory vocabularies:
a character-level CLIP BPE (``merges=[]``) and a character-level T5 Unigram. Weights come from
``torch.manual_seed(seed)``, so the same seed always gives the same pipeline (tests that attach LoRA build
their own copies instead of mutating shared fixtures).

Sizes: images of ``TINY_RESOLUTION`` (16 px); the VAE downsamples by 2 (two blocks) to 16-channel 8x8
latents; SD3 patchifies 2x2 (16 image tokens), FLUX packs 2x2 (16 tokens of 64 channels).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_RESOLUTION = 16
TINY_T5_MAX_LEN = 16
_CHARS = string.ascii_lowercase + string.digits + ".,!?-'"


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer from an in-memory vocab (each char with/without ``</w>``)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    # model_max_length must be set: the pipelines pad CLIP prompts to it (otherwise it is 1e30).
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A character-level T5 (Unigram/SentencePiece-style) tokenizer built offline, without extra ids."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection,
    )


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=128,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def make_tiny_sd3(seed: int = 0, with_t5: bool = True):
    """A tiny ``StableDiffusion3Pipeline`` (SD3.5-style: dual-attention layer and RMS qk-norm).

    CLIP hidden 32 + 32 = 64 = ``joint_attention_dim`` = T5 d_model; pooled 32 + 32 = 64.
    ``with_t5=False`` gives ``text_encoder_3=None`` (the pipeline then uses zeros for the T5 tokens).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    te1 = CLIPTextModelWithProjection(_clip_config(32, 32))
    te2 = CLIPTextModelWithProjection(_clip_config(32, 32))
    te3 = _t5_encoder(64) if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(),
        text_encoder=te1,
        tokenizer=clip_tokenizer(),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=te3,
        tokenizer_3=t5_tokenizer() if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A tiny ``FluxPipeline`` (FLUX.1-dev style: guidance embedding, dynamic shift, packed latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(32, 32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(64),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(pipe, folder: str | Path) -> Path:
    """``save_pretrained`` a tiny pipeline (safetensors) to test ``from_pretrained(local folder)``."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def train_overrides(folder: Path, out: Path, prompts: Path, **extra) -> list[str]:
    """``solace train`` overrides for a tiny diffusers pipeline saved in ``folder``: 2 iterations of tiny
    groups on the prompts of ``prompts``; ``extra`` replaces or adds settings."""
    from trainer_helpers import TINY_RUN

    base = {
        "model.name": str(folder),
        **TINY_RUN,
        "model.dtype": "fp32",
        "model.resolution": TINY_RESOLUTION,
        "model.max_sequence_length": TINY_T5_MAX_LEN,
        "data.train_prompts": str(prompts),
        "eval.prompts": str(prompts),
        "eval.num_steps": 3,
        "sampling.cfg_scale": 4.0,
        "train.output_dir": str(out),
        "train.report": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
