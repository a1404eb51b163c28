"""The toy world's exact, rule-based evaluator (GenEval's rules on segmented shapes).

1. Segment: each pixel takes the nearest palette colour if it lies within :data:`COLOR_THRESHOLD` RGB units
   of it, else it is background (backgrounds are >= 120 units from every palette colour).
2. Objects: 4-connected components of each colour, at least :data:`MIN_AREA` pixels.
3. Shape, from the component's bounding box: a triangle (apex up) is much wider in its bottom third than
   in its top third (:data:`TRIANGLE_ASYMMETRY`); a square fills its box and its corners, a circle does not
   (fill ratio + corner occupancy >= :data:`SQUARE_SCORE`). Boxes with an aspect ratio beyond
   :data:`MAX_ASPECT` are ``unknown`` blobs.
4. Score a GenEval record (``include``/``exclude``):

   * **lenient** (GenEval's rules): each ``include`` entry has at least ``count`` objects of its class (and
     colour if given); each ``exclude`` entry has fewer than ``count``; a ``position`` entry holds for some
     pair of matching objects (centroid offset beyond :data:`POSITION_MARGIN` pixels on the relation's axis).
   * **strict**: lenient, and the image holds nothing else: the number of detected objects equals the
     number the prompt asks for and there is no unknown blob.

Overall accuracy is the mean of the per-category accuracies (GenEval's convention).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from solace.toy.world import CATEGORIES, COLORS, PromptRecord
from solace.utils.images import to_uint8  # noqa: F401 - the toy world's callers take it from here

COLOR_THRESHOLD = 80.0
MIN_AREA = 12
MAX_ASPECT = 2.0
TRIANGLE_ASYMMETRY = 2.2  # ground truth: circles <= 2.0, triangles >= 2.57
SQUARE_SCORE = 1.5  # fill + corner occupancy; ground truth: circles 99.9% < 1.53, squares 99.9% > 1.45
POSITION_MARGIN = 3.0

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    shape: str  # circle | square | triangle | unknown
    color: str
    cx: float
    cy: float
    area: int
    # the two shape features the class was decided on (see :func:`shape_probabilities`)
    asymmetry: float = 0.0
    squareness: float = 0.0


def _features(mask: np.ndarray) -> tuple[str, float, float, int, float, float]:
    ys, xs = np.nonzero(mask)
    area = int(xs.size)
    w = int(xs.max() - xs.min() + 1)
    h = int(ys.max() - ys.min() + 1)
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    rows = box.sum(1)
    k = max(1, h // 3)
    asymmetry = float(rows[-k:].mean() / max(rows[:k].mean(), 0.5))
    corners = (box[:2, :2].mean() + box[:2, -2:].mean() + box[-2:, :2].mean() + box[-2:, -2:].mean()) / 4
    squareness = float(box.mean() + corners)
    if max(w, h) / min(w, h) > MAX_ASPECT:
        shape = "unknown"
    elif asymmetry >= TRIANGLE_ASYMMETRY:
        shape = "triangle"
    else:
        shape = "square" if squareness >= SQUARE_SCORE else "circle"
    return shape, cx, cy, area, asymmetry, squareness


def shape_probabilities(d: Detection, temperature: float = 0.1) -> dict[str, float]:
    """A soft version of the shape decision, for dense rewards (the evaluator itself stays hard): logistic
    in the distance of each feature from its threshold, so that the class the evaluator picks is always the
    most probable one. ``unknown`` blobs have probability 0 for every shape."""
    if d.shape == "unknown":
        return {"circle": 0.0, "square": 0.0, "triangle": 0.0}

    def sig(x: float) -> float:
        return float(1.0 / (1.0 + np.exp(-np.clip(x, -50, 50))))

    tri = sig((d.asymmetry - TRIANGLE_ASYMMETRY) / (3 * temperature))
    sq = sig((d.squareness - SQUARE_SCORE) / temperature)
    return {"triangle": tri, "square": (1 - tri) * sq, "circle": (1 - tri) * (1 - sq)}


def segment(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (H, W), -1 for background."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    d = np.sqrt(((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1))
    idx = d.argmin(-1)
    return np.where(d.min(-1) <= COLOR_THRESHOLD, idx, -1)


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a uint8 RGB image (H, W, 3)."""
    labels = segment(image)
    out: list[Detection] = []
    for ci, cname in enumerate(_PALETTE_NAMES):
        comp, n = ndimage.label(labels == ci)
        for k in range(1, n + 1):
            mask = comp == k
            if mask.sum() < MIN_AREA:
                continue
            shape, cx, cy, area, asymmetry, squareness = _features(mask)
            out.append(Detection(shape, cname, cx, cy, area, asymmetry, squareness))
    return out


def _matches(d: Detection, item: dict) -> bool:
    return d.shape == item["class"] and ("color" not in item or d.color == item["color"])


