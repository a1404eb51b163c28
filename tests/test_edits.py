"""Minimal prompt edits: exact toy edits (checked by the evaluator) and the free-text rule editor."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from solace.errors import ConfigError
from solace.rewards.prompt_edits import KINDS, Edit, edits_for, load_negatives, text_edits
from solace.toy import edits as toy_module
from solace.toy.edits import toy_edits, verify_edit
from solace.toy.evaluator import detect, score_detections
from solace.toy.render import render_prompt
from solace.toy.world import CATEGORIES, PromptRecord, all_prompts, load_heldout, train_prompts

# ---------------------------------------------------------------------------------------------- toy edits


def _attributes(r: PromptRecord) -> dict[str, object]:
    """The attribute fields of a record's metadata, read independently of solace.toy.edits."""
    colours = tuple(item.get("color") for item in r.include)
    return {
        "shape": tuple(item["class"] for item in r.include),
        "count": tuple(item["count"] for item in r.include),
        "relation": tuple(tuple(item.get("position", ())) for item in r.include),
        "colour": sorted(c for c in colours if c),
        "binding": colours,
    }


def _changed(a: PromptRecord, b: PromptRecord) -> set[str]:
    fa, fb = _attributes(a), _attributes(b)
    changed = {k for k in ("shape", "count", "relation", "colour") if fa[k] != fb[k]}
    if fa["colour"] == fb["colour"] and fa["binding"] != fb["binding"]:
        changed.add("binding")  # the same colours, bound to the other objects
    return changed


def _records_under_test() -> list[PromptRecord]:
    rng = random.Random(0)
    pool = train_prompts()
    sample = [r for c in CATEGORIES for r in rng.sample(pool[c], min(5, len(pool[c])))]
    return [*load_heldout(), *sample]


def test_every_toy_edit_changes_one_attribute_is_a_world_prompt_and_is_rejected():
    world = [(r.tag, r.prompt, r.include, r.exclude) for r in all_prompts()]
    n = 0
    for rec in _records_under_test():
        edits = toy_edits(rec)
        assert edits, rec.prompt
        prompts = [e.prompt for e in edits]
        assert len(set(prompts)) == len(prompts), rec.prompt
        assert rec.prompt not in prompts
        assert [KINDS.index(e.kind) for e in edits] == sorted(KINDS.index(e.kind) for e in edits)
        for e in edits:
            assert isinstance(e, Edit) and e.record is not None
            assert e.prompt == e.record.prompt and e.record.tag == rec.tag
            # a valid prompt of the world: GenEval metadata and template wording as all_prompts() makes them
            assert (e.record.tag, e.record.prompt, e.record.include, e.record.exclude) in world
            assert _changed(rec, e.record) == {e.kind}, (rec.prompt, e)
            assert verify_edit(rec, e), (rec.prompt, e.prompt)
            n += 1
    assert n > 600
    assert toy_edits(load_heldout()[10]) == toy_edits(load_heldout()[10])  # deterministic


def test_each_category_gets_the_expected_kinds():
    expected = {
        "single_object": {"shape": 2},
        "two_object": {"shape": 2},
        "colors": {"colour": 5, "shape": 2},
        "position": {"relation": 1, "shape": 2},
        "color_attr": {"colour": 8, "binding": 1, "shape": 2},
    }
    for rec in all_prompts():
        kinds = Counter(e.kind for e in toy_edits(rec))
        if rec.tag == "counting":
            n = rec.include[0]["count"]
            assert kinds == {"count": 1 if n in (1, 4) else 2, "shape": 2}, rec.prompt
        else:
            assert kinds == expected[rec.tag], rec.prompt


def test_toy_edits_by_hand():
    rec = next(r for r in all_prompts() if r.prompt == "a photo of three triangles")
    got = [(e.kind, e.prompt, e.record.exclude) for e in toy_edits(rec)]
    assert got == [
        ("count", "a photo of two triangles", ({"class": "triangle", "count": 3},)),
        ("count", "a photo of four triangles", ({"class": "triangle", "count": 5},)),
        ("shape", "a photo of three circles", ({"class": "circle", "count": 4},)),
        ("shape", "a photo of three squares", ({"class": "square", "count": 4},)),
    ]
    rec = next(r for r in all_prompts() if r.prompt == "a photo of a square above a circle")
    got = [(e.kind, e.prompt) for e in toy_edits(rec)]
    assert got == [
        ("relation", "a photo of a square below a circle"),
        ("shape", "a photo of a square above a triangle"),
        ("shape", "a photo of a triangle above a circle"),
    ]
    rec = next(r for r in all_prompts() if r.prompt == "a photo of a red circle and a blue square")
    binding = [e for e in toy_edits(rec) if e.kind == "binding"]
    assert [e.prompt for e in binding] == ["a photo of a blue circle and a red square"]
    assert binding[0].detail == "binding red <-> blue"


