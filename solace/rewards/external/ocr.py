"""OCR reward for visual text rendering, Flow-GRPO's convention (``flow_grpo/ocr.py``).

The target is the text between the first pair of ASCII double quotes of the prompt
(``prompt.split('"')[1]``), or ``metadata[i]["ocr_text"]`` when given. All recognised text lines (in reading
order) are concatenated; both strings are compared with spaces removed and lower-cased:

    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    d = 0                      if tgt is a substring of rec   (extra recognised text is not penalised)
      = Levenshtein(rec, tgt)  otherwise
    score = 1 - min(d, len(tgt)) / len(tgt)      == max(0, 1 - d / len(tgt)),   in [0, 1]

An OCR failure scores 0, as in Flow-GRPO. Papers report the mean of this score as "OCR accuracy".

Recognition: ``rapidocr`` (``pip install rapidocr onnxruntime``; its wheel ships PP-OCR det/rec ONNX models,
so it works offline -- Flow-GRPO used PaddleOCR's PP-OCR models) with the angle classifier off
(Flow-GRPO: ``cls=False``) and rapidocr's 0.5 text-confidence cut (PaddleOCR's ``drop_score``). Fallback:
Tesseract (``apt-get install tesseract-ocr``, optionally ``pip install pytesseract``).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import torch

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import check_batch_size, check_inputs, first_line, to_uint8_hwc
from solace.rewards.registry import RewardFn, register_reward

INSTALL = "pip install rapidocr onnxruntime"
BACKENDS = ("auto", "rapidocr", "tesseract")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1); O(len(a) * len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's comparison form: spaces removed, lower-cased."""
    return text.replace(" ", "").lower()


def ocr_target(prompt: str, metadata: dict | None = None) -> str:
    """The text the image should show: ``metadata["ocr_text"]`` or the prompt's first double-quoted span."""
    if metadata and metadata.get("ocr_text") is not None:
        return str(metadata["ocr_text"])
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ConfigError(
            "reward.ocr.prompts",
            f'no "quoted" target text in prompt {prompt[:80]!r}; quote the text or set metadata["ocr_text"]',
        )
    return parts[1]


def ocr_text_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR score of ``recognized`` against ``target`` (see the module docstring)."""
    rec, tgt = normalize_text(recognized), normalize_text(target)
    if not tgt:
        raise ConfigError("reward.ocr.prompts", f"empty target text {target!r}")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


# --------------------------------------------------------------------------------------------------------
# recognisers: uint8 (H, W, 3) numpy array -> recognised text (lines concatenated in reading order)
# --------------------------------------------------------------------------------------------------------


def _rapidocr(model: str | None, device: torch.device, params: dict[str, Any] | None) -> Callable[[Any], str]:
    try:
        from rapidocr import RapidOCR
    except ImportError as e:
        raise MissingDependencyError(
            f"the ocr reward needs rapidocr and onnxruntime ({first_line(e)}); install them with: {INSTALL}"
        ) from None
    cfg: dict[str, Any] = {"Global.use_cls": False, "Global.log_level": "error"}
    if model is not None:
        cfg["Global.model_root_dir"] = model
    if device.type == "cuda":
        cfg["EngineConfig.onnxruntime.use_cuda"] = True  # needs onnxruntime-gpu
    cfg.update(params or {})
    try:
        engine = RapidOCR(params=cfg)
    except Exception as e:  # noqa: BLE001 - model files / onnxruntime problems surface as many types
        raise MissingDependencyError(
            f"reward.ocr: rapidocr failed to start ({type(e).__name__}: {first_line(e)}); "
            f"reinstall with: {INSTALL}"
        ) from None

    def recognise(img) -> str:
        out = engine(img)
        txts = getattr(out, "txts", None) or ()
        scores = getattr(out, "scores", None) or (1.0,) * len(txts)
        return "".join(t for t, s in zip(txts, scores, strict=False) if s > 0)

    return recognise


def _tesseract(params: dict[str, Any] | None) -> Callable[[Any], str]:
    exe = shutil.which("tesseract")
    if exe is None:
        raise MissingDependencyError(
            f"the ocr reward needs an OCR engine: {INSTALL} (or apt-get install tesseract-ocr)"
        )
    from PIL import Image

    extra = list((params or {}).get("args", ["--psm", "6"]))

    def recognise(img) -> str:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        res = subprocess.run(
            [exe, "stdin", "stdout", *extra], input=buf.getvalue(), capture_output=True, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(first_line(Exception(res.stderr.decode(errors="replace"))))
        return " ".join(res.stdout.decode(errors="replace").split())

    return recognise


def build_recognizer(
    backend: str = "auto",
    model: str | None = None,
    device: torch.device | None = None,
    params: dict[str, Any] | None = None,
) -> Callable[[Any], str]:
    if backend not in BACKENDS:
        raise ConfigError("reward.ocr.backend", f"unknown backend {backend!r}; use one of {BACKENDS}")
    device = device or torch.device("cpu")
    if backend == "rapidocr":
        return _rapidocr(model, device, params)
    if backend == "tesseract":
        return _tesseract(params)
    try:
        return _rapidocr(model, device, params)
    except MissingDependencyError as rapid_err:
        if shutil.which("tesseract") is None:
            raise rapid_err from None
        return _tesseract(None)


@register_reward("ocr")
def ocr(
    model: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    backend: str = "auto",
    ocr_params: dict[str, Any] | None = None,
) -> RewardFn:
    """OCR reward in [0, 1]. ``model``: rapidocr ``model_root_dir`` (``None``: the models in its wheel);
    ``device="cuda"`` needs onnxruntime-gpu; ``dtype`` and ``batch_size`` are accepted for the common
    interface -- images are recognised one at a time. ``ocr_params``: extra rapidocr params, e.g.
    ``{"Det.limit_side_len": 256}`` (tesseract: ``{"args": [...]}``)."""
    check_batch_size(batch_size, "reward.ocr.batch_size")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    recognise = build_recognizer(backend, model, dev, ocr_params)

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.ocr")
        targets = [ocr_target(p, metadata[i] if metadata else None) for i, p in enumerate(prompts)]
        scores = []
        for img, tgt in zip(to_uint8_hwc(images), targets, strict=True):
            try:
                text = recognise(img)
            except Exception:  # noqa: BLE001 - Flow-GRPO: an OCR failure gets the maximum penalty
                scores.append(0.0)
                continue
            scores.append(ocr_text_score(text, tgt))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    fn.recognize = recognise  # type: ignore[attr-defined]
    return fn
