"""Keys that moved (every evaluation setting under ``eval.*``, the update's batching under ``train.*``): an
old key in a YAML file, on the command line or in an ablation condition fails in one line naming the new
key; a checkpoint that recorded a config with the old keys still resumes (its config is read with them
where they live now)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from solace.errors import ConfigError
from solace.trainer.ablate import resolve_condition
from solace.trainer.config import MOVED_KEYS, SolaceConfig, load_config
from solace.trainer.resume_check import check_resume, read_recorded_config, upgrade_recorded_config
from solace.trainer.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

# where each setting lived before, written out here (not derived from MOVED_KEYS, which the tests check)
OLD_TO_NEW = {
    "data.eval_prompts": "eval.prompts",
    "data.eval_prompts_limit": "eval.prompts_limit",
    "sampling.eval_num_steps": "eval.num_steps",
    "sampling.eval_cfg_scale": "eval.cfg_scale",
    "train.eval_every": "eval.every",
    "train.eval_samples_per_prompt": "eval.samples_per_prompt",
    "train.base_eval_cache": "eval.base_cache",
    "train.image_every": "eval.image_every",
    "train.image_prompts": "eval.image_prompts",
    "eval.grid_prompts": "eval.metric_grid_rows",
    "grpo.micro_batch_size": "train.micro_batch_size",
    "grpo.inner_epochs": "train.inner_epochs",
    "grpo.updates_per_iteration": "train.updates_per_iteration",
    "nft.micro_batch_size": "train.micro_batch_size",
    "nft.inner_epochs": "train.inner_epochs",
    "nft.updates_per_iteration": "train.updates_per_iteration",
}


def test_the_table_is_complete_and_every_new_key_exists():
    assert MOVED_KEYS == OLD_TO_NEW
    cfg = asdict(SolaceConfig())
    for old, new in MOVED_KEYS.items():
        section, key = new.split(".")
        assert key in cfg[section], new
        o_section, o_key = old.split(".")
        assert o_key not in cfg[o_section], f"{old} is still in the schema"


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_an_old_key_on_the_command_line_is_one_line_naming_the_new_and_exit_code_2(old, tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app

    res = CliRunner().invoke(app, ["config", "check", "toy", f"{old}=1"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output[-1500:]
    assert lines == [f"error: {old}: moved to {OLD_TO_NEW[old]}; rename it (in the overrides)"]


def test_an_old_key_given_to_solace_train_fails_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app

    out = tmp_path / "run"
    args = ["train", "--config", "toy_quick", "train.eval_every=5", f"train.output_dir={out}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and not out.exists(), res.output[-1500:]
    assert res.output.strip() == "error: train.eval_every: moved to eval.every; rename it (in the overrides)"


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_an_old_key_in_a_yaml_file_names_the_new_key_and_the_file(old, tmp_path):
    section, key = old.split(".")
    path = tmp_path / "mine.yaml"
    path.write_text(f"defaults: [toy.yaml]\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), check_paths=False)
    assert e.value.field == old and "\n" not in str(e.value)
    assert str(e.value) == f"{old}: moved to {OLD_TO_NEW[old]}; rename it (in {path.resolve()})"


def test_an_old_key_in_a_preset_it_inherits_from_is_named_too(tmp_path):
    (tmp_path / "base.yaml").write_text("defaults: [toy.yaml]\nsampling: {eval_num_steps: 12}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrain: {iterations: 3}\n")
    moved = r"^sampling\.eval_num_steps: moved to eval\.num_steps; rename it \(in .*base\.yaml\)$"
    with pytest.raises(ConfigError, match=moved):
        load_config(str(tmp_path / "child.yaml"), check_paths=False)


def test_an_old_key_in_an_ablation_condition_names_the_new_key(tmp_path):
    cond = tmp_path / "cond.yaml"
    cond.write_text("sampling: {cfg_scale: 1.0, eval_cfg_scale: 7.0}\n")
    with pytest.raises(ConfigError, match=r"^sampling\.eval_cfg_scale: moved to eval\.cfg_scale; rename it"):
        resolve_condition(str(cond))
    cond.write_text("sampling: {cfg_scale: 1.0}\neval: {cfg_scale: 7.0}\n")
    assert resolve_condition(str(cond)).layer.eval.cfg_scale == 7.0


def test_the_new_keys_set_what_the_old_ones_did():
    cfg = load_config(
        "toy",
        ["eval.every=5", "eval.num_steps=12", "eval.cfg_scale=3.0", "eval.image_prompts=a cat,a dog"]
        + ["eval.metric_grid_rows=2", "train.micro_batch_size=4", "train.updates_per_iteration=2"],
        check_paths=False,
    )
    assert (cfg.eval.every, cfg.eval.num_steps, cfg.eval.cfg_scale) == (5, 12, 3.0)
    assert cfg.eval.image_prompts == ["a cat", "a dog"] and cfg.eval.metric_grid_rows == 2
    assert (cfg.train.micro_batch_size, cfg.train.updates_per_iteration) == (4, 2)
    with pytest.raises(ConfigError, match=r"^eval\.num_steps: must be >= 1"):
        load_config("toy", ["eval.num_steps=0"], check_paths=False)
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: must be >= 1"):
        load_config("toy", ["train.micro_batch_size=0"], check_paths=False)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("eval.evry=5", "Key 'evry' not in 'EvalCfg'"),  # a new key misspelt
        ("train.micro_batch=4", "Key 'micro_batch' not in 'TrainCfg'"),
        ("train.eval_evry=5", "Key 'eval_evry' not in 'TrainCfg'"),  # no old key either: unknown, not moved
    ],
)
def test_a_misspelt_key_still_fails_as_unknown(override, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config("toy", [override], check_paths=False)
    assert "moved to" not in str(e.value)


def _as_recorded_before(new: dict) -> dict:
    """A config dict as an earlier version recorded it: the moved settings where they lived then (both
    updates' sections held the batching fields; the inactive one kept its defaults)."""
    old = json.loads(json.dumps(new))
    e, t = old["eval"], old["train"]
    old["data"].update(eval_prompts=e.pop("prompts"), eval_prompts_limit=e.pop("prompts_limit"))
    old["sampling"].update(eval_num_steps=e.pop("num_steps"), eval_cfg_scale=e.pop("cfg_scale"))
    t.update(eval_every=e.pop("every"), eval_samples_per_prompt=e.pop("samples_per_prompt"))
    t.update(base_eval_cache=e.pop("base_cache"), image_every=e.pop("image_every"))
    t["image_prompts"] = e.pop("image_prompts")
    e["grid_prompts"] = e.pop("metric_grid_rows")
    batching = {k: t.pop(k) for k in ("micro_batch_size", "inner_epochs", "updates_per_iteration")}
    active = "nft" if t["algorithm"] == "nft" else "grpo"
    for section in ("grpo", "nft"):
        old[section].update(batching if section == active else {k: 8 for k in batching})
    return old


@pytest.mark.parametrize("algorithm", ["flow_grpo", "nft"])
def test_a_recorded_config_with_the_old_keys_reads_as_the_new_one(algorithm):
    cfg = load_config(
        "toy",
        ["eval.every=7", "eval.num_steps=12", "eval.prompts_limit=6", "eval.image_prompts=[x]"]
        + [f"train.algorithm={algorithm}", "train.micro_batch_size=3", "train.inner_epochs=2"]
        + (["sampling.noise_level=0"] if algorithm == "nft" else []),
        check_paths=False,
    )
    new = asdict(cfg)
    old = _as_recorded_before(new)
    assert upgrade_recorded_config(old) == new and old == _as_recorded_before(new)  # a copy
    assert read_recorded_config(old) == new
    assert check_resume(read_recorded_config(old), new) == []
    changed = {**new, "eval": {**new["eval"], "num_steps": 20}}
    with pytest.raises(ConfigError, match=r"eval\.num_steps: 12 -> 20 \(evaluation only"):
        check_resume(read_recorded_config(old), changed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def test_a_checkpoint_of_an_earlier_version_resumes(weights, tmp_path):
    """A run checkpointed by a version with the old keys (its state.json config and inputs.json) resumes
    into more iterations without a listed change; a changed moved setting is still refused, by its new
    name."""
    prompts = tmp_path / "held.jsonl"
    prompts.write_text((HERE.parent / "bench" / "data" / "heldout_2_per_category.jsonl").read_text())
    out = tmp_path / "r"
    extra = {"eval.prompts": str(prompts), "eval.prompts_limit": 2, "eval.samples_per_prompt": 1}

    def cfg(**more: object):
        return load_config("toy", tiny_overrides(weights, out, **{**extra, **more}))

    Trainer(cfg(**{"train.iterations": 1})).train()
    state_path = out / "checkpoints" / "iter_000001" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"] = _as_recorded_before(state["config"])
    assert "eval_prompts" in state["config"]["data"] and "micro_batch_size" in state["config"]["grpo"]
    state_path.write_text(json.dumps(state))
    inputs = json.loads((out / "inputs.json").read_text())
    (out / "inputs.json").write_text(json.dumps({"data.eval_prompts": inputs.pop("eval.prompts"), **inputs}))

    with pytest.raises(ConfigError, match=r"eval\.samples_per_prompt: 1 -> 2"):
        Trainer(cfg(**{"train.iterations": 2, "eval.samples_per_prompt": 2})).train(resume=True)
    trainer = Trainer(cfg(**{"train.iterations": 2}))
    warned: list[str] = []
    trainer._warn = warned.append  # type: ignore[method-assign]
    res = trainer.train(resume=True)
    assert res["iterations"] == 2 and warned == ["--resume: train.iterations: 1 -> 2"]