def test_perpendicular_relation_is_not_a_reliable_negative():
    """Why toy_edits mirrors relations only: some ground-truth scenes of "left of" also satisfy "above"."""
    world = {r.prompt: r for r in all_prompts()}
    left = world["a photo of a square left of a circle"]
    above = world["a photo of a square above a circle"]
    accepted = [s for s in range(40) if score_detections(detect(render_prompt(left, s)), above)["strict"]]
    assert accepted  # the evaluator accepts a "left of" ground truth as "above"
    assert verify_edit(left, Edit("relation", above.prompt, above, "perpendicular"), seeds=accepted) is False
    assert all(e.record.include[1]["position"][0] != "above" for e in toy_edits(left))


def test_verify_edit_detects_a_non_edit_and_bad_input():
    rec = next(r for r in all_prompts() if r.prompt == "a photo of a circle")
    assert verify_edit(rec, Edit("shape", rec.prompt, rec, "not an edit")) is False
    with pytest.raises(ConfigError, match="edit"):
        verify_edit(rec, Edit("shape", "a photo of a square", None, "free text"))
    with pytest.raises(ConfigError, match="seeds"):
        verify_edit(rec, toy_edits(rec)[0], seeds=())
    with pytest.raises(ConfigError, match="not a toy-world prompt"):
        toy_edits(PromptRecord("single_object", "a photo of a dog", ({"class": "dog", "count": 1},)))
    assert toy_module.Edit is Edit  # one type for toy and text edits


# ---------------------------------------------------------------------------------------- free-text edits

# (prompt, max_per_kind, expected [(kind, edited prompt), ...]), written by hand.
TEXT_CASES = [
    ("two cats on a sofa", None, [("count", "one cats on a sofa"), ("count", "three cats on a sofa")]),
    (
        "3 apples and 12 pears",
        None,
        [
            ("count", "2 apples and 12 pears"),
            ("count", "3 apples and 11 pears"),
            ("count", "4 apples and 12 pears"),
            ("count", "3 apples and 13 pears"),
        ],
    ),
    ("a 3D render of 1 cube, 2.5 meters tall", None, [("count", "a 3D render of 2 cube, 2.5 meters tall")]),
    ("someone holds one balloon", 3, [("count", "someone holds two balloon")]),
    ("a red car", 3, [("colour", "a blue car"), ("colour", "a green car"), ("colour", "a yellow car")]),
    (
        "a red cube and a blue ball",
        2,
        [
            ("colour", "a green cube and a blue ball"),
            ("colour", "a red cube and a green ball"),
            ("binding", "a blue cube and a red ball"),
        ],
    ),
    (
        "a red bird next to an orange cat",
        1,
        [("colour", "a blue bird next to an orange cat"), ("binding", "an orange bird next to a red cat")],
    ),
    (
        "an orange and a green apple",
        3,
        [
            ("colour", "an orange and a red apple"),
            ("colour", "an orange and a blue apple"),
            ("colour", "an orange and a yellow apple"),
        ],
    ),
    (
        "a grey cat in front of a white dog",
        1,
        [
            ("colour", "a red cat in front of a white dog"),
            ("relation", "a grey cat behind a white dog"),
            ("binding", "a white cat in front of a grey dog"),
        ],
    ),
    (
        "a dog left of a cat, above a box",
        3,
        [("relation", "a dog right of a cat, above a box"), ("relation", "a dog left of a cat, below a box")],
    ),
    ("A cup on top of a book", 3, [("relation", "A cup under a book")]),
    ("a bird at the top of the tree", 3, [("relation", "a bird at the bottom of the tree")]),
    (
        "Left of the tree stands a Yellow house",
        2,
        [
            ("colour", "Left of the tree stands a Red house"),
            ("colour", "Left of the tree stands a Blue house"),
            ("relation", "Right of the tree stands a Yellow house"),
        ],
    ),
    (
        "TWO RED APPLES",
        2,
        [
            ("colour", "TWO BLUE APPLES"),
            ("colour", "TWO GREEN APPLES"),
            ("count", "ONE RED APPLES"),
            ("count", "THREE RED APPLES"),
        ],
    ),
    (
        "four birds below three clouds",
        3,
        [
            ("count", "three birds below three clouds"),
            ("count", "four birds below two clouds"),
            ("count", "five birds below three clouds"),
            ("relation", "four birds above three clouds"),
        ],
    ),
    ("a photo of a cat", 3, []),
    ("a brightly lit kitchen with a rightward arrow", 3, []),
]


