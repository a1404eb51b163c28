"""Minimal edits of free-text prompts: the negatives of a Diffusion-Classifier-style discrimination.

A Diffusion Classifier scores one image under several prompts and asks which prompt the model finds most
likely. For a self-confidence reward that tests *understanding* of a prompt rather than image quality, the
competing prompts should be **minimal edits** of the true one: the same prompt with one attribute changed
("two cats" -> "three cats", "a red cube" -> "a blue cube", "left of" -> "right of"). An image that matches
its prompt should score better under the prompt than under every edit; an image that ignores the attribute
scores the same under both.

This module is the rule-based editor for arbitrary (free-text) prompts, plus an optional user file of
hand-written negatives per prompt. An embedded world with an exact editor on its prompts' metadata registers
it in :data:`EDIT_PROVIDERS`; its edits use the same :class:`Edit` type.

Edit kinds (:data:`KINDS`; the free-text editor makes the first four):

* ``colour``   one colour word replaced by another colour of :data:`COLOUR_WORDS` that the prompt does not
  already use ("a red cube" -> "a blue cube"); a preceding "a"/"an" is fixed ("a red" -> "an orange").
* ``count``    one number word (one..twelve) or small number (1..99) off by one, never below 1
  ("two" -> "one" / "three", "3" -> "2" / "4"). Only the number changes: the noun keeps its number
  ("one cat" -> "two cat").
* ``relation`` one spatial word or phrase replaced by its opposite (:data:`SPATIAL_OPPOSITES`: left <-> right,
  above <-> below, "on top of" <-> "under", "in front of" <-> "behind", "top of" <-> "bottom of";
  "beneath"/"underneath" -> "above"). Symmetric relations ("next to", "near") have no edit.
* ``binding``  two different colour words swapped ("a red cube and a blue ball" -> "a blue cube and a red
  ball"): the same words, bound to the other objects.
* ``shape``    one object's shape replaced (exact edit providers only).

Matching is on whole words (case-insensitive), replacements keep the case pattern of the word they replace
("Red" -> "Blue", "TWO" -> "THREE"), and the output order is fixed, so the same prompt always gives the
same edits. The rules are lexical and say nothing about meaning: "one" as a pronoun ("the one on the
left") or "right" as "correct" are edited too. One exception: a colour word used as a noun ("an orange",
"the orange and ...": after an article and not followed by another word) is left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solace.errors import ConfigError
from solace.registry import Registry

KINDS = ("colour", "count", "relation", "binding", "shape")
USER_KIND = "user"

COLOUR_WORDS = tuple("red blue green yellow black white orange purple pink brown gray".split())
_COLOUR_ALIASES = {"grey": "gray"}
NUMBER_WORDS = tuple("one two three four five six seven eight nine ten eleven twelve".split())
# Each spatial word or phrase and its opposite. Longer phrases are matched first ("on top of" before
# "top of"); "beneath" and "underneath" map to "above" but nothing maps back to them.
SPATIAL_OPPOSITES = {
    "on top of": "under",
    "in front of": "behind",
    "underneath": "above",
    "beneath": "above",
    "bottom of": "top of",
    "top of": "bottom of",
    "above": "below",
    "below": "above",
    "behind": "in front of",
    "under": "on top of",
    "left": "right",
    "right": "left",
}
# Words after which a colour word that follows an article is a noun ("an orange and ...").
_NOUN_FOLLOWERS = {"and", "or", "with", "on", "in", "of", "at", "to", "next", "near", "is", "are"}

_COLOUR_RE = re.compile(r"\b(" + "|".join([*COLOUR_WORDS, *_COLOUR_ALIASES]) + r")\b", re.IGNORECASE)
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
# 1..99 as a standalone token: not part of a word ("3D", "4k"), a decimal ("2.5") or a longer number.
_DIGIT_RE = re.compile(r"(?<![\w.,])([1-9][0-9]?)(?![\w]|[.,][0-9])")
_SPATIAL_RE = re.compile(
    r"\b("
    + "|".join(p.replace(" ", r"\s+") for p in sorted(SPATIAL_OPPOSITES, key=len, reverse=True))
    + r")\b",
    re.IGNORECASE,
)
_ARTICLE_BEFORE_RE = re.compile(r"\b(a|an)(\s+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Edit:
    """One minimal edit of a prompt: a competing prompt for the same image.

    ``kind`` is one of :data:`KINDS` (or ``"user"`` for a negative from :func:`load_negatives`),
    ``prompt`` the edited prompt, ``record`` its metadata record where known (an edit provider's exact edits)
    else ``None``,
    and ``detail`` a short human-readable account of the change ("colour red -> blue").
    """

    kind: str
    prompt: str
    record: Any
    detail: str


def match_case(source: str, word: str) -> str:
    """``word`` in the case pattern of ``source``: all capitals, capitalised, or as given."""
    if len(source) > 1 and source.isupper():
        return word.upper()
    if source[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _canonical_colour(word: str) -> str:
    w = word.lower()
    return _COLOUR_ALIASES.get(w, w)


def _apply(prompt: str, replacements: Iterable[tuple[int, int, str]], fix_article: bool) -> str:
    """Replace the spans (start, end, text), right to left; with ``fix_article``, a directly preceding
    "a"/"an" agrees with the new word ("a red" -> "an orange")."""
    out = prompt
    for start, end, text in sorted(replacements, reverse=True):
        head = out[:start]
        if fix_article:
            m = _ARTICLE_BEFORE_RE.search(head)
            if m:
                article = "an" if text[:1].lower() in "aeiou" else "a"
                head = head[: m.start()] + match_case(m.group(1), article) + m.group(2)
        out = head + text + out[end:]
    return out


def _is_attribute_colour(prompt: str, m: re.Match) -> bool:
    """False for a colour word used as a noun: after an article, and not followed by a word other than a
    connective, unless the connective leads to another colour ("a red and blue ball")."""
    if not _ARTICLE_BEFORE_RE.search(prompt[: m.start()]) and not re.search(
        r"\bthe\s+$", prompt[: m.start()], re.IGNORECASE
    ):
        return True
    words = re.findall(r"[A-Za-z]+", prompt[m.end() :])[:2]
    if not words:
        return False
    if words[0].lower() in ("and", "or") and len(words) > 1 and _COLOUR_RE.fullmatch(words[1]):
        return True
    return words[0].lower() not in _NOUN_FOLLOWERS


def _round_robin(groups: Sequence[Sequence[Edit]]) -> list[Edit]:
    """First candidate of every occurrence, then every second one, ...: a cap keeps every occurrence."""
    out: list[Edit] = []
    for j in range(max((len(g) for g in groups), default=0)):
        out += [g[j] for g in groups if j < len(g)]
    return out


def _colour_edits(prompt: str) -> tuple[list[list[Edit]], list[Edit]]:
    """Per colour occurrence, its colour swaps; and the binding swaps of every pair of different colours."""
    all_matches = list(_COLOUR_RE.finditer(prompt))
    used = {_canonical_colour(m.group(0)) for m in all_matches}
    matches = [m for m in all_matches if _is_attribute_colour(prompt, m)]
    groups: list[list[Edit]] = []
    for m in matches:
        src = m.group(0)
        group = []
        for c in COLOUR_WORDS:
            if c in used:
                continue
            new = _apply(prompt, [(m.start(), m.end(), match_case(src, c))], fix_article=True)
            group.append(Edit("colour", new, None, f"colour {src.lower()} -> {c}"))
        groups.append(group)
    binding: list[Edit] = []
    for i, a in enumerate(matches):
        for b in matches[i + 1 :]:
            if _canonical_colour(a.group(0)) == _canonical_colour(b.group(0)):
                continue
            new = _apply(
                prompt,
                [
                    (a.start(), a.end(), match_case(a.group(0), b.group(0).lower())),
                    (b.start(), b.end(), match_case(b.group(0), a.group(0).lower())),
                ],
                fix_article=True,
            )
            binding.append(
                Edit("binding", new, None, f"binding {a.group(0).lower()} <-> {b.group(0).lower()}")
            )
    return groups, binding


def _count_edits(prompt: str) -> list[list[Edit]]:
    """Per number (word or digits, left to right), the number one lower (if >= 1) and one higher."""
    found: list[tuple[int, int, str, int, bool]] = []
    for m in _NUMBER_WORD_RE.finditer(prompt):
        found.append((m.start(), m.end(), m.group(0), NUMBER_WORDS.index(m.group(0).lower()) + 1, True))
    for m in _DIGIT_RE.finditer(prompt):
        found.append((m.start(), m.end(), m.group(0), int(m.group(0)), False))
    groups = []
    for start, end, src, n, is_word in sorted(found):
        group = []
        for k in (n - 1, n + 1):
            if k < 1 or (is_word and k > len(NUMBER_WORDS)):
                continue
            text = match_case(src, NUMBER_WORDS[k - 1]) if is_word else str(k)
            new = _apply(prompt, [(start, end, text)], fix_article=False)
            group.append(Edit("count", new, None, f"count {src.lower()} -> {text.lower()}"))
        groups.append(group)
    return groups


def _relation_edits(prompt: str) -> list[list[Edit]]:
    """Per spatial word or phrase, its opposite."""
    groups = []
    for m in _SPATIAL_RE.finditer(prompt):
        src = m.group(0)
        phrase = " ".join(src.lower().split())
        opposite = SPATIAL_OPPOSITES[phrase]
        new = _apply(prompt, [(m.start(), m.end(), match_case(src, opposite))], fix_article=False)
        groups.append([Edit("relation", new, None, f"relation {phrase} -> {opposite}")])
    return groups


def _check_max(max_per_kind: int | None) -> None:
    if max_per_kind is not None and (
        isinstance(max_per_kind, bool) or not isinstance(max_per_kind, int) or max_per_kind < 1
    ):
        raise ConfigError("max_per_kind", f"must be an integer >= 1 or None (no cap), got {max_per_kind!r}")


def text_edits(prompt: str, max_per_kind: int | None = 3) -> list[Edit]:
    """The rule-based minimal edits of a free-text prompt, at most ``max_per_kind`` of each kind
    (``None``: all), in the order colour, count, relation, binding.

    Within a kind, the edits go round-robin over the edited words, left to right (first edit of every
    word, then the second of every word, ...), so a cap still edits every word; a word's candidates are in
    list order (:data:`COLOUR_WORDS`; one lower before one higher). No edit equals the prompt or another
    edit. A prompt with nothing to edit gives ``[]``.
    """
    if not isinstance(prompt, str):
        raise ConfigError("prompt", f"must be a string, got {type(prompt).__name__}")
    _check_max(max_per_kind)
    colour_groups, binding = _colour_edits(prompt)
    per_kind = [
        _round_robin(colour_groups),
        _round_robin(_count_edits(prompt)),
        _round_robin(_relation_edits(prompt)),
        binding,
    ]
    out: list[Edit] = []
    seen = {prompt}
    for edits in per_kind:
        kept = 0
        for e in edits:
            if max_per_kind is not None and kept >= max_per_kind:
                break
            if e.prompt in seen:
                continue
            seen.add(e.prompt)
            out.append(e)
            kept += 1
    return out


def load_negatives(path: str | Path) -> dict[str, list[str]]:
    """Read a user file of hand-written negatives, JSON lines ``{"prompt": "...", "negatives": [...]}``.

    Returns ``{prompt: [negative, ...]}`` (strings stripped, duplicate negatives dropped, order kept). Blank
    lines are skipped and other keys ignored. Raises :class:`~solace.errors.ConfigError` (field
    ``negatives``) naming the file, the line and the fix for: a missing file or a folder, text that is not
    UTF-8, a line that is not a JSON object, a missing or empty ``prompt``, ``negatives`` that is not a
    non-empty list of non-empty strings, a negative equal to its prompt, a prompt given twice, and a file
    with no entries.
    """
    field = "negatives"
    shape = 'one JSON object a line: {"prompt": "...", "negatives": ["...", ...]}'
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a negatives file" if p.is_dir() else "does not exist"
        raise ConfigError(field, f"{p} {what}; pass a .jsonl file with {shape}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{p} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    out: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(field, f"{where}: not valid JSON ({e.msg}); write {shape}") from None
        if not isinstance(rec, dict):
            raise ConfigError(field, f"{where}: a JSON {type(rec).__name__}, not an object; write {shape}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(field, f"{where}: needs a non-empty string 'prompt'; write {shape}")
        negs = rec.get("negatives")
        if not isinstance(negs, list) or not negs:
            raise ConfigError(
                field,
                f"{where}: 'negatives' must be a non-empty list of strings (got {negs!r}); write {shape}",
            )
        if not all(isinstance(x, str) and x.strip() for x in negs):
            raise ConfigError(field, f"{where}: every negative must be a non-empty string (got {negs!r})")
        prompt = prompt.strip()
        if prompt in first_line:
            raise ConfigError(
                field,
                f"{where}: prompt {prompt!r} is already given on line {first_line[prompt]}; "
                "put all its negatives on one line",
            )
        clean = list(dict.fromkeys(x.strip() for x in negs))
        if prompt in clean:
            raise ConfigError(field, f"{where}: a negative equals its prompt {prompt!r}; remove it")
        first_line[prompt] = n
        out[prompt] = clean
    if not out:
        raise ConfigError(field, f"{p} holds no entries; write {shape}")
    return out


def edits_for(
    prompt: str, negatives: Mapping[str, Sequence[str]] | None = None, max_per_kind: int | None = 3
) -> list[Edit]:
    """The competing prompts for ``prompt``: its user negatives first (kind ``"user"``, from
    :func:`load_negatives`, looked up by the stripped prompt), then :func:`text_edits`; without duplicates
    and never the prompt itself."""
    out: list[Edit] = []
    seen = {prompt, prompt.strip()}
    user = (negatives or {}).get(prompt.strip(), ())
    for neg in user:
        if neg not in seen:
            seen.add(neg)
            out.append(Edit(USER_KIND, neg, None, "user negative"))
    for e in text_edits(prompt, max_per_kind=max_per_kind):
        if e.prompt not in seen:
            seen.add(e.prompt)
            out.append(e)
    return out


EditProvider = Callable[[str, Mapping], "list[Edit] | None"]
"""``provider(text, meta) -> edits``: the exact minimal edits of a prompt whose metadata the provider knows,
or None (or ``[]``) for a prompt it does not."""

EDIT_PROVIDERS: Registry[EditProvider] = Registry("edit provider", "reward.self_confidence.edits")
"""Exact edit providers by name (registered by plugins), asked in name order for prompts with metadata."""


def provider_edits(text: str, meta: Mapping) -> list[Edit]:
    """The first registered provider's edits of a prompt with metadata ``meta`` ([]: no provider knows it)."""
    for _name, provider in EDIT_PROVIDERS.items():
        edits = provider(text, meta)
        if edits:
            return list(edits)
    return []


def cycle_kinds(edits: Sequence[Edit]) -> list[Edit]:
    """The edits reordered so that kinds take turns: edits of other kinds first as they come (the user's
    negatives), then one edit of each kind of :data:`KINDS` in turn (colour, count, relation, binding,
    shape, colour, ...), each kind's own order kept. The first ``n`` then hold every kind the prompt has
    before any kind's second edit: with a limit of 8, a two-object colour prompt's 8 colour edits no longer
    crowd out its binding and shape edits."""
    turns = [[e for e in edits if e.kind == k] for k in KINDS]
    out = [e for e in edits if e.kind not in KINDS]
    for i in range(max((len(t) for t in turns), default=0)):
        out.extend(t[i] for t in turns if i < len(t))
    return out


def candidate_edits(
    text: str,
    meta: Mapping | None = None,
    negatives: Mapping[str, Sequence[str]] | None = None,
    limit: int = 8,
) -> list[str]:
    """The competing prompts the ``edits`` self-confidence variant scores a sample against, at most
    ``limit`` in a fixed order: for a prompt whose metadata an edit provider knows (:data:`EDIT_PROVIDERS`,
    e.g. an embedded world's exact single-attribute edits) its exact edits, otherwise the user negatives and
    rule edits of :func:`edits_for`; kinds taking turns (:func:`cycle_kinds`), so the limit keeps every kind.
    A prompt with no edit at all (nothing to swap) falls back to the empty
    prompt, so the variant becomes ``S(c) - S(empty)`` for it."""
    edits = provider_edits(text, meta) if meta else []
    if not edits:
        edits = edits_for(text, negatives, max_per_kind=None)
    return [e.prompt for e in cycle_kinds(edits)][:limit] or [""]
