"""The registries a plugin fills (prompt sets, evaluators, edit providers, command groups): a plugin's entries
are used by name, the generic code asks them instead of naming a world, and a wrong name fails in one line."""

import random

import numpy as np
import pytest
from typer.testing import CliRunner

from solace.cli.main import app
from solace.defaults import default
from solace.errors import ConfigError
from solace.evaluation.evaluators import EVALUATORS, EvalSetup, EvaluatorPlugin, evaluator_kind, find_judge
from solace.prompts import PROMPT_SETS, Prompt, PromptSet, PromptSource, evaluation_prompts, fixed_prompts
from solace.rewards.prompt_edits import EDIT_PROVIDERS, Edit, candidate_edits
from solace.toy.render import render_prompt
from solace.toy.world import load_heldout


@pytest.fixture
def prompt_set(monkeypatch):
    """A plugin's prompt sets: a distribution and a fixed list with its own evaluation subset."""
    drawn = PromptSet("numbers", draw=lambda rng: Prompt(f"n{rng.randrange(1000)}", {"k": 1}))
    fixed = PromptSet(
        "three fixed prompts",
        fixed=lambda: [Prompt(t) for t in ("a", "b", "c")],
        evaluation=lambda limit: [Prompt(t) for t in ("c", "b", "a")][: limit or 3],
    )
    monkeypatch.setitem(PROMPT_SETS._entries, "test_drawn", drawn)
    monkeypatch.setitem(PROMPT_SETS._entries, "test_fixed", fixed)


def test_prompt_sets_by_name_feed_training_and_evaluation(prompt_set):
    src = PromptSource("test_drawn", seed=3)
    rng = random.Random(3 * 1_000_003 + 5)
    assert [p.text for p in src.for_iteration(5, 4)] == [f"n{rng.randrange(1000)}" for _ in range(4)]
    assert src.for_iteration(5, 4) == PromptSource("test_drawn", seed=3).for_iteration(5, 4)
    # a fixed list: every prompt once per epoch, the set's own evaluation subset
    fixed = PromptSource("test_fixed", seed=0)
    assert sorted(p.text for p in fixed.for_iteration(0, 3)) == ["a", "b", "c"]
    assert [p.text for p in evaluation_prompts("test_fixed", 2)] == ["c", "b"]
    assert [p.text for p in fixed_prompts("test_fixed", 2)] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^eval.prompts: 'test_drawn' has no evaluation prompts"):
        evaluation_prompts("test_drawn")
    with pytest.raises(ConfigError, match=r"^--prompts: 'test_drawn' is a distribution"):
        fixed_prompts("test_drawn")
    # a name that is no set is a file, read by the one reader
    with pytest.raises(ConfigError, match=r"^data.train_prompts: .*test_nothing does not exist"):
        PromptSource("test_nothing", seed=0)


def test_the_toy_world_prompt_sets_match_its_records():
    held = load_heldout()
    assert [p.text for p in fixed_prompts("toy_heldout", 5)] == [r.prompt for r in held[:5]]
    assert all(p.meta["tag"] and p.meta["include"] for p in evaluation_prompts("toy_train_eval", 4))
    assert len(evaluation_prompts("toy_train_eval")) == 64
    assert default("data.train_prompts") in PROMPT_SETS and default("eval.prompts") in PROMPT_SETS


class _Exact(EvaluatorPlugin):
    description = "a test world's exact evaluator"

    def problem(self, setup):
        if setup.family != "test_family":
            return ConfigError("eval.evaluator", f"scores test_family only, not {setup.model!r}")
        return None

    def build(self, setup, adapter, cache, shards):  # pragma: no cover - not built here
        raise AssertionError


def _setup(**kw) -> EvalSetup:
    return EvalSetup(**{"model": "m", "family": "test_family", "prompts": "toy_heldout", **kw})


def test_auto_asks_every_registered_evaluator_and_a_forced_one_must_fit(monkeypatch, tmp_path):
    monkeypatch.setitem(EVALUATORS._entries, "test_exact", _Exact())
    assert evaluator_kind(_setup()) == "test_exact"
    assert evaluator_kind(_setup(metrics=("clip_score",))) == "metrics"
    assert evaluator_kind(_setup(family="other")) == "none"
    assert evaluator_kind(_setup(evaluator="test_exact")) == "test_exact"
    with pytest.raises(ConfigError, match=r"^eval.evaluator: scores test_family only, not 'm'"):
        evaluator_kind(_setup(evaluator="test_exact", family="other"))
    with pytest.raises(ConfigError, match=r"^eval.evaluator: no evaluator named 'nope'; use one of auto, "):
        evaluator_kind(_setup(evaluator="nope"))
    # the toy world's evaluator answers for its own model and prompts only
    assert evaluator_kind(_setup(family="toy")) == "toy"
    plain = tmp_path / "plain.txt"
    plain.write_text("a red cube\n")
    assert evaluator_kind(_setup(family="toy", prompts=str(plain))) == "none"
    with pytest.raises(ConfigError, match=r"^eval.prompts: eval.evaluator=toy needs GenEval"):
        evaluator_kind(_setup(family="toy", evaluator="toy", prompts=str(plain)))


def test_the_judge_of_exactly_scored_prompts(tmp_path):
    import torch

    recs = list(load_heldout()[:2])
    prompts = [Prompt(r.prompt, r.to_json()) for r in recs]
    judge = find_judge(prompts, "toy")
    assert judge is not None and list(judge.tags) == [r.tag for r in recs]
    truth = (
        torch.from_numpy(np.stack([render_prompt(recs[0], s) for s in range(3)])).permute(0, 3, 1, 2) / 255
    )
    assert judge.correct(truth.float(), 0).all() and not judge.correct(truth.float(), 1).any()
    assert find_judge(prompts, "sd3") is None  # another model: no exact judge
    assert find_judge([Prompt("a cat")], "toy") is None  # free text: nothing to judge


def test_edit_providers_answer_for_the_prompts_they_know(monkeypatch):
    def provider(text, meta):
        return [Edit("count", f"{text}, twice", None, "test")] if meta.get("mine") else []

    monkeypatch.setitem(EDIT_PROVIDERS._entries, "aaa_test", provider)
    assert candidate_edits("two cats", {"mine": True}) == ["two cats, twice"]
    assert candidate_edits("two cats", {"other": True}, limit=2) == ["one cats", "three cats"]  # rules
    rec = load_heldout()[0]
    assert candidate_edits(rec.prompt, rec.to_json())[0] != rec.prompt  # the toy world's own edits


def test_plugin_command_groups_are_mounted():
    res = CliRunner().invoke(app, ["toy", "--help"])
    assert res.exit_code == 0 and "pretrain" in res.output
    res = CliRunner().invoke(app, ["nothing_registered", "--help"])
    assert res.exit_code != 0
