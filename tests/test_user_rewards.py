"""Rewards from user code: a reward component may name ``package.module:function``, a factory with the
registry's contract. It trains (its values are what the function returns) and ``solace config check``
resolves it without loading a model, failing in one line on a bad name, module, function or keyword."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.evaluation.metrics_eval import build_metrics, parse_metric_args
from solace.rewards.components import reward_scores
from solace.rewards.registry import build_reward, check_reward
from solace.trainer.config import load_config

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

USER_MODULE = '''
import torch

CALLS = []  # (images shape, prompts, returned scores) of every call, for the test to compare


def brightness(scale: float = 1.0, offset: float = 0.0):
    """Mean pixel value of each image, scaled."""

    def fn(images, prompts, metadata=None):
        out = scale * images.float().mean(dim=(1, 2, 3)) + offset
        CALLS.append((tuple(images.shape), list(prompts), out.clone()))
        return out

    return fn


def needs_target(target: str):
    return lambda images, prompts, metadata=None: torch.zeros(len(images))


def one_number():
    return lambda images, prompts, metadata=None: 1.0


def returns_int():
    return 3


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package ``user_rewards_pkg`` with the module ``rewards`` (and one that fails to import), on
    ``sys.path``; imported fresh for every test."""
    pkg = tmp_path / "code" / "user_rewards_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(USER_MODULE)
    (pkg / "broken.py").write_text("import torch\nraise RuntimeError('the module is broken\\nsecond line')\n")
    (pkg / "needs_dep.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    for name in [m for m in sys.modules if m.startswith("user_rewards_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    yield "user_rewards_pkg"
    for name in [m for m in sys.modules if m.startswith("user_rewards_pkg")]:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def test_dotted_reward_trains_and_logs_what_the_function_returns(user_pkg, weights, tmp_path):
    name = f"{user_pkg}.rewards:brightness"
    components = f"reward.components=[{{name: '{name}', weight: 1.0, kwargs: {{scale: 2.0, offset: 0.5}}}}]"
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--config", "toy", *tiny_overrides(weights, out), components])
    assert res.exit_code == 0, res.output
    calls = sys.modules[f"{user_pkg}.rewards"].CALLS
    assert len(calls) == 2  # one scored batch per iteration (2 iterations, 8 samples each)
    for shape, prompts, _ in calls:
        assert shape == (8, 3, 32, 32) and len(prompts) == 8 and all(isinstance(p, str) for p in prompts)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row, (_, _, scores) in zip(rows, calls, strict=True):
        assert 0.5 <= float(scores.min()) and float(scores.max()) <= 2.5  # 2 * mean pixel + 0.5
        # the only component, weight 1: the logged reward is the function's own values
        assert float(row[f"reward/{name}_mean"]) == pytest.approx(float(scores.mean()), rel=1e-6)
        assert float(row["reward/mean"]) == pytest.approx(float(scores.mean()), rel=1e-6)
        assert float(row["reward/std"]) == pytest.approx(float(scores.std()), rel=1e-5)


def test_user_reward_from_a_yaml_preset_passes_config_check(user_pkg, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        textwrap.dedent(
            f"""\
            defaults: [toy.yaml]
            reward:
              components:
                - {{name: self_confidence, weight: 1.0}}
                - {{name: "{user_pkg}.rewards:brightness", weight: 0.5, kwargs: {{scale: 3}}}}
            """
        )
    )
    res = CliRunner().invoke(app, ["config", "check", str(preset)])
    assert res.exit_code == 0, res.output
    cfg = load_config(str(preset))
    assert cfg.reward.components[1].name == f"{user_pkg}.rewards:brightness"


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize(
    "component,field,says",
    [
        ("{name: '{pkg}.rewards:brightnes'}", ".name", "has no 'brightnes'; it defines: brightness"),
        ("{name: 'no_such_pkg.rewards:brightness'}", ".name", "no module named 'no_such_pkg'"),
        ("{name: '{pkg}.nope:brightness'}", ".name", "no module named 'user_rewards_pkg.nope'"),
        ("{name: '{pkg}.broken:fn'}", ".name", "RuntimeError: the module is broken"),
        ("{name: '{pkg}.needs_dep:fn'}", ".name", "a_dependency_that_is_not_installed"),
        ("{name: '{pkg}.rewards:NOT_A_FUNCTION'}", ".name", "not a factory"),
        ("{name: '{pkg}.rewards brightness'}", ".name", "unknown reward"),
        ("{name: '{pkg}.rewards:bright-ness'}", ".name", "package.module:function"),
        ("{name: '{pkg}.rewards:brightness', kwargs: {scael: 2}}", ".kwargs", "no keyword scael"),
        ("{name: '{pkg}.rewards:needs_target'}", ".kwargs", "target"),
    ],
)
def test_config_check_fails_in_one_line_naming_the_component(user_pkg, component, field, says):
    comp = component.replace("{pkg}", user_pkg)
    res = CliRunner().invoke(
        app, ["config", "check", "toy", f"reward.components=[{{name: self_confidence}}, {comp}]"]
    )
    text = _one_line_error(res)
    assert f"reward.components[1]{field}" in text and says in text, text


def test_check_and_build_through_the_registry(user_pkg):
    name = f"{user_pkg}.rewards:brightness"
    check_reward(name, {"scale": 2.0})  # resolves without calling the factory
    assert sys.modules[f"{user_pkg}.rewards"].CALLS == []
    fn = build_reward(name, scale=2.0)
    images = torch.full((3, 3, 4, 4), 0.25)
    assert torch.equal(fn(images, ["a", "b", "c"]), torch.full((3,), 0.5))
    with pytest.raises(ConfigError, match="shape \\(3,\\)"):  # one number for three images
        reward_scores(name, build_reward(f"{user_pkg}.rewards:one_number")(images, ["a"] * 3), 3)
    with pytest.raises(ConfigError, match="returned a int"):  # a factory that returns no function
        build_reward(f"{user_pkg}.rewards:returns_int")


def test_eval_metrics_accept_user_factories(user_pkg):
    name = f"{user_pkg}.rewards:brightness"
    args = parse_metric_args([f"{name}.scale=4", "clip_score.model=/m"], [name, "clip_score"])
    assert args == {name: {"scale": 4}, "clip_score": {"model": "/m"}}
    fns = build_metrics([name], {name: {"scale": 4}})
    assert torch.equal(fns[name](torch.ones(2, 3, 4, 4), ["a", "b"]), torch.full((2,), 4.0))
    with pytest.raises(ConfigError, match="no module named"):
        build_metrics(["nowhere_pkg:fn"])
    with pytest.raises(ConfigError, match="takes no argument 'scael'"):
        build_metrics([name], {name: {"scael": 4}})
