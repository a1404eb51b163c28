"""The toy world as a solace plugin (entry point ``toy`` of ``solace.plugins``): importing this module
registers what the toy world brings: its model family (``model.family: toy``, which ``auto`` picks for the
embedded default ``model.name`` or a toy ``.safetensors`` file) and its reward so far; its prompt sets,
evaluator and edits as they move behind the registries."""

from solace.models.family import FAMILIES, ModelFamily
from solace.toy import reward  # noqa: F401 - registers the toy_geneval reward
from solace.toy.adapter import TOY_SIZES, is_toy_model, load_toy

FAMILIES.register("toy", ModelFamily(load=load_toy, recognises=is_toy_model, sizes=TOY_SIZES))
