"""GenEval (Ghosh et al., 2023) with the official detector: Mask2Former Swin-S (mmdetection) + CLIP ViT-L/14
colour classification, following ``evaluation/evaluate_images.py`` of djghosh13/geneval and the reward variant
of Flow-GRPO's GenEval reward server.

Per image the detector's boxes are kept per COCO class above a confidence threshold (0.3; 0.9 for the
``counting`` tag), at most 16 per class, most confident first; then the prompt's ``metadata`` record
(``{"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude": [...]}``) is checked:

* ``mode="accuracy"`` -- the official GenEval verdict, 1/0 (at least ``count`` objects, colours among the
  first ``count``, positions with a 0.1 box-size margin, excluded classes absent).
* ``mode="strict"`` -- Flow-GRPO's strict verdict: counts must be *exactly* ``count``.
* ``mode="score"`` (default, Flow-GRPO's training reward) -- partial credit in [0, 1]: the mean over the
  include clauses of ``1 - |count - found| / count`` plus one term per colour / position check (reproduced
  with its quirk: a failed position check adds the terms 0 *and* 1).

Images go to the detector in BGR, as GenEval's file-path calls give it (Flow-GRPO's server passes RGB arrays).

Installing the detector stack (not possible beside solace's torch here): mmcv-full 1.x + mmdet 2.x
(GenEval pins mmdet 2.27; Flow-GRPO's reward server the mmdetection 2.x branch), the checkpoint
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` in ``model`` and the matching mmdet config in
``config``. mmdet 3.x results (``DetDataSample``) are accepted too. Colour classification uses
transformers' CLIP with the OpenAI ViT-L/14 weights (what GenEval loads through open_clip), so open_clip
is not needed.

The exact evaluator of the toy world is a different reward (``toy_geneval``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import (
    batched,
    build_clip_embedder,
    check_batch_size,
    check_inputs,
    clip_preprocess,
    first_line,
    resolve_device,
    to_uint8_hwc,
)
from solace.rewards.registry import RewardFn, register_reward

INSTALL = (
    "pip install -U openmim && mim install 'mmcv-full>=1.7,<2' && pip install 'mmdet>=2.27,<3' "
    "(see github.com/djghosh13/geneval)"
)
DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
MODES = ("score", "strict", "accuracy")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's object_names.txt: the 80 COCO classes in detector order, with GenEval's wording.
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

Detection = tuple[np.ndarray, Any]  # (box x1 y1 x2 y2 score, mask (H, W) bool or None)
ColorFn = Callable[[np.ndarray, list[Detection], str], list[str]]


# --------------------------------------------------------------------------------------------------------
# pure GenEval logic (no detector needed)
# --------------------------------------------------------------------------------------------------------


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])]
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(obj_a: Detection, obj_b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Position of A relative to B (image coordinates, y down), with GenEval's size-scaled dead zone."""
    boxes = np.array([obj_a[0][:4], obj_b[0][:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def select_detections(
    boxes_per_class: Sequence[np.ndarray],
    masks_per_class: Sequence[Any] | None,
    tag: str,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
    classnames: Sequence[str] = CLASSNAMES,
) -> dict[str, list[Detection]]:
    """GenEval's filtering of per-class detections ``(N_c, 5)`` [x1, y1, x2, y2, score]."""
    conf = counting_threshold if tag == "counting" else threshold
    detected: dict[str, list[Detection]] = {}
    for index, name in enumerate(classnames):
        boxes = np.asarray(boxes_per_class[index]).reshape(-1, 5)
        order = np.argsort(boxes[:, 4])[::-1]
        order = order[boxes[order, 4] > conf][:max_objects].tolist()
        kept: list[Detection] = []
        while order:
            top = order.pop(0)
            mask = None if masks_per_class is None else masks_per_class[index][top]
            kept.append((boxes[top], mask))
            order = [
                o for o in order if nms_threshold == 1 or compute_iou(boxes[top], boxes[o]) < nms_threshold
            ]
        if kept:
            detected[name] = kept
    return detected


def evaluate_metadata(
    image: np.ndarray,
    objects: dict[str, list[Detection]],
    metadata: dict,
    color_fn: ColorFn,
    position_threshold: float = 0.1,
) -> dict[str, Any]:
    """GenEval's verdicts for one image: ``correct`` (official), ``strict_correct`` and ``score`` (Flow-GRPO).

    ``color_fn(image, detections, classname)`` returns one colour name from :data:`COLORS` per detection.
    """
    includes, excludes = metadata.get("include", []), metadata.get("exclude", [])
    colors_cache: dict[tuple[str, int], list[str]] = {}

    def colors_of(classname: str, found: list[Detection]) -> list[str]:
        key = (classname, len(found))
        if key not in colors_cache:
            colors_cache[key] = color_fn(image, found, classname)
        return colors_cache[key]

    # official GenEval: at least `count`
    correct, groups = True, []
    for req in includes:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if matched and "color" in req:
            matched = colors_of(name, found).count(req["color"]) >= count
        if matched and "position" in req:
            rel, target = req["position"]
            matched = groups[target] is not None and all(
                rel in relative_position(o, t, position_threshold) for o in found for t in groups[target]
            )
        correct &= matched
        groups.append(found if matched else None)
    for req in excludes:
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False

    # Flow-GRPO's strict verdict and partial score: exactly `count`
    strict, groups, parts = True, [], []
    for req in includes:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])
        parts.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in req or "position" in req:
                parts.append(0.0)
        else:
            if "color" in req:
                n_ok = colors_of(name, found).count(req["color"])
                parts.append(1 - abs(count - n_ok) / count)
                matched = n_ok == count
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    parts.append(0.0)
                else:
                    matched = all(
                        rel in relative_position(o, t, position_threshold)
                        for o in found
                        for t in groups[target]
                    )
                    if not matched:
                        parts.append(0.0)
                    # Flow-GRPO appends 1.0 after a failed position check too; kept for parity.
                    parts.append(1.0)
        strict &= matched
        groups.append(found if matched else None)
    return {
        "correct": bool(correct),
        "strict_correct": bool(strict),
        "score": float(sum(parts) / len(parts)) if parts else 0.0,
    }


# --------------------------------------------------------------------------------------------------------
# detector and colour classifier
# --------------------------------------------------------------------------------------------------------


def _split_mmdet_result(result: Any, num_classes: int) -> tuple[list[np.ndarray], list | None]:
    """mmdet 2.x ``(bbox_results, segm_results)`` / ``bbox_results`` or mmdet 3.x ``DetDataSample`` ->
    per-class (N_c, 5) arrays and per-class mask lists."""
    if hasattr(result, "pred_instances"):  # mmdet 3.x
        inst = result.pred_instances
        boxes = inst.bboxes.detach().cpu().numpy()
        scores = inst.scores.detach().cpu().numpy()
        labels = inst.labels.detach().cpu().numpy()
        masks = inst.masks.detach().cpu().numpy() if hasattr(inst, "masks") else None
        per_box = [np.zeros((0, 5), dtype=np.float32) for _ in range(num_classes)]
        per_mask: list | None = [[] for _ in range(num_classes)] if masks is not None else None
        for c in range(num_classes):
            sel = labels == c
            per_box[c] = np.concatenate([boxes[sel], scores[sel, None]], axis=1).astype(np.float32)
            if per_mask is not None:
                per_mask[c] = list(masks[sel])
        return per_box, per_mask
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    return list(bbox), (list(segm) if segm is not None else None)


def clip_color_classifier(embedder, bgcolor: float = 0x99 / 255) -> ColorFn:
    """GenEval's zero-shot colour classifier on a transformers CLIP: each detection is masked onto a grey
    (#999) background, cropped to its box, and compared with the averaged, normalised embeddings of three
    templates per colour (``100 * cos``, argmax)."""
    cache: dict[str, torch.Tensor] = {}

    def classifier(classname: str) -> torch.Tensor:
        if classname not in cache:
            templates = (
                f"a photo of a {{c}} {classname}",
                f"a photo of a {{c}}-colored {classname}",
                "a photo of a {c} object",
            )
            weights = []
            for c in COLORS:
                e = F.normalize(embedder.text([t.format(c=c) for t in templates]).float(), dim=-1).mean(0)
                weights.append(F.normalize(e, dim=-1))
            cache[classname] = torch.stack(weights, dim=1)
        return cache[classname]

    def color_fn(image: np.ndarray, detections: list[Detection], classname: str) -> list[str]:
        crops = []
        img = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        for box, mask in detections:
            x = img
            if mask is not None:
                m = torch.from_numpy(np.asarray(mask, dtype=bool))[None]
                x = torch.where(m, img, torch.full_like(img, bgcolor))
            x1, y1, x2, y2 = (int(v) for v in box[:4])
            x = x[:, max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)]
            crops.append(clip_preprocess(x[None], embedder.size, embedder.mean, embedder.std)[0])
        px = torch.stack(crops).to(embedder.device, embedder.dtype)
        pooled = embedder.model.vision_model(pixel_values=px).pooler_output
        feats = F.normalize(embedder.model.visual_projection(pooled).float(), dim=-1)
        logits = 100.0 * feats @ classifier(classname).to(feats.device)
        return [COLORS[i] for i in logits.argmax(1).tolist()]

    return color_fn


