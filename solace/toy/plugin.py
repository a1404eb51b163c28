"""The toy world as a solace plugin (entry point ``toy`` of ``solace.plugins``): importing this module
registers everything the toy world brings: its model family (``model.family: toy``, which ``auto`` picks for
the embedded default ``model.name`` or a toy ``.safetensors`` file), its prompt sets (``toy``,
``toy_heldout``, ``toy_train_eval``), its exact evaluator (``eval.evaluator=toy``), its verified prompt
edits, its reward (``toy_geneval``) and the ``solace toy`` commands."""

from __future__ import annotations

from solace.cli.plugins import COMMANDS
from solace.evaluation.evaluators import EVALUATORS
from solace.evaluation.metrics_eval import METADATA_METRICS, PAPER_NAMES
from solace.models.family import FAMILIES, ModelFamily
from solace.prompts import PROMPT_SETS, Prompt, PromptSet
from solace.rewards.prompt_edits import EDIT_PROVIDERS
from solace.toy import cli, edits, evaluate
from solace.toy import reward as _reward  # noqa: F401 - registers the toy_geneval reward
from solace.toy.adapter import TOY_SIZES, base_weights_file, is_toy_model, load_toy
from solace.toy.world import (
    PromptRecord,
    balanced_subset,
    load_heldout,
    sample_train_prompt,
    train_eval_prompts,
)

FAMILIES.register(
    "toy",
    ModelFamily(load=load_toy, recognises=is_toy_model, sizes=TOY_SIZES, weights_file=base_weights_file),
)


def _prompts(records: list[PromptRecord] | tuple[PromptRecord, ...]) -> list[Prompt]:
    """Records as prompts carrying their GenEval metadata."""
    return [Prompt(r.prompt, r.to_json()) for r in records]


PROMPT_SETS.register(
    "toy",
    PromptSet(
        "the toy world's training distribution (fresh prompts every iteration)",
        draw=lambda rng: _prompts([sample_train_prompt(rng)])[0],
    ),
)
PROMPT_SETS.register(
    "toy_heldout",
    PromptSet(
        "the toy world's held-out compositions (an evaluation limit takes them round-robin over categories)",
        fixed=lambda: _prompts(load_heldout()),
        evaluation=lambda limit: _prompts(balanced_subset(load_heldout(), limit)),
    ),
)
PROMPT_SETS.register(
    "toy_train_eval",
    PromptSet(
        "fresh prompts of the toy world's training distribution (64, or the evaluation limit)",
        evaluation=lambda limit: _prompts(train_eval_prompts(limit or 64)),
    ),
)
EVALUATORS.register("toy", evaluate.ToyEvaluatorPlugin())
EDIT_PROVIDERS.register("toy", edits.provider)
COMMANDS.register("toy", cli.app)
PAPER_NAMES["toy_geneval"] = "GenEval (toy)"
METADATA_METRICS.add("toy_geneval")
