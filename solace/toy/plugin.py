"""The toy world as a solace plugin (entry point ``toy`` of ``solace.plugins``): importing this module
registers what the toy world brings (its reward so far; its model family, prompt sets, evaluator and edits
as they move behind the registries)."""

from solace.toy import reward  # noqa: F401 - registers the toy_geneval reward
