"""Exact minimal edits of toy-world prompts, each a valid :class:`~solace.toy.world.PromptRecord`.

What they are for: a Diffusion-Classifier-style discrimination scores the same image under its true prompt
and under minimal edits of it (one attribute changed). A model that understands the prompt finds a
matching image more likely under the true prompt than under every edit. In the toy world the edits are
exact: each is a prompt of the world (GenEval metadata ``tag``/``include``/``exclude`` and the world's own
template wording, taken from :func:`~solace.toy.world.all_prompts`), and :func:`verify_edit` checks with
the exact evaluator that a ground-truth image of the original prompt is *wrong* for the edit.

Kinds (:data:`~solace.rewards.prompt_edits.KINDS`), by category:

=================  ==========================================================================
``single_object``  shape (2)
``two_object``     shape (2: one object's shape, never to the other object's shape)
``counting``       count (n - 1 and n + 1 within 1..4; the exclude moves with it), shape (2)
``colors``         colour (5), shape (2)
``position``       relation (1: mirrored), shape (2)
``color_attr``     colour (8: one object's colour to a colour neither object has), binding (1), shape (2)
=================  ==========================================================================

An edit that would leave the world (two objects of one shape in ``two_object``, ``position`` or
``color_attr``; two objects of one colour in ``color_attr``; a count of 0 or 5) has no prompt in the world's
templates and is not made.

Relations: only the **mirror** on the same axis (left of <-> right of, above <-> below) is an edit. The
other axis ("left of" -> "above") is excluded: a ground-truth scene puts the object 9-22 px along the
relation's axis but up to 4 px across it, more than the evaluator's 3 px margin, so some ground-truth
scenes of "a square left of a circle" also satisfy "a square above a circle" and the evaluator accepts
them (4 of the first 40 seeds; ``tests/test_edits.py`` finds such a scene). A mirror with two objects
of the same class and colour would be satisfied by any scene of the original (swap the roles) and is not
made either; the toy world has no such prompt. Swapping the two objects ("a circle left of a square") is
the same scene as the mirror and is not a separate edit.

By construction, every edit made is rejected, strictly and under GenEval's lenient rules too, on every
ground-truth scene of the original that the evaluator reads correctly: the scene lacks the edited shape,
colour or colour binding, has too few objects or hits the count exclude, or has its object 9+ px on the
wrong side. :func:`verify_edit` checks this on rendered scenes (all 2,238 edits of the world's prompts pass
on seeds 0-2).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache, lru_cache

from solace.errors import ConfigError
from solace.rewards.prompt_edits import KINDS, Edit
from solace.toy.evaluator import Detection, detect, score_detections
from solace.toy.render import render_prompt
from solace.toy.world import COLORS, NUMBERS, SHAPES, PromptRecord, all_prompts

__all__ = ["MIRROR", "Edit", "provider", "toy_edits", "verify_edit"]

MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DEFAULT_SEEDS = (0, 1, 2)


def _key(tag: str, include: Iterable[dict], exclude: Iterable[dict]) -> str:
    return json.dumps([tag, list(include), list(exclude)], sort_keys=True)


@cache
def _world() -> dict[str, PromptRecord]:
    return {_key(r.tag, r.include, r.exclude): r for r in all_prompts()}


def _lookup(tag: str, include: Sequence[dict], exclude: Sequence[dict]) -> PromptRecord | None:
    return _world().get(_key(tag, include, exclude))


def _with(items: Sequence[dict], i: int, **changes) -> tuple[dict, ...]:
    return tuple({**item, **changes} if j == i else dict(item) for j, item in enumerate(items))


def _colour(rec: PromptRecord) -> Iterator[tuple[tuple[dict, ...], tuple[dict, ...], str]]:
    for i, item in enumerate(rec.include):
        if "color" not in item:
            continue
        for c in COLORS:
            if c != item["color"]:
                yield _with(rec.include, i, color=c), rec.exclude, f"colour {item['color']} -> {c}"


def _count(rec: PromptRecord) -> Iterator[tuple[tuple[dict, ...], tuple[dict, ...], str]]:
    for i, item in enumerate(rec.include):
        n = int(item["count"])
        for k in (n - 1, n + 1):
            if k not in NUMBERS:
                continue
            # GenEval's counting exclude is "count + 1 of the same object": it moves with the count.
            exclude = tuple(
                {**e, "count": k + 1}
                if e.get("class") == item["class"]
                and e.get("color") == item.get("color")
                and e["count"] == n + 1
                else dict(e)
                for e in rec.exclude
            )
            yield _with(rec.include, i, count=k), exclude, f"count {NUMBERS[n]} -> {NUMBERS[k]}"


def _relation(rec: PromptRecord) -> Iterator[tuple[tuple[dict, ...], tuple[dict, ...], str]]:
    for i, item in enumerate(rec.include):
        if "position" not in item:
            continue
        rel, j = item["position"][0], int(item["position"][1])
        other = rec.include[j]
        if item["class"] == other["class"] and item.get("color") == other.get("color"):
            continue  # mirrored, the same two objects satisfy it with their roles swapped
        mirrored = _with(rec.include, i, position=[MIRROR[rel], j])
        yield mirrored, rec.exclude, f"relation {rel} -> {MIRROR[rel]}"


def _binding(rec: PromptRecord) -> Iterator[tuple[tuple[dict, ...], tuple[dict, ...], str]]:
    inc = rec.include
    for i in range(len(inc)):
        for j in range(i + 1, len(inc)):
            a, b = inc[i], inc[j]
            if "color" in a and "color" in b and a["color"] != b["color"] and a["class"] != b["class"]:
                swapped = _with(_with(inc, i, color=b["color"]), j, color=a["color"])
                yield swapped, rec.exclude, f"binding {a['color']} <-> {b['color']}"


def _shape(rec: PromptRecord) -> Iterator[tuple[tuple[dict, ...], tuple[dict, ...], str]]:
    for i, item in enumerate(rec.include):
        for s in SHAPES:
            if s == item["class"]:
                continue
            exclude = tuple(
                {**e, "class": s} if e.get("class") == item["class"] else dict(e) for e in rec.exclude
            )
            yield _with(rec.include, i, **{"class": s}), exclude, f"shape {item['class']} -> {s}"


_MAKERS = {"colour": _colour, "count": _count, "relation": _relation, "binding": _binding, "shape": _shape}
assert tuple(_MAKERS) == KINDS


def toy_edits(record: PromptRecord) -> list[Edit]:
    """Every single-attribute minimal edit of a toy-world prompt (see the module docstring for the kinds
    per category and the relation edits left out), in the order of
    :data:`~solace.rewards.prompt_edits.KINDS`, then object by object, then in vocabulary order. Each
    edit's ``record`` is the world's own record (metadata and template wording; no ``meta``); no edit
    repeats another or the original prompt.

    ``record`` must be a prompt of the toy world (its metadata one of
    :func:`~solace.toy.world.all_prompts`'s, like every held-out and training prompt); free text goes to
    :func:`solace.rewards.prompt_edits.text_edits`.
    """
    if _lookup(record.tag, record.include, record.exclude) is None:
        raise ConfigError(
            "record",
            f"{record.prompt!r} ({record.tag}) is not a toy-world prompt: its metadata matches none of "
            "solace.toy.world.all_prompts(); use solace.rewards.prompt_edits.text_edits for free text",
        )
    out: list[Edit] = []
    seen = {record.prompt}
    for kind, make in _MAKERS.items():
        for include, exclude, detail in make(record):
            edited = _lookup(record.tag, include, exclude)
            if edited is None or edited.prompt in seen:
                continue
            seen.add(edited.prompt)
            out.append(Edit(kind, edited.prompt, edited, detail))
    return out


@lru_cache(maxsize=4096)
def _ground_truth(record_json: str, seed: int) -> tuple[Detection, ...]:
    return tuple(detect(render_prompt(PromptRecord.from_json(json.loads(record_json)), seed)))


def verify_edit(original: PromptRecord, edit: Edit, seeds: Sequence[int] = DEFAULT_SEEDS) -> bool:
    """Does the exact evaluator tell the edit from the original on ground-truth images? For each seed, a
    ground-truth scene of ``original`` is rendered (:func:`~solace.toy.render.render_prompt`) and detected;
    true if every one is accepted (strict) under ``original`` and rejected (strict) under ``edit.record``.
    Detections are cached per (record, seed)."""
    if edit.record is None:
        raise ConfigError("edit", f"{edit.prompt!r} has no record: verify_edit checks toy edits only")
    if not seeds:
        raise ConfigError("seeds", "give at least one seed, e.g. seeds=(0, 1, 2)")
    key = json.dumps(original.to_json(), sort_keys=True)
    for seed in seeds:
        dets = _ground_truth(key, int(seed))
        if not score_detections(dets, original)["strict"] or score_detections(dets, edit.record)["strict"]:
            return False
    return True


def provider(text: str, meta: Mapping) -> list[Edit]:
    """The toy world's edit provider (registered as ``toy``): :func:`toy_edits` of a prompt whose GenEval
    metadata (``tag``, ``include``) is a toy-world prompt; [] for any other (free text gets rule edits)."""
    if "include" not in meta or "tag" not in meta:
        return []
    try:
        return toy_edits(PromptRecord.from_json(dict(meta)))
    except (ConfigError, KeyError, ValueError, TypeError):
        return []  # GenEval metadata outside the toy world's vocabulary
