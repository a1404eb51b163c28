"""External rewards, offline: every model-backed reward runs on a tiny random model of the real architecture
built here and loaded by path through its factory; OCR runs the real recogniser on rendered text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import CLIP_MEAN, CLIP_STD, clip_preprocess
from solace.rewards.registry import available_rewards, build_reward

torch.set_num_threads(1)

PROMPTS = [
    "a photo of a cat",
    "two red apples on a table",
    'a sign that says "hello"',
    "an astronaut riding a horse",
    "blue",
]


# --------------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges; like the real one, the end-of-text
    token has the largest id (open_clip pools the text at ``argmax(ids)``)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
    for c in _byte_chars():
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(vocab_size: int, eos: int, projection_dim: int = 768):
    from transformers import CLIPConfig

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"
    )
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
            pad_token_id=eos, **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=projection_dim,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel (GELU, like ViT-H-14) + tokenizer saved with save_pretrained."""
    from transformers import CLIPModel

    d = tmp_path_factory.mktemp("tiny_clip")
    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(len(tok), tok.eos_token_id)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def clip_model(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 3, 40, 48, generator=g)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hand_cosine(model, tok, px: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine of image i and prompt i from the model's own ``get_*_features``."""
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=px))
        t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = _features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    return (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)


def check_batching_and_determinism(build, images, prompts, metadata=None):
    a = build(batch_size=2)(images, prompts, metadata)
    b = build(batch_size=5)(images, prompts, metadata)
    assert a.shape == (len(prompts),) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fn = build(batch_size=3)
    assert torch.equal(fn(images, prompts, metadata), fn(images, prompts, metadata))
    return a


# --------------------------------------------------------------------------------------------------------
# registry and shared plumbing
# --------------------------------------------------------------------------------------------------------


def test_all_registered_and_import_is_light():
    names = {
        "clip_score",
        "pickscore",
        "hps",
        "image_reward",
        "aesthetic",
        "ocr",
        "geneval",
        "unified_reward",
    }
    assert names <= set(available_rewards())
    code = (
        "import sys, solace.rewards.external as e; "
        "mods = ('transformers', 'rapidocr', 'onnxruntime', 'mmdet', 'ImageReward'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("hw", [(60, 90), (90, 60)])
def test_clip_preprocess_matches_transformers_pil_processor(hw):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 8, 10, generator=g)
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)  # smooth, non-square
    x = (x * 255).round() / 255
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pil = Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy())
    ref = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]))
    ours = clip_preprocess(x, 32, CLIP_MEAN, CLIP_STD, mode="crop")
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    diff = (ours - ref).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1  # PIL works in uint8; same geometry and kernel


def test_letterbox_geometry():
    x = torch.ones(1, 3, 20, 40)
    out = clip_preprocess(x, 32, (0, 0, 0), (1, 1, 1), mode="letterbox")
    assert out.shape == (1, 3, 32, 32)
    assert torch.all(out[..., :8, :] == 0) and torch.all(out[..., 24:, :] == 0)  # zero (black) padding
    torch.testing.assert_close(out[..., 8:24, :], torch.ones(1, 3, 16, 32))
    with pytest.raises(ConfigError):
        clip_preprocess(x, 32, mode="stretch")


def no_chained_traceback(err: BaseException) -> bool:
    return err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_missing_and_broken_models_fail_with_one_line(tmp_path):
    with pytest.raises(MissingDependencyError) as e:
        build_reward("clip_score", model=str(tmp_path / "nowhere"), device="cpu")
    assert "\n" not in str(e.value) and no_chained_traceback(e.value)
    with pytest.raises(MissingDependencyError, match="huggingface-cli download") as e:
        build_reward("clip_score", model="solace-test/not-a-model", device="cpu", local_files_only=True)
    assert "\n" not in str(e.value) and no_chained_traceback(e.value)
    with pytest.raises(ConfigError, match="reward.clip_score.model") as e:
        build_reward("clip_score", model=str(tmp_path), device="cpu")  # exists, holds no model
    assert "\n" not in str(e.value) and no_chained_traceback(e.value)
    with pytest.raises(MissingDependencyError, match="reward.hps.model"):
        build_reward("hps", model=str(tmp_path / "missing.pt"), device="cpu")


def test_bad_inputs(clip_dir, images):
    fn = build_reward("clip_score", model=clip_dir, device="cpu")
    with pytest.raises(ConfigError, match="prompts"):
        fn(images, PROMPTS[:3])
    with pytest.raises(ConfigError, match="images"):
        fn(images[0], PROMPTS[:1])
    with pytest.raises(ConfigError, match="batch_size"):
        build_reward("clip_score", model=clip_dir, device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="dtype"):
        build_reward("clip_score", model=clip_dir, device="cpu", dtype="float8")


