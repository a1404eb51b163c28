"""The toy world: prompts, renderer and the exact evaluator."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from solace.toy.evaluator import detect, partial_score, score_image, shape_probabilities, summarize
from solace.toy.render import (
    MIN_BG_DISTANCE,
    Scene,
    SceneObject,
    random_background_color,
    render,
    render_prompt,
    scene_for,
)
from solace.toy.world import (
    CATEGORIES,
    COLORS,
    PromptRecord,
    all_prompts,
    heldout_prompts,
    load_heldout,
    sample_train_prompt,
    train_prompts,
)


def test_every_category_has_prompts_in_geneval_format():
    ps = all_prompts()
    assert {p.tag for p in ps} == set(CATEGORIES)
    for p in ps:
        d = p.to_json()
        assert set(d) >= {"tag", "include", "prompt"}
        assert PromptRecord.from_json(json.loads(json.dumps(d))) == p
    counting = [p for p in ps if p.tag == "counting"]
    assert {p.include[0]["count"] for p in counting} == {1, 2, 3, 4}
    assert all(p.exclude[0]["count"] == p.include[0]["count"] + 1 for p in counting)


def test_heldout_is_shipped_deterministic_and_unseen():
    shipped = load_heldout()
    assert [r.to_json() for r in shipped] == [r.to_json() for r in heldout_prompts()]
    assert len(shipped) >= 64
    unseen = {r.prompt for r in shipped if not r.meta["seen_in_training"]}
    assert len(unseen) >= 64
    pool = {p.prompt for v in train_prompts().values() for p in v}
    assert not unseen & pool
    rng = random.Random(0)
    drawn = {sample_train_prompt(rng).prompt for _ in range(3000)}
    assert not unseen & drawn
    assert {r.tag for r in shipped} == set(CATEGORIES)


def test_backgrounds_stay_far_from_every_palette_colour():
    rng = random.Random(1)
    for _ in range(500):
        c = np.array(random_background_color(rng), dtype=float)
        for p in COLORS.values():
            assert np.linalg.norm(c - np.array(p)) >= MIN_BG_DISTANCE


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_scenes_score_correct_in_every_category(category):
    recs = [p for p in all_prompts() if p.tag == category]
    n_ok = n = 0
    for i in range(120):
        r = recs[i % len(recs)]
        s = score_image(render(scene_for(r, random.Random(1000 + i))), r)
        n += 1
        n_ok += s["strict"]
        assert s["lenient"] >= s["strict"]
    assert n_ok / n >= 0.97, f"{category}: {n_ok}/{n}"


def test_evaluator_is_at_least_99_percent_right_on_ground_truth():
    ps = all_prompts()
    rng = random.Random(7)
    recs = [rng.choice(ps) for _ in range(800)]
    scores = [score_image(render(scene_for(r, random.Random(50_000 + i))), r) for i, r in enumerate(recs)]
    summ = summarize(recs, scores)
    total = np.mean([s["strict"] for s in scores])
    assert total >= 0.99, summ


def _scene(objs, seed=0):
    rng = random.Random(seed)
    return Scene(tuple(objs), random_background_color(rng), random_background_color(rng), 0.7)


def _rec(prompt):
    return next(p for p in all_prompts() if p.prompt == prompt)


def test_detects_shapes_colours_and_positions():
    img = render(
        _scene(
            [
                SceneObject("circle", "red", 8, 8, 5),
                SceneObject("square", "blue", 24, 10, 5),
                SceneObject("triangle", "yellow", 16, 24, 5.5),
            ]
        )
    )
    got = sorted((d.shape, d.color) for d in detect(img))
    assert got == [("circle", "red"), ("square", "blue"), ("triangle", "yellow")]


def test_rejects_wrong_colour():
    r = _rec("a photo of a red circle")
    good = render(_scene([SceneObject("circle", "red", 16, 16, 5)]))
    bad = render(_scene([SceneObject("circle", "green", 16, 16, 5)]))
    assert score_image(good, r)["strict"]
    assert score_image(bad, r) == {"strict": False, "lenient": False}


def test_rejects_wrong_shape():
    r = _rec("a photo of a square")
    assert not score_image(render(_scene([SceneObject("triangle", "red", 16, 16, 5)])), r)["lenient"]


@pytest.mark.parametrize("n_drawn", [2, 4])
def test_counting_rejects_wrong_counts(n_drawn):
    r = _rec("a photo of three circles")
    spots = [(7, 7), (24, 7), (7, 24), (24, 24)]
    objs = [SceneObject("circle", "blue", x, y, 4.8) for x, y in spots[:n_drawn]]
    s = score_image(render(_scene(objs)), r)
    assert s == {"strict": False, "lenient": False}
    objs3 = [SceneObject("circle", "blue", x, y, 4.8) for x, y in spots[:3]]
    assert score_image(render(_scene(objs3)), r)["strict"]


def test_position_rejects_wrong_relation():
    r = _rec("a photo of a square left of a circle")
    ok = render(_scene([SceneObject("square", "red", 8, 16, 5), SceneObject("circle", "blue", 24, 16, 5)]))
    mirrored = render(
        _scene([SceneObject("square", "red", 24, 16, 5), SceneObject("circle", "blue", 8, 16, 5)])
    )
    assert score_image(ok, r)["strict"]
    assert score_image(mirrored, r) == {"strict": False, "lenient": False}
    above = _rec("a photo of a square above a circle")
    stacked = render(
        _scene([SceneObject("square", "red", 16, 7, 5), SceneObject("circle", "blue", 16, 24, 5)])
    )
    assert score_image(stacked, above)["strict"]
    assert not score_image(stacked, _rec("a photo of a square below a circle"))["lenient"]


def test_attribute_binding_rejects_swapped_colours():
    r = _rec("a photo of a red circle and a blue square")
    ok = render(_scene([SceneObject("circle", "red", 8, 16, 5), SceneObject("square", "blue", 24, 16, 5)]))
    swapped = render(
        _scene([SceneObject("circle", "blue", 8, 16, 5), SceneObject("square", "red", 24, 16, 5)])
    )
    assert score_image(ok, r)["strict"]
    assert score_image(swapped, r) == {"strict": False, "lenient": False}


def test_strict_rejects_extra_objects_lenient_accepts_them():
    r = _rec("a photo of a circle and a square")
    extra = render(
        _scene(
            [
                SceneObject("circle", "red", 8, 8, 5),
                SceneObject("square", "blue", 24, 8, 5),
                SceneObject("triangle", "green", 16, 24, 5),
            ]
        )
    )
    assert score_image(extra, r) == {"strict": False, "lenient": True}


def test_empty_image_fails_everything():
    empty = render(_scene([]))
    for r in all_prompts()[:: len(all_prompts()) // 12]:
        assert score_image(empty, r) == {"strict": False, "lenient": False}


def test_scene_for_respects_the_prompt_exactly():
    for r in all_prompts()[::7]:
        sc = scene_for(r, random.Random(3))
        assert len(sc.objects) == sum(i["count"] for i in r.include)
        for item in r.include:
            n = sum(
                o.shape == item["class"] and ("color" not in item or o.color == item["color"])
                for o in sc.objects
            )
            assert n >= item["count"]
        assert dataclasses.replace(sc) == sc


def test_partial_score_ranks_near_misses_between_wrong_and_right():
    r = _rec("a photo of a red square and a blue circle")
    right = [SceneObject("square", "red", 8, 16, 5), SceneObject("circle", "blue", 24, 16, 5)]
    one_wrong_shape = [SceneObject("circle", "red", 8, 16, 5), SceneObject("circle", "blue", 24, 16, 5)]
    one_missing = [SceneObject("square", "red", 8, 16, 5)]
    extra = [*right, SceneObject("triangle", "green", 16, 27, 4.5)]
    scenes = dict(right=right, wrong=one_wrong_shape, missing=one_missing, extra=extra, empty=[])
    s = {k: partial_score(detect(render(_scene(v))), r) for k, v in scenes.items()}
    assert s["right"] > 0.95
    # by hand: checks = [red square, blue circle, exactness]
    assert s["missing"] == pytest.approx((1 + 0 + 1) / 3, abs=0.03)  # a missing object costs its check only
    assert s["extra"] == pytest.approx((1 + 1 + 2 / 3) / 3, abs=0.03)
    assert s["wrong"] == pytest.approx((0 + 1 + 1) / 3, abs=0.03)
    assert s["empty"] == 0.0
    assert s["right"] > s["extra"] > s["wrong"] > s["empty"]


def test_soft_shape_classes_agree_with_the_hard_decision():
    rng = random.Random(5)
    for r in all_prompts()[::5]:
        for d in detect(render_prompt(r, rng.getrandbits(32))):
            p = shape_probabilities(d)
            assert sum(p.values()) == pytest.approx(1.0)
            assert max(p, key=p.get) == d.shape