def _relation_holds(a: Detection, b: Detection, rel: str) -> bool:
    """Does ``a`` stand ``rel`` ``b`` (image y grows downwards)?"""
    if rel == "left of":
        return b.cx - a.cx > POSITION_MARGIN
    if rel == "right of":
        return a.cx - b.cx > POSITION_MARGIN
    if rel == "above":
        return b.cy - a.cy > POSITION_MARGIN
    if rel == "below":
        return a.cy - b.cy > POSITION_MARGIN
    raise ValueError(f"unknown relation {rel!r}")


def expected_objects(record: PromptRecord) -> int:
    """How many objects the prompt's exact scene holds."""
    return sum(int(item["count"]) for item in record.include)


def _rule_checks(
    dets: Sequence[Detection], record: PromptRecord
) -> tuple[list[bool], list[bool], list[bool]]:
    """GenEval's checks one by one: per ``include`` entry, enough matching objects; per ``exclude`` entry,
    fewer than its count; per ``position`` entry, the relation holds for some pair of matching objects."""
    found = [[d for d in dets if _matches(d, item)] for item in record.include]
    counts = [len(f) >= int(item["count"]) for f, item in zip(found, record.include, strict=True)]
    excludes = [sum(_matches(d, item) for d in dets) < int(item["count"]) for item in record.exclude]
    relations = [
        any(
            _relation_holds(a, b, item["position"][0])
            for a in found[i]
            for b in found[int(item["position"][1])]
        )
        for i, item in enumerate(record.include)
        if "position" in item
    ]
    return counts, excludes, relations


def score_detections(dets: Sequence[Detection], record: PromptRecord) -> dict[str, bool]:
    """GenEval's rules (lenient) and the exact-scene rule (strict) for one record."""
    counts, excludes, relations = _rule_checks(dets, record)
    lenient = all(counts) and all(excludes) and all(relations)
    strict = lenient and len(dets) == expected_objects(record) and not any(d.shape == "unknown" for d in dets)
    return {"strict": bool(strict), "lenient": bool(lenient)}


def partial_score(dets: Sequence[Detection], record: PromptRecord) -> float:
    """Dense partial credit in [0, 1] for rewards (not an accuracy): the mean of the prompt's checks, each
    in [0, 1]. Per ``include`` entry, its soft count (the summed :func:`shape_probabilities` of the objects
    of its colour, if it names one) up to ``count``, over ``count``; per ``exclude`` entry, 1 if it holds;
    per ``position`` entry, 1 if the relation holds; and exactness, ``expected / max(expected, found)``
    (less for every extra object), 0 if an unknown blob is present. Ground-truth scenes score 0.99 on
    average (the soft shape classes stop just short of 1); an empty image scores the excludes alone."""
    checks = []
    for item in record.include:
        pool = [d for d in dets if "color" not in item or d.color == item["color"]]
        soft = sum(shape_probabilities(d)[item["class"]] for d in pool)
        checks.append(min(soft, float(item["count"])) / float(item["count"]))
    _, excludes, relations = _rule_checks(dets, record)
    checks += [float(c) for c in excludes + relations]
    expected = expected_objects(record)
    exact = expected / max(expected, len(dets)) if dets else 0.0
    checks.append(0.0 if any(d.shape == "unknown" for d in dets) else exact)
    return float(np.mean(checks))


def score_image(image: np.ndarray, record: PromptRecord) -> dict[str, bool]:
    return score_detections(detect(image), record)


def summarize(records: Iterable[PromptRecord], scores: Iterable[dict[str, bool]]) -> dict:
    """Per-category and overall (mean over categories) strict and lenient accuracy, with counts."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"strict": [], "lenient": []})
    for r, s in zip(records, scores, strict=True):
        acc[r.tag]["strict"].append(float(s["strict"]))
        acc[r.tag]["lenient"].append(float(s["lenient"]))
    per_cat = {
        c: {
            "strict": float(np.mean(v["strict"])),
            "lenient": float(np.mean(v["lenient"])),
            "n": len(v["strict"]),
        }
        for c, v in acc.items()
    }
    cats = [c for c in CATEGORIES if c in per_cat]
    overall = {
        k: float(np.mean([per_cat[c][k] for c in cats])) if cats else 0.0 for k in ("strict", "lenient")
    }
    return {"overall": overall, "categories": {c: per_cat[c] for c in cats}}


def format_table(summary: dict, title: str = "") -> str:
    """A Markdown table of a :func:`summarize` result."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| category | strict | lenient | n |", "|---|---|---|---|"]
    for c, v in summary["categories"].items():
        lines.append(f"| {c} | {v['strict']:.3f} | {v['lenient']:.3f} | {v['n']} |")
    o = summary["overall"]
    lines.append(f"| **overall** | **{o['strict']:.3f}** | **{o['lenient']:.3f}** | |")
    return "\n".join(lines)