# --------------------------------------------------------------------------------------------------------
# CLIPScore, PickScore
# --------------------------------------------------------------------------------------------------------


def test_clip_score(clip_dir, clip_model, images):
    def build(**kw):
        return build_reward("clip_score", model=clip_dir, device="cpu", **kw)

    scores = check_batching_and_determinism(build, images, PROMPTS)
    model, tok = clip_model
    cos = hand_cosine(model, tok, clip_preprocess(images, 32), PROMPTS)
    torch.testing.assert_close(scores, (100 * cos).clamp_min(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(build(scale=0.01)(images, PROMPTS), cos.clamp_min(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        build(scale=1 / 30, clamp=False)(images, PROMPTS), 100 * cos / 30, rtol=1e-4, atol=1e-5
    )  # Flow-GRPO's training reward


def test_pickscore(clip_dir, clip_model, images, tmp_path):
    # the processor (tokenizer + preprocessor_config.json) lives apart from the model, as for PickScore_v1
    _, tok = clip_model
    tok.save_pretrained(tmp_path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = {"crop_size": {"height": 32, "width": 32}, "image_mean": list(mean), "image_std": list(std)}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))

    def build(**kw):
        return build_reward("pickscore", model=clip_dir, processor=str(tmp_path), device="cpu", **kw)

    scores = check_batching_and_determinism(build, images, PROMPTS)
    model, _ = clip_model
    cos = hand_cosine(model, tok, clip_preprocess(images, 32, mean, std), PROMPTS)
    raw = model.logit_scale.exp().item() * cos
    torch.testing.assert_close(scores, raw / 26, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(build(divisor=1)(images, PROMPTS), raw, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="divisor"):
        build(divisor=0)


# --------------------------------------------------------------------------------------------------------
# HPSv2.1: open_clip state dict -> transformers CLIPModel
# --------------------------------------------------------------------------------------------------------


def hf_to_open_clip(model) -> dict[str, torch.Tensor]:
    """Write a transformers CLIPModel's weights in open_clip's ``CLIP`` layout (as HPS_v2.1 ships them)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    oc = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }
    for p in ("weight", "bias"):
        oc[f"visual.ln_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        oc[f"visual.ln_post.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
        oc[f"ln_final.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
    for hf, ocp in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            a, b = f"{hf}.encoder.layers.{i}.", f"{ocp}.resblocks.{i}."
            for p in ("weight", "bias"):
                qkv = [sd[a + f"self_attn.{n}_proj.{p}"] for n in "qkv"]
                oc[b + f"attn.in_proj_{p}"] = torch.cat(qkv, 0)
                oc[b + f"attn.out_proj.{p}"] = sd[a + f"self_attn.out_proj.{p}"]
                oc[b + f"ln_1.{p}"] = sd[a + f"layer_norm1.{p}"]
                oc[b + f"ln_2.{p}"] = sd[a + f"layer_norm2.{p}"]
                oc[b + f"mlp.c_fc.{p}"] = sd[a + f"mlp.fc1.{p}"]
                oc[b + f"mlp.c_proj.{p}"] = sd[a + f"mlp.fc2.{p}"]
    return oc


def _oc_block(x: torch.Tensor, sd: dict, prefix: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock (nn.MultiheadAttention, GELU MLP), batch first."""
    d = x.shape[-1]
    attn = nn.MultiheadAttention(d, heads, batch_first=True)
    attn.load_state_dict({k: sd[prefix + "attn." + k] for k in attn.state_dict()})
    h = F.layer_norm(x, (d,), sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"])
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (d,), sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])),
                 sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])  # fmt: skip
    return x + h