@register_reward("geneval")
def geneval(
    model: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 16,
    config: str | None = None,
    clip_model: str = "openai/clip-vit-large-patch14",
    mode: str = "score",
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
    position_threshold: float = 0.1,
    local_files_only: bool | None = None,
) -> RewardFn:
    """GenEval reward with the official detector. ``model``: the Mask2Former ``.pth`` or its directory;
    ``config``: the mmdet config (default: mmdet's ``configs/mask2former/<detector>.py``); ``metadata`` of
    each call must hold GenEval records. Needs mmdet (see the module docstring); ``dtype`` applies to CLIP."""
    check_batch_size(batch_size, "reward.geneval.batch_size")
    if mode not in MODES:
        raise ConfigError("reward.geneval.mode", f"unknown mode {mode!r}; use one of {MODES}")
    try:
        import mmdet
        from mmdet.apis import inference_detector, init_detector
    except Exception as e:  # noqa: BLE001 - mmcv import failures come as many types
        raise MissingDependencyError(
            f"the geneval reward needs mmdetection ({type(e).__name__}: {first_line(e)}); install: {INSTALL}"
        ) from None
    if model is None:
        raise MissingDependencyError(
            f"reward.geneval.model: pass the path of {DETECTOR}.pth (download.openmmlab.com, mask2former)"
        )
    ckpt = os.path.join(model, f"{DETECTOR}.pth") if os.path.isdir(model) else model
    if not os.path.isfile(ckpt):
        raise MissingDependencyError(f"reward.geneval.model: detector checkpoint {ckpt!r} not found")
    if config is None:
        config = os.path.join(os.path.dirname(mmdet.__file__), f"../configs/mask2former/{DETECTOR}.py")
    if not os.path.isfile(config):
        raise MissingDependencyError(
            f"reward.geneval.config: mmdet config {config!r} not found; pass the {DETECTOR}.py config"
        )
    dev = resolve_device(device, "reward.geneval.device")
    try:
        detector = init_detector(config, ckpt, device=str(dev))
    except Exception as e:  # noqa: BLE001
        raise ConfigError("reward.geneval.model", f"cannot build the detector: {first_line(e)}") from None
    emb = build_clip_embedder(
        clip_model, name="geneval", device=dev, dtype=dtype, local_files_only=local_files_only
    )
    color_fn = clip_color_classifier(emb)

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.geneval")
        if metadata is None:
            raise ConfigError("reward.geneval.metadata", "GenEval needs the prompts' metadata records")
        arrays = to_uint8_hwc(images)

        def chunk(s: slice) -> torch.Tensor:
            # mmdet expects BGR like cv2.imread; GenEval passes file paths, read as BGR.
            results = inference_detector(detector, [a[..., ::-1].copy() for a in arrays[s]])
            out = []
            for img, res, meta in zip(arrays[s], results, metadata[s], strict=True):
                boxes, masks = _split_mmdet_result(res, len(CLASSNAMES))
                objects = select_detections(
                    boxes,
                    masks,
                    meta.get("tag", ""),
                    threshold,
                    counting_threshold,
                    max_objects,
                    nms_threshold,
                )
                verdict = evaluate_metadata(img, objects, meta, color_fn, position_threshold)
                out.append(
                    verdict["score"]
                    if mode == "score"
                    else float(verdict["strict_correct" if mode == "strict" else "correct"])
                )
            return torch.tensor(out)

        return batched(chunk, n, batch_size, images.device)

    return fn
