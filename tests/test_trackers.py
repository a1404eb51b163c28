"""Experiment trackers through accelerate (`train.log_with`): tensorboard and wandb (offline) side by side
on a toy run, scalars, image grids and the config; clear errors for unknown or missing trackers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from solace.errors import ConfigError
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def _tb(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_tensorboard_and_wandb_offline_side_by_side(weights, tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    extra = {
        "train.log_with": "[tensorboard,wandb]",
        "train.report": True,
        "eval.image_every": 2,
        "eval.prompts_limit": 6,
        "eval.samples_per_prompt": 1,
    }
    tr = Trainer(load_config("toy", tiny_overrides(weights, out, **extra)))
    res = tr.train()
    assert res["evals"][-1]["iteration"] == 2

    # tensorboard where it always wrote: scalars of every iteration and evaluation, the image grids
    ea = _tb(out / "tb")
    tags = ea.Tags()
    assert [e.step for e in ea.Scalars("reward/mean")] == [1, 2]
    assert [e.step for e in ea.Scalars("eval/strict")] == [0, 2]
    assert "images/samples" in tags["images"] and [e.step for e in ea.Images("images/samples")] == [0, 2]
    # the run's config, as accelerate stores it (hparams.yml beside the events)
    hparams = list((out / "tb").rglob("hparams.yml"))
    assert hparams and "train.log_with" in hparams[0].read_text()

    # wandb: one offline run under $WANDB_DIR with its history file, the grid images and the config
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert len(list(run.glob("run-*.wandb"))) == 1
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2  # the grids of 0 and 2
    history = next(run.glob("run-*.wandb")).read_bytes()  # protobuf records: keys are stored as text
    assert b"reward/mean" in history and b"eval/strict" in history and b"train.tracker_project" in history
    assert not tr.acc.trackers  # finished and released at the end of the run


def test_no_tracker_logs_nothing(weights, tmp_path):
    out = tmp_path / "run"
    tr = Trainer(load_config("toy", tiny_overrides(weights, out, **{"train.log_with": "[]"})))
    tr.train()
    assert not (out / "tb").exists() and (out / "log.csv").is_file()


def test_tracker_errors_name_the_field(weights, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^train\.log_with: unknown tracker 'mlflow'"):
        load_config("toy", tiny_overrides(weights, tmp_path / "r", **{"train.log_with": "[mlflow]"}))
    with pytest.raises(ConfigError, match=r"^train\.log_with: names a tracker twice"):
        load_config("toy", tiny_overrides(weights, tmp_path / "r", **{"train.log_with": "[wandb,wandb]"}))
    both = tiny_overrides(weights, tmp_path / "r", **{"train.log_with": "[tensorboard,wandb]"})
    cfg = load_config("toy", both)
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb cannot be imported
    with pytest.raises(ConfigError, match=r"^train\.log_with: wandb is asked for but not installed: pip"):
        Trainer(cfg)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("wandb", ["wandb"]),
        ("tensorboard,wandb", ["tensorboard", "wandb"]),
        ("[wandb]", ["wandb"]),
        ("[]", []),
    ],
)
def test_log_with_takes_a_bare_name_or_a_comma_list_on_the_command_line(value, expected):
    """`train.log_with=wandb` is the list [wandb] (it used to fail with OmegaConf's "AnyNode is not a
    ListConfig"); a bracketed list is unchanged."""
    assert load_config("toy", [f"train.log_with={value}"], check_paths=False).train.log_with == expected


def test_an_unknown_bare_tracker_name_is_still_refused_by_name():
    with pytest.raises(ConfigError, match="train.log_with: unknown tracker 'foo'"):
        load_config("toy", ["train.log_with=foo"], check_paths=False)


def test_a_resumed_run_logs_into_the_same_wandb_run(weights, tmp_path, monkeypatch):
    """`--resume` continues the output folder's wandb run (its id is kept in the folder) instead of
    starting a new one."""
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # wandb keeps the settings (WANDB_DIR) of an earlier test's runs in this process
    out = tmp_path / "run"
    extra = {"train.log_with": "[wandb]", "train.report": False, "train.checkpoint_every": 1}
    Trainer(load_config("toy", tiny_overrides(weights, out, **{**extra, "train.iterations": 1}))).train()
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert len(run_id) == 8
    Trainer(load_config("toy", tiny_overrides(weights, out, **{**extra, "train.iterations": 2}))).train(
        resume=True
    )
    # One folder per process; both write the same run's log. The log's name carries the run id; the
    # folder's name may not end with it (wandb adds "-1" when the resume starts in the same second).
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    logs = [sorted(r.name for r in run.glob("run-*.wandb")) for run in runs]
    assert len(runs) == 2 and logs == [[f"run-{run_id}.wandb"]] * 2, (runs, logs)