@pytest.mark.parametrize(("prompt", "cap", "expected"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_edits_by_hand(prompt, cap, expected):
    got = text_edits(prompt, max_per_kind=cap)
    assert [(e.kind, e.prompt) for e in got] == expected
    assert all(e.record is None and e.detail for e in got)


def test_text_edit_details_and_caps():
    got = text_edits("two red cubes left of a blue ball")
    assert [e.detail for e in got] == [
        "colour red -> green",
        "colour blue -> green",
        "colour red -> yellow",
        "count two -> one",
        "count two -> three",
        "relation left -> right",
        "binding red <-> blue",
    ]
    assert len(text_edits("a red car", max_per_kind=None)) == 10  # every other colour word
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="max_per_kind"):
            text_edits("a red car", max_per_kind=bad)


# ---------------------------------------------------------------------------------------- user negatives


def test_load_negatives_and_edits_for(tmp_path):
    path = tmp_path / "neg.jsonl"
    lines = [
        {"prompt": " two cats on a sofa ", "negatives": ["two dogs on a sofa", "three cats on a sofa"]},
        {"prompt": "a red car", "negatives": ["a red bus", "a red bus "], "source": "hand"},
    ]
    path.write_text("\ufeff" + json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n", encoding="utf-8")
    neg = load_negatives(path)
    assert neg == {
        "two cats on a sofa": ["two dogs on a sofa", "three cats on a sofa"],
        "a red car": ["a red bus"],
    }

    got = edits_for("two cats on a sofa", neg)
    assert [(e.kind, e.prompt) for e in got] == [
        ("user", "two dogs on a sofa"),
        ("user", "three cats on a sofa"),
        ("count", "one cats on a sofa"),  # "three cats on a sofa" is not repeated as a count edit
    ]
    assert [e.prompt for e in edits_for("a photo of a cat", neg)] == []
    assert [e.prompt for e in edits_for("a cat", {"a cat": ["a cat", "a dog"]})] == ["a dog"]
    assert edits_for("a red car") == text_edits("a red car")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (
            b'{"prompt": "a", "negatives": ["b"]}\n{"prompt": "c", "negatives": ["d"]',
            r"neg\.jsonl:2: not valid JSON",
        ),
        (b'["a", "b"]', r"neg\.jsonl:1: a JSON list, not an object"),
        (b'{"negatives": ["b"]}', r":1: needs a non-empty string 'prompt'"),
        (b'{"prompt": "  ", "negatives": ["b"]}', r":1: needs a non-empty string 'prompt'"),
        (b'{"prompt": "a", "negatives": "b"}', r":1: 'negatives' must be a non-empty list"),
        (b'{"prompt": "a", "negatives": []}', r":1: 'negatives' must be a non-empty list"),
        (b'{"prompt": "a"}', r":1: 'negatives' must be a non-empty list"),
        (b'{"prompt": "a", "negatives": ["b", 3]}', r":1: every negative must be a non-empty string"),
        (b'{"prompt": "a", "negatives": ["b", ""]}', r":1: every negative must be a non-empty string"),
        (b'{"prompt": "a", "negatives": ["a"]}', r":1: a negative equals its prompt"),
        (
            b'{"prompt": "a", "negatives": ["b"]}\n{"prompt": "a", "negatives": ["c"]}',
            r":2: prompt 'a' is already given on line 1",
        ),
        (b"\n  \n", "holds no entries"),
    ],
)
def test_load_negatives_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "neg.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_negatives(path)
    assert err.value.field == "negatives"
    assert str(path) in str(err.value)


def test_load_negatives_rejects_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a negatives file"):
        load_negatives(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_negatives(tmp_path / "missing.jsonl")


def test_cycle_kinds_takes_turns_by_hand():
    """User negatives first as they come, then colour, count, relation, binding, shape in turn, each
    kind's order kept; nothing lost or repeated."""
    from solace.rewards.prompt_edits import Edit, cycle_kinds

    def e(kind, p):
        return Edit(kind, p, None, "")

    edits = [e("colour", "c1"), e("colour", "c2"), e("colour", "c3"), e("shape", "s1"), e("user", "u1")]
    edits += [e("count", "n1"), e("binding", "b1"), e("shape", "s2"), e("user", "u2")]
    got = [x.prompt for x in cycle_kinds(edits)]
    assert got == ["u1", "u2", "c1", "n1", "b1", "s1", "c2", "s2", "c3"]
    assert cycle_kinds([]) == []
    assert [x.prompt for x in cycle_kinds(edits[:3])] == ["c1", "c2", "c3"]  # one kind: unchanged
