"""Procedural scenes for the toy world: soft low-saturation gradient backgrounds and flat shapes.

Backgrounds are kept at least :data:`MIN_BG_DISTANCE` RGB units (Euclidean) from every palette colour, so
an object can never be confused with the background, and so that an empty image is not the trivially
easiest thing to denoise (a black background made the self-confidence reward measure emptiness).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from solace.toy.world import COLORS, IMAGE_SIZE, RELATIONS, SHAPES, PromptRecord

MIN_BG_DISTANCE = 120.0
SUPERSAMPLE = 4
SIZE_RANGE = (4.5, 6.0)  # half-extent of an object in pixels
_EXTENT = {"circle": 1.0, "square": 0.88, "triangle": 1.1}  # half-extent of each shape's box, in units of r
COLOR_JITTER = 12


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cx: float
    cy: float
    r: float

    def box(self) -> tuple[float, float, float, float]:
        e = _EXTENT[self.shape] * self.r
        return self.cx - e, self.cy - e, self.cx + e, self.cy + e


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    bg0: tuple[int, int, int]
    bg1: tuple[int, int, int]
    bg_angle: float
    jitter: tuple[tuple[int, int, int], ...] = ()


def _dist(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def random_background_color(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation mid-tone at least MIN_BG_DISTANCE from every palette colour (rejection sampling)."""
    while True:
        g = rng.uniform(108, 152)
        c = tuple(int(round(g + rng.uniform(-14, 14))) for _ in range(3))
        if all(_dist(c, p) >= MIN_BG_DISTANCE for p in COLORS.values()):
            return c  # type: ignore[return-value]


def _gap_ok(a: SceneObject, b: SceneObject, gap: float = 2.0) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return bx0 - ax1 >= gap or ax0 - bx1 >= gap or by0 - ay1 >= gap or ay0 - by1 >= gap


def _place(
    rng: random.Random,
    shape: str,
    color: str,
    placed: list[SceneObject],
    region: tuple[float, float, float, float] | None = None,
    tries: int = 400,
) -> SceneObject | None:
    for _ in range(tries):
        r = rng.uniform(*SIZE_RANGE)
        e = _EXTENT[shape] * r
        lo, hi = e + 1.0, IMAGE_SIZE - e - 1.0
        x0, y0, x1, y1 = region if region else (lo, lo, hi, hi)
        x0, y0, x1, y1 = max(x0, lo), max(y0, lo), min(x1, hi), min(y1, hi)
        if x0 > x1 or y0 > y1:
            continue
        o = SceneObject(shape, color, rng.uniform(x0, x1), rng.uniform(y0, y1), r)
        if all(_gap_ok(o, p) for p in placed):
            return o
    return None


def _position_pair(
    rng: random.Random, ref: tuple[str, str], obj: tuple[str, str], rel: str
) -> list[SceneObject]:
    """Place ``obj`` clearly ``rel`` the reference: >= 8 px apart on the relation's axis, <= 4 px across."""
    for _ in range(200):
        a = _place(rng, ref[0], ref[1], [])
        if a is None:
            continue
        along = rng.uniform(9.0, 22.0)
        across = rng.uniform(-4.0, 4.0)
        dx, dy = {
            "left of": (-along, across),
            "right of": (along, across),
            "above": (across, -along),
            "below": (across, along),
        }[rel]
        r = rng.uniform(*SIZE_RANGE)
        b = SceneObject(obj[0], obj[1], a.cx + dx, a.cy + dy, r)
        x0, y0, x1, y1 = b.box()
        if x0 >= 1 and y0 >= 1 and x1 <= IMAGE_SIZE - 1 and y1 <= IMAGE_SIZE - 1 and _gap_ok(a, b):
            return [a, b]
    raise RuntimeError(f"could not place a {obj} {rel} a {ref}")


def scene_for(record: PromptRecord, rng: random.Random) -> Scene:
    """A random scene that satisfies ``record`` exactly (its strict reading: nothing else in it)."""
    colors = list(COLORS)
    inc = record.include
    bg0, bg1 = random_background_color(rng), random_background_color(rng)
    angle = rng.uniform(0, 2 * math.pi)
    for _ in range(100):
        objects: list[SceneObject] = []
        if record.tag == "position":
            ref, obj = inc[0], inc[1]
            rel = obj["position"][0]
            assert rel in RELATIONS
            objects = _position_pair(
                rng,
                (ref["class"], ref.get("color") or rng.choice(colors)),
                (obj["class"], obj.get("color") or rng.choice(colors)),
                rel,
            )
        else:
            ok = True
            for item in inc:
                for _k in range(int(item["count"])):
                    o = _place(rng, item["class"], item.get("color") or rng.choice(colors), objects)
                    if o is None:
                        ok = False
                        break
                    objects.append(o)
            if not ok:
                continue
        rng.shuffle(objects)
        jitter = tuple(tuple(rng.randint(-COLOR_JITTER, COLOR_JITTER) for _ in range(3)) for _ in objects)
        return Scene(tuple(objects), bg0, bg1, angle, jitter)  # type: ignore[arg-type]
    raise RuntimeError(f"could not build a scene for {record.prompt!r}")


def _coverage(o: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - o.cx, ys - o.cy
    if o.shape == "circle":
        return dx**2 + dy**2 <= o.r**2
    if o.shape == "square":
        e = _EXTENT["square"] * o.r
        return (np.abs(dx) <= e) & (np.abs(dy) <= e)
    if o.shape == "triangle":  # apex up, base down; both span the box [-e, e]
        e = _EXTENT["triangle"] * o.r
        frac = (dy + e) / (2 * e)  # 0 at the apex, 1 at the base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= e * frac)
    raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render to uint8 RGB (size, size, 3), anti-aliased by supersampling."""
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(c, c)
    u = ((xs - size / 2) * math.cos(scene.bg_angle) + (ys - size / 2) * math.sin(scene.bg_angle)) / size + 0.5
    u = np.clip(u, 0, 1)[..., None]
    img = (1 - u) * np.array(scene.bg0, dtype=np.float64) + u * np.array(scene.bg1, dtype=np.float64)
    for i, o in enumerate(scene.objects):
        col = np.array(COLORS[o.color], dtype=np.float64)
        if scene.jitter:
            col = np.clip(col + np.array(scene.jitter[i]), 0, 255)
        m = _coverage(o, xs, ys)
        img[m] = col
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_prompt(record: PromptRecord, seed: int) -> np.ndarray:
    """Render one ground-truth image for a prompt from a seed."""
    return render(scene_for(record, random.Random(seed)))