@torch.no_grad()
def open_clip_reference(sd: dict, px: torch.Tensor, ids: torch.Tensor, heads: int = 4) -> torch.Tensor:
    """HPS score (cosine) computed from the open_clip state dict the way open_clip's CLIP does."""
    d = sd["visual.conv1.weight"].shape[0]
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, d), x], 1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, (d,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        x = _oc_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, None)
    x = F.layer_norm(x, (d,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    img = x[:, 0] @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(2):
        t = _oc_block(t, sd, f"transformer.resblocks.{i}.", heads, mask)
    t = F.layer_norm(t, (t.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_ckpt(clip_model, tmp_path_factory):
    """The tiny CLIP as an HPS-style checkpoint: {"state_dict": open_clip keys}, "module." prefix."""
    model, _ = clip_model
    sd = hf_to_open_clip(model)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return str(path), sd


def test_hps_matches_open_clip_reference(clip_dir, clip_model, hps_ckpt, images):
    path, oc_sd = hps_ckpt

    def build(**kw):
        return build_reward("hps", model=path, processor=clip_dir, device="cpu", **kw)

    scores = check_batching_and_determinism(build, images, PROMPTS)
    _, tok = clip_model
    px = clip_preprocess(images, 32, mode="letterbox")
    ids = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(scores, open_clip_reference(oc_sd, px, ids), rtol=1e-4, atol=1e-5)
    # the directory holding the file, and a safetensors copy, load the same weights
    torch.testing.assert_close(
        build_reward("hps", model=os.path.dirname(path), processor=clip_dir, device="cpu")(images, PROMPTS),
        scores,
    )
    from safetensors.torch import save_file

    st = os.path.join(os.path.dirname(path), "hps.safetensors")
    save_file({k: v.contiguous() for k, v in oc_sd.items()}, st)
    torch.testing.assert_close(
        build_reward("hps", model=st, processor=clip_dir, device="cpu")(images, PROMPTS), scores
    )


def test_hps_rejects_foreign_checkpoints(clip_dir, hps_ckpt, tmp_path):
    _, oc_sd = hps_ckpt
    bad = tmp_path / "bad.pt"
    torch.save({**oc_sd, "visual.attnpool.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        build_reward("hps", model=str(bad), processor=clip_dir, device="cpu")
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in oc_sd.items() if not k.startswith("transformer.resblocks.1.")}, short)
    with pytest.raises(ConfigError, match="missing"):
        build_reward("hps", model=str(short), processor=clip_dir, device="cpu")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": oc_sd, "args": types.SimpleNamespace(lr=1)}, pickled)  # not weights-only
    with pytest.raises(ConfigError, match="weights-only"):
        build_reward("hps", model=str(pickled), processor=clip_dir, device="cpu")


# --------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    from solace.rewards.external.aesthetic import AestheticMLP

    torch.manual_seed(2)
    head = AestheticMLP()  # the published 768-1024-128-64-16-1
    d = tmp_path_factory.mktemp("aesthetic")
    torch.save(head.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    return str(d / "sac+logos+ava1-l14-linearMSE.pth"), head.state_dict()


def test_aesthetic(clip_dir, clip_model, aesthetic_head, images):
    path, sd = aesthetic_head

    def build(**kw):
        return build_reward("aesthetic", model=clip_dir, head=path, device="cpu", **kw)

    scores = check_batching_and_determinism(build, images, PROMPTS)
    model, _ = clip_model
    with torch.no_grad():
        e = _features(model.get_image_features(pixel_values=clip_preprocess(images, 32)))
    h = e / e.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # purely linear head
        h = h @ sd[f"layers.{i}.weight"].t() + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, h.squeeze(-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(MissingDependencyError, match="improved-aesthetic-predictor"):
        build_reward("aesthetic", model=clip_dir, device="cpu")


def test_aesthetic_head_checks(clip_dir, tmp_path):
    from solace.rewards.external.aesthetic import AestheticMLP

    small = tmp_path / "small.pth"
    torch.save(AestheticMLP((16, 8, 8, 8, 8, 1)).state_dict(), small)
    with pytest.raises(ConfigError, match="768-d"):
        build_reward("aesthetic", model=clip_dir, head=str(small), device="cpu")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, other)
    with pytest.raises(ConfigError, match="not the LAION aesthetic head"):
        build_reward("aesthetic", model=clip_dir, head=str(other), device="cpu")


# --------------------------------------------------------------------------------------------------------
# ImageReward. The package is not installable beside this torch: its backend is checked on a stand-in with
# ImageReward's structure (ViT features -> BLIP text encoder with cross-attention -> MLP); the transformers
# backend on a tiny random BLIP under the official checkpoint's key names.
# --------------------------------------------------------------------------------------------------------


class _PatchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 24, 56, stride=56)

    def forward(self, px):  # (B, tokens, width) like BLIP's ViT
        return self.proj(px).flatten(2).transpose(1, 2)


class _StubBlip(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertTokenizer, BlipTextConfig
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
            {w for p in PROMPTS for w in p.lower().split()}
        )
        self.tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
        self.visual_encoder = _PatchEncoder()
        cfg = BlipTextConfig(
            vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, encoder_hidden_size=24, max_position_embeddings=40, bos_token_id=2,
            sep_token_id=3, pad_token_id=0,
        )  # fmt: skip
        self.text_encoder = BlipTextModel(cfg, add_pooling_layer=False)


class _StubImageReward(nn.Module):
    def __init__(self):
        super().__init__()
        from solace.rewards.external.aesthetic import AestheticMLP  # ImageReward's MLP has this layout

        self.blip = _StubBlip()
        self.mlp = AestheticMLP((32, 1024, 128, 64, 16, 1))
        self.mean, self.std = 0.16717362830052426, 1.0333394966054072


def test_image_reward_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails whatever is installed
    with pytest.raises(MissingDependencyError, match="pip install image-reward") as e:
        build_reward("image_reward", device="cpu", backend="package")
    assert "\n" not in str(e.value)
    # the default then falls back to transformers' BLIP, which needs ImageReward.pt
    with pytest.raises(MissingDependencyError, match="reward.image_reward.model.*THUDM/ImageReward") as e:
        build_reward("image_reward", device="cpu", download_root=str(tmp_path), local_files_only=True)
    assert "pip install image-reward" in str(e.value)  # the other way out
    assert "\n" not in str(e.value) and no_chained_traceback(e.value)


def test_image_reward_formula(monkeypatch, images, tmp_path):
    torch.manual_seed(4)
    stub = _StubImageReward().eval()
    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device=None, download_root=None: stub
    monkeypatch.setitem(sys.modules, "ImageReward", fake)

    def build(**kw):
        return build_reward("image_reward", model="ImageReward-v1.0", device="cpu", **kw)

    scores = check_batching_and_determinism(build, images, PROMPTS)
    with torch.no_grad():
        px = clip_preprocess(images, 224)
        t = stub.blip.tokenizer(
            PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        emb = stub.blip.visual_encoder(px)
        out = stub.blip.text_encoder(
            t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), return_dict=True,
        )  # fmt: skip
        want = (stub.mlp(out.last_hidden_state[:, 0]).squeeze(-1) - stub.mean) / stub.std
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(MissingDependencyError, match="med_config"):
        build_reward("image_reward", model=str(ckpt), device="cpu")


# ImageReward through transformers' BLIP (the default without the package): a tiny random model of the same
# architecture, saved under the official ImageReward.pt key names, checked against a from-scratch forward of
# BLIP's ViT + med BERT written on those names.

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.mean / .std, as published


def _blip_words() -> list[str]:
    import re

    words = sorted({w for p in PROMPTS for w in re.findall(r"\w+|[^\w\s]", p.lower())})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words


def tiny_blip_config() -> dict:
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "vision": dict(image_size=32, patch_size=16, **common),
        "text": dict(
            vocab_size=len(_blip_words()) + 2, max_position_embeddings=40, **common
        ),  # + [DEC] [ENC]
    }


@pytest.fixture(scope="module")
def blip_tok_dir(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("bert_tok")
    BertTokenizer(vocab={w: i for i, w in enumerate(_blip_words())}).save_pretrained(str(d))
    return str(d)


def to_official_names(net) -> dict[str, torch.Tensor]:
    """The tiny model's weights under ImageReward.pt's names (BLIP's timm ViT + med BERT), written out
    independently of the module's renaming, plus what BLIP_Pretrain also saves and the score ignores."""
    vit = [
        ("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
        ("embeddings.patch_embedding", "patch_embed.proj"), ("post_layernorm", "norm"),
        ("encoder.layers.", "blocks."), ("layer_norm", "norm"), ("self_attn.projection", "attn.proj"),
        ("self_attn.qkv", "attn.qkv"),
    ]  # fmt: skip
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("vision_model."):
            key = key[len("vision_model.") :]
            for a, b in vit:
                key = key.replace(a, b)
            key = "blip.visual_encoder." + key
        elif key.startswith("text_encoder."):
            key = "blip." + key
        out[key] = value.detach().clone()
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    for name in ("vision_proj", "text_proj"):
        out[f"blip.{name}.weight"], out[f"blip.{name}.bias"] = torch.randn(8, 32), torch.randn(8)
    return out


@pytest.fixture(scope="module")
def blip_ir(tmp_path_factory):
    """(tiny ImageRewardBLIP with random weights, its official-named state dict, the .pt path)."""
    from solace.rewards.external.image_reward import build_image_reward_blip

    torch.manual_seed(6)
    net = build_image_reward_blip(tiny_blip_config())
    with torch.no_grad():
        for p in net.parameters():  # perturb the init (zero biases, unit LayerNorms) so every weight counts
            p.add_(0.05 * torch.randn_like(p))
    sd = to_official_names(net)
    path = tmp_path_factory.mktemp("image_reward") / "ImageReward.pt"
    torch.save(sd, path)
    return net, sd, str(path)


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.reshape(*x.shape[:2], h, -1).transpose(1, 2)


def blip_reference(sd: dict, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, heads: int = 4):
    """ImageReward.score written from scratch on the official names: BLIP's ViT (pre-norm blocks, fused qkv,
    LayerNorm eps 1e-6, final norm) -> med BERT (post-norm; self-attention over the prompt, cross-attention
    to all image tokens; eps 1e-12) -> [CLS] -> the linear MLP -> (r - mean) / std."""
    v = "blip.visual_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(px, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        b = f"{v}blocks.{i}."
        qkv = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        q, k, val = (_heads(t, heads) for t in qkv)
        att = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ val
        x = x + _lin(att.transpose(1, 2).flatten(2), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        i += 1
    img = _ln(x, sd, v + "norm", 1e-6)

    t = "blip.text_encoder."
    pos = sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = _ln(sd[t + "embeddings.word_embeddings.weight"][ids] + pos, sd, t + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med's extended attention mask

    def attention(p, hq, hkv, bias):
        q = _heads(_lin(hq, sd, p + "self.query"), heads)
        k, val = (_heads(_lin(hkv, sd, p + n), heads) for n in ("self.key", "self.value"))
        ctx = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias).softmax(-1) @ val
        out = _lin(ctx.transpose(1, 2).flatten(2), sd, p + "output.dense")
        return _ln(out + hq, sd, p + "output.LayerNorm", 1e-12)

    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{t}encoder.layer.{i}."
        y = attention(b + "attention.", y, y, pad)
        y = attention(b + "crossattention.", y, img, 0.0)
        h = _lin(F.gelu(_lin(y, sd, b + "intermediate.dense")), sd, b + "output.dense")
        y = _ln(h + y, sd, b + "output.LayerNorm", 1e-12)
        i += 1
    r = y[:, 0]
    for j in (0, 2, 4, 6, 7):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        r = _lin(r, sd, f"mlp.layers.{j}")
    return ((r - IR_MEAN) / IR_STD).reshape(-1)


def build_blip_ir(path: str, tok_dir: str, **kw):
    return build_reward(
        "image_reward", model=path, tokenizer=tok_dir, blip_config=tiny_blip_config(), device="cpu", **kw
    )


def test_image_reward_blip_is_the_default_without_the_package(monkeypatch, blip_ir, blip_tok_dir, images):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    net, sd, path = blip_ir
    scores = check_batching_and_determinism(
        lambda **kw: build_blip_ir(path, blip_tok_dir, **kw), images, PROMPTS
    )
    fn = build_blip_ir(path, blip_tok_dir)
    assert fn.backend == "transformers"
    # the published computation, from scratch on the official names (padding to 35 tokens, CLS, MLP, norm)
    tok = fn.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (5, 35)
    with torch.no_grad():
        want = blip_reference(sd, clip_preprocess(images, 32), tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
    # the image matters (cross-attention is live) and so does the prompt
    assert (fn(images, PROMPTS) - fn(images.flip(-1), PROMPTS)).abs().max() > 1e-4
    assert (fn(images, PROMPTS) - fn(images, PROMPTS[::-1])).abs().max() > 1e-4


def test_image_reward_blip_formula(blip_ir, blip_tok_dir, images):
    _, _, path = blip_ir
    fn = build_blip_ir(path, blip_tok_dir, backend="transformers")
    net = fn.net
    layers = [net.mlp.layers[j] for j in (0, 2, 4, 6, 7)]
    with torch.no_grad():
        for lin in layers:
            lin.weight.zero_()
            lin.bias.zero_()
        layers[-1].bias.fill_(0.75)  # MLP(f) == 0.75 for every input
        torch.testing.assert_close(fn(images, PROMPTS), torch.full((5,), (0.75 - IR_MEAN) / IR_STD))
        # MLP(f) = w . f + b: the first layer picks w . f into unit 0, the rest pass unit 0 through
        w = torch.randn(32)
        layers[0].weight[0] = w
        for lin in layers[1:]:
            lin.weight[0, 0] = 1.0
        layers[-1].bias.fill_(-0.3)
        px = clip_preprocess(images, 32)
        t = fn.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        emb = net.vision_model(pixel_values=px).last_hidden_state
        f = net.text_encoder(
            input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
        ).last_hidden_state[:, 0]  # fmt: skip
        want = (f @ w - 0.3 - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(fn(images, PROMPTS), want, rtol=1e-5, atol=1e-5)


def test_image_reward_blip_published_architecture():
    """The default sizes are ImageReward's BLIP ViT-L/16 at 224 px + BERT-base med (built on the meta device:
    shapes only, no memory)."""
    from solace.rewards.external.image_reward import build_image_reward_blip

    with torch.device("meta"):
        net = build_image_reward_blip()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 16, 16)
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 197, 1024)  # (224 / 16)^2 + CLS
    assert shapes["vision_model.encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)  # bert-base + [DEC] [ENC]
    assert shapes["text_encoder.embeddings.position_embeddings.weight"] == (512, 768)
    assert shapes["text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["mlp.layers.0.weight"] == (1024, 768) and shapes["mlp.layers.7.weight"] == (1, 16)
    assert "vision_model.encoder.layers.24.layer_norm1.weight" not in shapes
    assert "text_encoder.encoder.layer.12.output.dense.weight" not in shapes
    assert (
        net.vision_model.config.num_attention_heads == 16
        and net.text_encoder.config.num_attention_heads == 12
    )
    assert net.vision_model.config.layer_norm_eps == 1e-6 and net.text_encoder.config.layer_norm_eps == 1e-12
    assert net.vision_model.config.hidden_act == "gelu" and net.text_encoder.config.hidden_act == "gelu"


def test_image_reward_key_renaming_round_trip(blip_ir, blip_tok_dir, images, tmp_path):
    from solace.rewards.external.image_reward import convert_official_state_dict, rename_official_key

    net, sd, path = blip_ir
    assert rename_official_key("blip.visual_encoder.blocks.1.attn.proj.weight") == (
        "vision_model.encoder.layers.1.self_attn.projection.weight"
    )
    assert rename_official_key("blip.visual_encoder.norm.bias") == "vision_model.post_layernorm.bias"
    assert (
        rename_official_key("blip.visual_encoder.pos_embed") == "vision_model.embeddings.position_embedding"
    )
    assert rename_official_key("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight") == (
        "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    )
    assert rename_official_key("mlp.layers.7.bias") == "mlp.layers.7.bias"
    assert rename_official_key("blip.vision_proj.weight") is None
    assert rename_official_key("blip.text_encoder.embeddings.position_ids") is None
    renamed = convert_official_state_dict(sd)
    own = net.state_dict()
    assert renamed.keys() == own.keys() and all(torch.equal(renamed[k], own[k]) for k in own)
    fn = build_blip_ir(path, blip_tok_dir, backend="transformers")
    with torch.no_grad():
        px = clip_preprocess(images, 32)
        t = fn.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        direct = net(px, t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(fn(images, PROMPTS), direct, rtol=0, atol=1e-6)
    # .safetensors holds the same names
    from safetensors.torch import save_file

    st = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    torch.testing.assert_close(
        build_blip_ir(str(st), blip_tok_dir)(images, PROMPTS), direct, rtol=0, atol=1e-6
    )


def test_image_reward_blip_rejects_foreign_checkpoints(monkeypatch, blip_ir, blip_tok_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    _, sd, path = blip_ir
    bad = dict(sd)
    del bad["blip.visual_encoder.blocks.0.attn.qkv.weight"]
    bad["blip.visual_encoder.head.weight"] = torch.zeros(3, 32)
    p = tmp_path / "bad.pt"
    torch.save(bad, p)
    with pytest.raises(ConfigError, match="reward.image_reward.model") as e:
        build_blip_ir(str(p), blip_tok_dir)
    msg = str(e.value)
    assert (
        "vision_model.encoder.layers.0.self_attn.qkv.weight" in msg
        and "blip.visual_encoder.head.weight" in msg
    )
    assert "\n" not in msg and no_chained_traceback(e.value)
    wider = tiny_blip_config()
    wider["vision"]["intermediate_size"] = 48
    with pytest.raises(ConfigError, match="do not match the architecture") as e:  # right names, wrong sizes
        build_reward("image_reward", model=path, tokenizer=blip_tok_dir, blip_config=wider, device="cpu")
    assert "\n" not in str(e.value)
    from solace.rewards.external.image_reward import build_image_reward_blip

    small = tiny_blip_config()
    small["text"]["vocab_size"] = 8  # fewer tokens than the tokenizer has
    p = tmp_path / "small_vocab.pt"
    torch.save(to_official_names(build_image_reward_blip(small)), p)
    with pytest.raises(ConfigError, match="reward.image_reward.tokenizer"):
        build_reward("image_reward", model=str(p), tokenizer=blip_tok_dir, blip_config=small, device="cpu")
    with pytest.raises(MissingDependencyError, match="reward.image_reward.tokenizer") as e:
        build_blip_ir(path, str(tmp_path / "no_tokenizer"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="reward.image_reward.backend"):
        build_blip_ir(path, blip_tok_dir, backend="timm")


# --------------------------------------------------------------------------------------------------------
# OCR
# --------------------------------------------------------------------------------------------------------


def test_levenshtein_and_ocr_score():
    from solace.rewards.external.ocr import levenshtein, ocr_target, ocr_text_score

    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("same", "same") == 0
    assert ocr_target('A neon sign reading "Open 24 Hours" at night') == "Open 24 Hours"
    assert ocr_target("no quotes", {"ocr_text": "SOLACE"}) == "SOLACE"
    with pytest.raises(ConfigError, match="quoted"):
        ocr_target("no quotes here")
    assert ocr_text_score("OPEN 24 hours", "Open 24 Hours") == 1.0  # spaces and case ignored
    assert ocr_text_score("xx open24hours yy", "Open 24 Hours") == 1.0  # contained: Flow-GRPO counts 0 edits
    assert ocr_text_score("HeIlo", "Hello") == pytest.approx(1 - 1 / 5)
    assert ocr_text_score("Helo Wrld", "Hello World") == pytest.approx(1 - 2 / 10)
    assert ocr_text_score("", "Hello") == 0.0
    assert ocr_text_score("completely unrelated text", "cat") == 0.0  # distance clipped at len(target)


def _font(size: int):
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"):
        if os.path.isfile(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font


def render(word: str, size: int, canvas=(256, 96)) -> torch.Tensor:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(img)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    xy = ((canvas[0] - (right - left)) // 2 - left, (canvas[1] - (bottom - top)) // 2 - top)
    draw.text(xy, word, fill="black", font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr_fn():
    # needs `pip install rapidocr onnxruntime` (solace's optional extra); not skipped when missing.
    # Det.limit_side_len 256 (default 736) keeps the test fast on small canvases; one ONNX thread.
    params = {
        "Det.limit_side_len": 256,
        "EngineConfig.onnxruntime.intra_op_num_threads": 1,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }
    return build_reward("ocr", backend="rapidocr", ocr_params=params)


def test_ocr_reads_rendered_text(ocr_fn):
    cases = [
        ("Hello World", 28), ("SOLACE", 20), ("flow matching", 18), ("Open 24 Hours", 22), ("Kitten", 32),
        ("RL 2025", 16), ("good morning", 24), ("Stop", 40), ("GenEval", 26), ("text render", 20),
    ]  # fmt: skip
    imgs = torch.stack([render(w, s) for w, s in cases])
    prompts = [f'a poster with the words "{w}" on it' for w, _ in cases]
    scores = ocr_fn(imgs, prompts)
    assert scores.shape == (len(cases),) and scores.dtype == torch.float32
    text = ocr_fn.recognize(imgs[0].mul(255).round().byte().permute(1, 2, 0).numpy())
    assert text.replace(" ", "").lower() == "helloworld"
    assert (scores == 1.0).float().mean() >= 0.9, scores
    assert scores.mean() >= 0.9


def test_ocr_score_of_misspelt_and_blank_images(ocr_fn):
    imgs = torch.stack([render("SOLAR", 28), torch.ones(3, 96, 256)])
    scores = ocr_fn(imgs, ['a sign "SOLACE"', 'a sign "SOLACE"'])
    # "solar" vs "solace": substitute r->c, insert e -> distance 2 of 6
    torch.testing.assert_close(scores, torch.tensor([1 - 2 / 6, 0.0]))


def test_ocr_missing_backend(monkeypatch):
    from solace.rewards.external import ocr as ocr_mod

    monkeypatch.setitem(sys.modules, "rapidocr", None)
    with pytest.raises(MissingDependencyError, match="pip install rapidocr onnxruntime"):
        ocr_mod.build_recognizer("rapidocr")
    with pytest.raises(ConfigError, match="backend"):
        ocr_mod.build_recognizer("paddle")


# --------------------------------------------------------------------------------------------------------
# GenEval: the detector is not installable here -> the clear error, plus GenEval's decision logic on
# synthetic detections
# --------------------------------------------------------------------------------------------------------


def test_geneval_needs_mmdet(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmdet", None)
    with pytest.raises(MissingDependencyError, match="mmdet") as e:
        build_reward("geneval", model="/tmp/mask2former.pth", device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="mode"):
        build_reward("geneval", mode="lenient")


def _det(x1, y1, x2, y2, score=0.95):
    return np.array([x1, y1, x2, y2, score], dtype=np.float32)


def test_geneval_logic_on_synthetic_detections():
    from solace.rewards.external.geneval import CLASSNAMES, evaluate_metadata, select_detections

    assert len(CLASSNAMES) == 80 and CLASSNAMES[47] == "apple"
    boxes = [np.zeros((0, 5), np.float32) for _ in CLASSNAMES]
    boxes[CLASSNAMES.index("apple")] = np.stack([_det(10, 10, 30, 30, 0.95), _det(60, 10, 80, 30, 0.5),
                                                 _det(0, 0, 5, 5, 0.2)])  # fmt: skip
    boxes[CLASSNAMES.index("dog")] = np.stack([_det(10, 60, 40, 90, 0.8)])
    counting = select_detections(boxes, None, "counting")  # threshold 0.9
    assert {k: len(v) for k, v in counting.items()} == {"apple": 1}
    objs = select_detections(boxes, None, "two_object")  # threshold 0.3, most confident first
    assert {k: len(v) for k, v in objs.items()} == {"apple": 2, "dog": 1}
    assert objs["apple"][0][0][4] == pytest.approx(0.95)

    image = np.zeros((100, 100, 3), np.uint8)
    red = lambda img, dets, name: ["red"] * len(dets)  # noqa: E731
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 3}]}
    v = evaluate_metadata(image, objs, meta, red)
    assert v == {"correct": False, "strict_correct": False, "score": pytest.approx(1 - 1 / 3)}
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 1}]}  # 2 found: >= 1 but not == 1
    v = evaluate_metadata(image, objs, meta, red)
    assert v["correct"] and not v["strict_correct"] and v["score"] == pytest.approx(0.0)
    meta = {"tag": "position", "include": [{"class": "apple", "count": 2}, {"class": "dog", "count": 1,
            "position": ["above", 0]}]}  # fmt: skip
    v = evaluate_metadata(image, objs, meta, red)  # the dog is below the apples
    # strict score terms: apples 1, dog 1, failed position 0 and (Flow-GRPO's quirk) 1
    assert v == {"correct": False, "strict_correct": False, "score": pytest.approx(3 / 4)}
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "apple", "count": 2,
            "position": ["above", 0]}]}  # fmt: skip
    v = evaluate_metadata(image, objs, meta, red)
    assert v["correct"] and v["strict_correct"] and v["score"] == pytest.approx(1.0)
    meta = {"tag": "color_attr", "include": [{"class": "apple", "count": 2, "color": "green"}]}
    v = evaluate_metadata(image, objs, meta, lambda img, dets, name: ["green", "red"][: len(dets)])
    assert not v["correct"] and v["score"] == pytest.approx((1 + 0.5) / 2)
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "apple",
            "count": 1}]}  # fmt: skip
    assert evaluate_metadata(image, objs, meta, red)["correct"] is False


def test_geneval_mmdet3_results_and_colour_classifier(clip_dir):
    from solace.rewards.external._common import build_clip_embedder
    from solace.rewards.external.geneval import COLORS, _split_mmdet_result, clip_color_classifier

    inst = types.SimpleNamespace(
        bboxes=torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]), scores=torch.tensor([0.9, 0.4]),
        labels=torch.tensor([47, 16]), masks=torch.zeros(2, 32, 32, dtype=torch.bool),
    )  # fmt: skip
    boxes, masks = _split_mmdet_result(types.SimpleNamespace(pred_instances=inst), 80)
    assert boxes[47].shape == (1, 5) and boxes[16][0, 4] == pytest.approx(0.4) and len(masks[47]) == 1
    emb = build_clip_embedder(clip_dir, name="geneval", device="cpu", dtype="float32")
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[2:12, 2:12] = True
    colors = clip_color_classifier(emb)(
        image, [(_det(0, 0, 16, 16), mask), (_det(8, 8, 30, 30), None)], "apple"
    )
    assert len(colors) == 2 and set(colors) <= set(COLORS)


# --------------------------------------------------------------------------------------------------------
# UnifiedReward (no network in tests)
# --------------------------------------------------------------------------------------------------------


def test_unified_reward_needs_url_and_parses():
    from solace.rewards.external.unified_reward import QUESTION, build_request, parse_score

    with pytest.raises(ConfigError, match="reward.unified_reward.url"):
        build_reward("unified_reward")
    assert parse_score("The image is sharp. Final Score: 4.5") == 4.5
    assert parse_score("Final Score:3") == 3.0 and parse_score("no score") == 0.0
    payload = build_request(np.zeros((64, 48, 3), np.uint8), "a cat", "UnifiedReward-7b-v1.5")
    content = payload["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image;base64,")
    assert content[1]["text"] == QUESTION.format(prompt="a cat") and payload["temperature"] == 0
    assert callable(
        build_reward("unified_reward", url="http://127.0.0.1:9/v1")
    )  # builds without contacting it


def test_random_control_reward_is_uniform_fixed_by_pixels_and_uninformative():
    from solace.rewards.control import image_uniform
    from solace.rewards.registry import build_reward

    fn = build_reward("random", seed=3)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(256, 3, 8, 8, generator=g)
    s = fn(imgs, ["a photo of a circle"] * 256)
    assert s.shape == (256,) and s.dtype == torch.float32
    assert ((s >= 0) & (s < 1)).all() and abs(float(s.mean()) - 0.5) < 0.06  # uniform: mean 1/2
    assert torch.equal(s, fn(imgs, ["another prompt"] * 256))  # the prompt plays no part; deterministic
    assert not torch.equal(s, build_reward("random", seed=4)(imgs, [""] * 256))  # the seed does
    one = imgs[:1].clone()
    one[0, 0, 0, 0] = 1.0 - one[0, 0, 0, 0]  # one pixel changed: a fresh number
    assert float(fn(one, [""])[0]) != float(s[0])
    assert image_uniform(b"\x00" * 12, 0) == image_uniform(b"\x00" * 12, 0)
    # uninformative: no correlation with image brightness
    r = torch.corrcoef(torch.stack([s, imgs.mean((1, 2, 3))]))[0, 1]
    assert abs(float(r)) < 0.2
