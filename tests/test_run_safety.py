"""A run is never lost and never silently wrong (issue 17), end to end on a tiny toy model: non-finite
rewards, resume safety, signals, one run per folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from solace.errors import ConfigError
from solace.rewards.registry import register_reward
from solace.trainer.config import load_config
from solace.trainer.runlock import RunLock
from solace.trainer.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import TINY_NFT, make_tiny_toy_weights, tiny_overrides  # noqa: E402

SCRIPT = HERE / "run_tiny_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@register_reward("test_nonfinite")
def _nonfinite(value: str = "nan", every: bool = False):
    """Sample 0 of each batch (or every sample) scores ``value``; the others a finite pixel statistic."""

    def fn(images, prompts, metadata=None):
        r = images.float().flatten(1).std(1)
        bad = float(value)
        if every:
            return torch.full_like(r, bad)
        r[0] = bad
        return r

    return fn


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def _cfg(weights, out, **extra):
    return load_config("toy", tiny_overrides(weights, out, **extra))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_nonfinite_reward_is_dropped_and_the_lora_stays_finite(weights, tmp_path, value):
    reward = f"reward.components=[{{name: test_nonfinite, weight: 1.0, kwargs: {{value: '{value}'}}}}]"
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "r") + [reward])
    Trainer(cfg).train()
    rows = _rows(tmp_path / "r")
    assert [float(r["guard/dropped"]) for r in rows] == [1.0, 1.0]  # sample 0 of each iteration
    assert all(torch.isfinite(torch.tensor(float(r[k]))) for r in rows for k in ("reward/mean", "train/loss"))
    lora = _lora(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert json.loads((tmp_path / "r" / "monitor.json").read_text())["nonfinite"]["dropped_samples"] == 2


def test_persistent_nonfinite_rewards_stop_the_run_with_the_last_checkpoint_intact(weights, tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app

    out = tmp_path / "r"
    reward = "reward.components=[{name: test_nonfinite, weight: 1.0, kwargs: {every: true}}]"
    args = ["train", "--config", "toy", *tiny_overrides(weights, out, **{"train.iterations": 4}), reward]
    res = CliRunner().invoke(app, [*args, "train.max_nonfinite=2"])
    assert res.exit_code == 2 and "2 consecutive iterations produced non-finite" in res.output
    ck = out / "checkpoints"
    assert (ck / "iter_000001" / "state.json").exists() and not (ck / "iter_000002").exists()
    assert (ck / "latest").read_text() == "iter_000001"
    mon = json.loads((out / "monitor.json").read_text())["nonfinite"]
    assert mon["consecutive"] == 2 and "consecutive iterations" in mon["stopped"]


def test_resume_with_a_changed_lr_stops_and_names_the_field(weights, tmp_path):
    out = tmp_path / "r"
    Trainer(_cfg(weights, out, **{"train.iterations": 1})).train()
    before = (out / "config.yaml").read_text()
    changed = _cfg(weights, out, **{"train.iterations": 2, "optim.lr": 0.5})
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 -> 0\.5") as e:
        Trainer(changed).train(resume=True)
    assert "--allow-changes" in str(e.value) and "train.iterations" not in str(e.value)
    assert (out / "config.yaml").read_text() == before  # nothing written before the check
    # a safe change (more iterations) resumes; with --allow-changes an unsafe one does too
    res = Trainer(_cfg(weights, out, **{"train.iterations": 2})).train(resume=True)
    assert res["iterations"] == 2 and [int(r["iteration"]) for r in _rows(out)] == [1, 2]
    Trainer(_cfg(weights, out, **{"train.iterations": 3, "optim.lr": 0.5}), allow_changes=True).train(
        resume=True
    )
    assert [int(r["iteration"]) for r in _rows(out)] == [1, 2, 3]


@pytest.mark.parametrize("algorithm", ["flow_grpo", "nft"])
def test_a_finished_run_continued_to_more_iterations_is_the_longer_run(weights, tmp_path, algorithm):
    """More ``train.iterations`` on ``--resume`` (a safe change) continues a finished run into the run that
    had been asked for the longer length from the start: its end at iteration 2 (end evaluation, end
    checkpoint, LoRA export) leaves the trajectory alone, so the LoRA, the NFT old policy and the logged
    rewards after 3 iterations are bitwise those of an uninterrupted 3-iteration run."""
    kw = {
        **(TINY_NFT if algorithm == "nft" else {}),
        "eval.every": 2,
        "eval.prompts_limit": 2,
        "train.report": True,
    }
    full, cont = tmp_path / "full", tmp_path / "cont"
    Trainer(_cfg(weights, full, **kw, **{"train.iterations": 3})).train()
    Trainer(_cfg(weights, cont, **kw, **{"train.iterations": 2})).train()
    assert (cont / "lora").exists()  # it finished
    Trainer(_cfg(weights, cont, **kw, **{"train.iterations": 3})).train(resume=True)
    a, b = _lora(full), _lora(cont)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert [r["reward/mean"] for r in _rows(full)] == [r["reward/mean"] for r in _rows(cont)]
    evals = [
        [(e["iteration"], e["strict"]) for e in json.loads((d / "evals.json").read_text())]
        for d in (full, cont)
    ]
    assert [i for i, _ in evals[0]] == [0, 2, 3] and evals[0] == evals[1]
    if algorithm == "nft":
        ea = load_file(str(full / "checkpoints" / "iter_000003" / "update.safetensors"))
        eb = load_file(str(cont / "checkpoints" / "iter_000003" / "update.safetensors"))
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_a_broken_newest_checkpoint_falls_back_and_the_log_is_truncated_not_deleted(
    weights, tmp_path, capsys
):
    out = tmp_path / "r"
    cfg = _cfg(weights, out, **{"train.iterations": 3, "train.checkpoint_every": 2})
    Trainer(cfg).train()  # checkpoints 2 and 3 (the end); the log holds iterations 1-3
    (out / "checkpoints" / "iter_000003" / "state.json").write_text('{"iteration": 3, "optim')  # truncated
    (out / "checkpoints" / ".tmp_iter_000004_999").mkdir()  # an interrupted write
    with pytest.warns(RuntimeWarning, match="iter_000003"):
        Trainer(cfg).train(resume=True)
    assert [int(r["iteration"]) for r in _rows(out)] == [1, 2, 3]  # row 3 redone once, rows 1-2 kept
    assert not (out / "checkpoints" / ".tmp_iter_000004_999").exists()
    empty = tmp_path / "empty"
    Trainer(_cfg(weights, empty, **{"train.iterations": 1})).train(resume=True)
    assert "no checkpoint in" in capsys.readouterr().out


def test_a_second_run_into_a_locked_folder_fails_at_once(weights, tmp_path):
    out = tmp_path / "r"
    with RunLock(out):
        with pytest.raises(ConfigError, match="train.output_dir"):
            Trainer(_cfg(weights, out)).train()
        assert not (out / "log.csv").exists()
    Trainer(_cfg(weights, out, **{"train.iterations": 1})).train()  # released: the folder is free again


def test_sigterm_mid_run_checkpoints_and_resumes_to_the_uninterrupted_lora(weights, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    extra = ["train.iterations=6", "train.checkpoint_every=100"]  # only the signal and the end checkpoint
    subprocess.run(
        [sys.executable, str(SCRIPT), str(weights), str(full), "train", *extra], check=True, env=ENV
    )
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(weights), str(stopped), "train", *extra],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (stopped / "log.csv").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    # after the update in progress, or at once when the signal came during sampling or rewards
    assert "SIGTERM received: stopped" in err and "--resume` continues" in err
    done = int((stopped / "checkpoints" / "latest").read_text().removeprefix("iter_"))
    assert 1 <= done < 6 and not (stopped / "lora").exists()  # the signal landed mid-training
    subprocess.run(
        [sys.executable, str(SCRIPT), str(weights), str(stopped), "train", *extra, "resume=1"],
        check=True,
        env=ENV,
    )
    a, b = _lora(full), _lora(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "override,field",
    [
        ("optim.lr=inf", "optim.lr"),
        ("sampling.cfg_scale=nan", "sampling.cfg_scale"),
        ("reward.components=[{name: self_confidence, weight: 0.0}]", "reward.components"),
        ("train.threads=-3", "train.threads"),
        ("train.max_nonfinite=-1", "train.max_nonfinite"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("toy", [override])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, weights):
    from trainer_helpers import make_bad_inputs

    return make_bad_inputs(tmp_path_factory.mktemp("bad"), weights)


CASES = [
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--seeds", ","], "--seeds"),
    (["sample", "--cfg", "-5"], "--cfg"),
    (["sample", "--out", "{d}/folder"], "--out"),
    (["sample", "--model", "{d}/garbage.safetensors", "--out", "{d}/x.png"], "model"),
    (["sample", "--lora", "{d}/garbage.safetensors", "--out", "{d}/x.png"], "lora"),
    (["sample", "--lora", "{d}/other_lora", "--out", "{d}/x.png", "--seeds", "0"], "lora"),
    (["eval", "--suite", "toy", "--samples", "0"], "--samples"),
    (["eval", "--suite", "toy", "--limit", "-1"], "--limit"),
    (["config", "check", "toy", "reward.components=[{name: nosuch}]"], "unknown reward"),
    (
        ["config", "check", "toy_verifiable", "reward.components=[{name: toy_geneval, kwargs: {moode: x}}]"],
        "moode",
    ),
    (["train", "--config", "toy", "train.output_dir={d}/a_file"], "train.output_dir"),
    (["train", "--config", "toy", "train.device=cuda"], "train.device"),
    (["train", "--config", "toy", "train.threads=-3"], "train.threads"),
    (["train", "--config", "toy", "data.train_prompts={d}/latin1.txt", "train.output_dir={d}/r1"], "UTF-8"),
    (["train", "--config", "toy", "data.train_prompts={d}/folder", "train.output_dir={d}/r2"], "folder"),
    (
        ["train", "--config", "toy", "data.train_prompts={d}/number.jsonl", "train.output_dir={d}/r3"],
        "prompt",
    ),
    (
        ["train", "--config", "toy", "eval.prompts={d}/include.jsonl", "train.output_dir={d}/r4"],
        "include",
    ),
    # misread inputs: a .json document, a JSON line in a .txt file, a class or count nothing can score
    (["config", "check", "toy", "--paths", "data.train_prompts={d}/prompts.json"], ".jsonl"),
    (["train", "--config", "toy", "data.train_prompts={d}/json_in.txt", "train.output_dir={d}/r6"], ".jsonl"),
    (
        ["train", "--config", "toy", "eval.prompts={d}/negative_count.jsonl", "train.output_dir={d}/r7"],
        "count -3",
    ),
    (["train", "--config", "toy", "eval.prompts={d}/dog.jsonl", "train.output_dir={d}/r5"], "'dog'"),
    # tracebacks before: seeds past 64 bits, bad devices, unwritable outputs, odd YAML, bounds the math needs
    (["sample", "--seeds", str(2**63), "--out", "{d}/x.png"], "--seeds"),
    (["train", "--config", "toy", f"train.seed={2**63}", "train.output_dir={d}/r8"], "train.seed"),
    (["sample", "--device", "foo", "--out", "{d}/x.png"], "--device"),
    (["sample", "--device", "cuda", "--out", "{d}/x.png"], "--device"),
    (["sample", "--out", "/proc/no/x.png"], "--out"),
    (["eval", "--suite", "toy", "--out", "/proc/no/eval", "--limit", "1"], "--out"),
    (["eval", "--suite", "toy", "--seed", "-1"], "--seed"),
    (["config", "check", "{d}/list.yaml"], "mapping"),
    (["config", "check", "toy", "eval.base_cache={d}/folder"], "eval.base_cache"),
    (["ablate", "--out", "{d}/a_file", "--conditions", "k4", "--seeds", "0"], "--out"),
    (["config", "check", "toy", "--paths", "eval.prompts={d}/no_count.jsonl"], "needs a 'count'"),
    (["config", "check", "{d}/sub/loop.yaml"], "circular"),
    (["config", "check", "toy", "eval.prompts_limit=-5"], "eval.prompts_limit"),
    (["config", "check", "toy", "grpo.adv_eps=-1"], "grpo.adv_eps"),
    (["toy", "pretrain", "--out", "{d}/tp", "--eval-every", "0"], "--eval-every"),
    (["toy", "pretrain", "--out", "{d}/tp", "--dataset-size", "0"], "--dataset-size"),
    (["toy", "pretrain", "--out", "{d}/tp", "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a[:3]) + " " + n for a, n in CASES])
def test_bad_input_is_one_line_and_exit_code_2(bad_inputs, args, needle):
    import torch as _torch
    from typer.testing import CliRunner

    from solace.cli.main import app

    if ("train.device=cuda" in args or "cuda" in args) and _torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is valid here")
    res = CliRunner().invoke(app, [a.replace("{d}", str(bad_inputs)) for a in args])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output[-1500:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output[-1500:]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_never_silently_replaced(weights, tmp_path):
    """A second `train` into a run's folder without --resume stops in one line and changes nothing;
    --overwrite replaces the earlier run, saying what it removed; --resume with --overwrite is refused."""
    from typer.testing import CliRunner

    from solace.cli.main import app

    out = tmp_path / "run"
    cli = CliRunner()
    first = cli.invoke(
        app, ["train", "--config", "toy", *tiny_overrides(weights, out, **{"train.iterations": 3})]
    )
    assert first.exit_code == 0, first.output[-1500:]
    before = _snapshot(out)
    assert "checkpoints/iter_000003/lora.safetensors" in before and "log.csv" in before
    again = cli.invoke(app, ["train", "--config", "toy", *tiny_overrides(weights, out)])
    lines = [ln for ln in again.output.splitlines() if ln.strip()]
    assert again.exit_code == 2 and len(lines) == 1, again.output[-1500:]
    assert "train.output_dir" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert _snapshot(out) == before  # nothing written, nothing removed
    both = cli.invoke(
        app, ["train", "--config", "toy", "--resume", "--overwrite", *tiny_overrides(weights, out)]
    )
    assert both.exit_code == 2 and "--overwrite" in both.output and _snapshot(out) == before
    # --overwrite: a new 2-iteration run, none of the earlier run's files left beside it
    new = cli.invoke(app, ["train", "--config", "toy", "--overwrite", *tiny_overrides(weights, out)])
    assert new.exit_code == 0, new.output[-1500:]
    assert "--overwrite: removed the earlier run's" in new.output and "checkpoints" in new.output
    assert not (out / "checkpoints" / "iter_000003").exists() and len(_rows(out)) == 2
    # a folder without a run (only an unrelated file of the user's) is used as it is, the file kept
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    ok = cli.invoke(app, ["train", "--config", "toy", *tiny_overrides(weights, other)])
    assert ok.exit_code == 0 and (other / "notes.txt").read_text() == "mine", ok.output[-1500:]


def test_a_checkpoints_lora_carries_its_alpha_and_samples_as_the_export(weights, tmp_path):
    """A checkpoint's LoRA file holds the adapter's config (alpha = 2 x rank here), so it loads at full
    strength: `sample --lora` of the last checkpoint draws exactly what the exported LoRA draws."""
    from typer.testing import CliRunner

    from solace.cli.main import app
    from solace.models.lora import read_lora

    out = tmp_path / "run"
    cli = CliRunner()
    res = cli.invoke(
        app, ["train", "--config", "toy", *tiny_overrides(weights, out, **{"train.iterations": 1})]
    )
    assert res.exit_code == 0, res.output[-1500:]
    ck = out / "checkpoints" / "iter_000001" / "lora.safetensors"
    state, meta = read_lora(ck)
    exported, exported_meta = read_lora(out / "lora")
    assert meta is not None and meta["r"] == 4 and meta["lora_alpha"] == 8 and meta == exported_meta
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in state)
    grids = {}
    for name, lora in (("ck", ck), ("export", out / "lora")):
        args = [
            "sample",
            "-p",
            "a photo of a circle",
            "--seeds",
            "0,1",
            "--steps",
            "3",
            "--model",
            str(weights),
        ]
        got = cli.invoke(app, [*args, "--lora", str(lora), "--out", str(tmp_path / f"{name}.png")])
        assert got.exit_code == 0 and "no LoRA metadata" not in got.output, got.output[-1500:]
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grids["ck"] == grids["export"]
    # the same weights without metadata: refused in one line, unless --lora-alpha says the alpha
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(ck)), str(bare))
    args = ["sample", "-p", "a photo of a circle", "--seeds", "0,1", "--steps", "3", "--model", str(weights)]
    refused = cli.invoke(app, [*args, "--lora", str(bare), "--out", str(tmp_path / "bare.png")])
    lines = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert refused.exit_code == 2 and len(lines) == 1 and "--lora-alpha" in lines[0], refused.output[-1500:]
    given = cli.invoke(
        app, [*args, "--lora", str(bare), "--lora-alpha", "8", "--out", str(tmp_path / "b.png")]
    )
    assert given.exit_code == 0 and (tmp_path / "b.png").read_bytes() == grids["export"], given.output[-1500:]
    # each image of the grid is also written alone (what `score --images` reads)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "00_a_photo_of_a_circle_seed0.png",
        "00_a_photo_of_a_circle_seed1.png",
    ]


def test_non_finite_weights_stop_the_run_and_never_reach_a_checkpoint(weights, tmp_path):
    """An optimizer step that makes NaN weights from finite gradients (as AdamW with eps 0 did) stops the
    run at once: the last checkpoint stays the newest, finite, and named in the message; nothing exported."""
    from solace.trainer.guard import NonFiniteError

    out = tmp_path / "r"
    tr = Trainer(_cfg(weights, out, **{"train.iterations": 3}))
    step = tr.ctx.optimizer.step

    def poisoned(*args, **kwargs):
        res = step(*args, **kwargs)
        if tr.history:  # from the second iteration on
            with torch.no_grad():
                tr.params[0].view(-1)[0] = float("nan")
        return res

    tr.ctx.optimizer.step = poisoned
    with pytest.raises(NonFiniteError, match="iteration 2") as e:
        tr.train()
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("iter_*")) == ["iter_000001"]
    assert str(ck / "iter_000001") in str(e.value) and "--resume" in str(e.value)
    assert all(
        torch.isfinite(v).all() for v in load_file(str(ck / "iter_000001" / "lora.safetensors")).values()
    )
    assert not (out / "lora").exists()
    assert (
        "non-finite in iteration 2" in json.loads((out / "monitor.json").read_text())["nonfinite"]["stopped"]
    )


def test_a_non_finite_lora_is_refused_in_one_line(weights, tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app
    from solace.models.lora import add_lora, save_lora
    from solace.toy.adapter import ToyAdapter

    tiny = ToyAdapter(weights=weights)
    add_lora(tiny.denoiser, 4, 8, ToyAdapter.lora_target_modules)
    with torch.no_grad():
        next(p for n, p in tiny.denoiser.named_parameters() if "lora_B" in n).fill_(float("inf"))
    save_lora(tiny, tmp_path / "bad_lora")
    res = CliRunner().invoke(
        app, ["sample", "-p", "a photo of a circle", "--seeds", "0", "--steps", "2", "--model", str(weights),
              "--lora", str(tmp_path / "bad_lora"), "--out", str(tmp_path / "x.png")],
    )  # fmt: skip
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "non-finite" in lines[0], res.output[-1500:]
    assert not (tmp_path / "x.png").exists()


def test_save_checkpoint_never_writes_non_finite_weights(tmp_path):
    from solace.trainer.checkpoint import save_checkpoint
    from solace.trainer.guard import NonFiniteError

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    save_checkpoint(tmp_path, 1, {"a.lora_B.weight": torch.ones(2)}, {}, opt, {})  # finite: written
    with pytest.raises(NonFiniteError, match="a.lora_B.weight"):
        save_checkpoint(tmp_path, 2, {"a.lora_B.weight": torch.tensor([1.0, float("nan")])}, {}, opt, {})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "iter_000001",
        "latest",
    ]


@pytest.mark.parametrize(
    "change",
    [{"model.lora.rank": 8}, {"train.algorithm": "nft", "sampling.noise_level": 0}],
    ids=["rank", "algo"],
)
def test_resume_refuses_a_structural_change_even_with_allow_changes(weights, tmp_path, change):
    """A checkpoint's tensors fit one LoRA shape and one update: --allow-changes cannot carry them across a
    new rank or algorithm (before: a cryptic state_dict error); the message names the field."""
    out = tmp_path / "r"
    Trainer(_cfg(weights, out, **{"train.iterations": 1})).train()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=next(iter(change))) as e:
        Trainer(_cfg(weights, out, **{"train.iterations": 2, **change}), allow_changes=True).train(
            resume=True
        )
    assert e.value.field == "--resume" and "\n" not in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def _stop_run(weights, out, **extra):
    over = {
        "train.iterations": 3,
        "train.checkpoint_every": 10,
        "eval.every": 1,
        "eval.image_every": 1,
        "train.report": True,
        "eval.prompts_limit": 6,
        "eval.samples_per_prompt": 1,
        **extra,
    }
    return _cfg(weights, out, **over)


def test_a_signal_during_an_evaluation_stops_at_once_and_resume_makes_it_up(weights, tmp_path, monkeypatch):
    """SIGINT arriving while iteration 2's evaluation samples: the evaluation stops at its next forward, the
    finished iteration 2 is checkpointed (checkpoint_every is 10), the exit code is 130; resumed, the run
    makes up the evaluation and grid of iteration 2 and ends bitwise as the uninterrupted run."""
    from solace.toy.evaluate import ToyEvaluator
    from solace.trainer.signals import RunInterrupted

    full = Trainer(_stop_run(weights, tmp_path / "full")).train()
    evaluate, calls = ToyEvaluator.evaluate, []

    def signalled(self, iteration):
        calls.append(iteration)
        if iteration == 2 and calls.count(2) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: a stop is requested
        return evaluate(self, iteration)

    monkeypatch.setattr(ToyEvaluator, "evaluate", signalled)
    out = tmp_path / "stopped"
    with pytest.raises(RunInterrupted, match="SIGINT received: stopped at once") as e:
        Trainer(_stop_run(weights, out)).train()
    assert e.value.exit_code == 130 and "iteration 2 of 3 checkpointed" in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == ["iter_000002"]
    assert not (out / "images" / "iter_000002.png").exists()  # the grid came after: never started
    monkeypatch.setattr(ToyEvaluator, "evaluate", evaluate)
    res = Trainer(_stop_run(weights, out)).train(resume=True)
    assert [ev["iteration"] for ev in res["evals"]] == [0, 1, 2, 3]
    assert [ev["strict"] for ev in res["evals"]] == [ev["strict"] for ev in full["evals"]]
    assert (out / "images" / "iter_000002.png").exists()
    a, b = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_20_s_into_the_toy_presets_base_evaluation_ends_it_within_10_s(tmp_path):
    """The issue's check, on the real preset: SIGINT 20 s after the start (the base evaluation is sampling,
    its progress bar showing) ends `solace train --config toy` within 10 s, exit 130, with a message."""
    import threading

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "solace", "train", "--config", "toy", f"train.output_dir={out}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        while "sampling" not in "".join(err) and time.monotonic() - start < 120 and proc.poll() is None:
            time.sleep(0.2)
        assert "sampling" in "".join(err), "".join(err)[-2000:]  # the base evaluation's progress bar
        time.sleep(max(0.0, 20 - (time.monotonic() - start)))
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    reader.join(timeout=5)
    text = "".join(err)
    assert rc == 130 and took <= 10, (rc, took, text[-2000:])
    assert "SIGINT received: stopped at once" in text and "nothing trained yet" in text
    assert not (out / "checkpoints").exists() and (out / "config.yaml").exists()


def test_base_eval_cache_never_overwrites_a_users_file(weights, tmp_path):
    """eval.base_cache naming a file solace did not write is refused before anything runs; a cache it
    wrote is read back (and an unmarked one of earlier versions accepted)."""
    from solace.evaluation.cache import BaseEvalCache

    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    with pytest.raises(ConfigError, match="eval.base_cache"):
        Trainer(_cfg(weights, tmp_path / "r", **{"eval.base_cache": str(mine)}))
    assert mine.read_text() == '{"my": "data"}'
    cache = BaseEvalCache(tmp_path / "cache.json", {"a": 1})
    cache.put({"summary": {"x": 1}})
    assert BaseEvalCache(tmp_path / "cache.json", {"a": 1}).get() == {"summary": {"x": 1}}
    (tmp_path / "old.json").write_text('{"entries": []}')
    BaseEvalCache(tmp_path / "old.json", {"a": 1}).put({"summary": {}})
    assert json.loads((tmp_path / "old.json").read_text())["format"] == BaseEvalCache.FORMAT


def test_resume_refuses_an_input_file_replaced_under_the_run(weights, tmp_path):
    """The prompt file a run trained on, edited before --resume: refused in one line naming the field (the
    report would compare different prompt sets); --allow-changes continues and records the new file."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((HERE.parent / "bench" / "data" / "heldout_2_per_category.jsonl").read_text())
    out = tmp_path / "r"
    extra = {"data.train_prompts": str(prompts)}
    Trainer(_cfg(weights, out, **{"train.iterations": 1, **extra})).train()
    recorded = json.loads((out / "inputs.json").read_text())
    assert set(recorded) == {"data.train_prompts", "model.name"}
    Trainer(_cfg(weights, out, **{"train.iterations": 2, **extra})).train(resume=True)  # unchanged: fine
    prompts.write_text(prompts.read_text().replace("circle", "square"))
    with pytest.raises(ConfigError, match="data.train_prompts") as e:
        Trainer(_cfg(weights, out, **{"train.iterations": 3, **extra})).train(resume=True)
    assert e.value.field == "--resume" and str(prompts) in str(e.value) and "\n" not in str(e.value)
    assert len(_rows(out)) == 2  # nothing trained
    Trainer(_cfg(weights, out, **{"train.iterations": 3, **extra}), allow_changes=True).train(resume=True)
    assert (
        json.loads((out / "inputs.json").read_text())["data.train_prompts"] != recorded["data.train_prompts"]
    )


def test_the_report_names_the_evaluation_set_and_the_update_the_run_used(weights, tmp_path):
    """An NFT run evaluated on the training distribution: its report says so, and prints NFT's settings,
    not Flow-GRPO's (rho, window) which the run did not use; a Flow-GRPO run on the held-out set likewise."""
    over = {"train.iterations": 1, "train.report": True, "eval.samples_per_prompt": 1}
    nft = tmp_path / "nft"
    ev = {"eval.prompts": "toy_train_eval", "eval.prompts_limit": 6}
    Trainer(_cfg(weights, nft, **{**over, **TINY_NFT, **ev})).train()
    text = (nft / "report.md").read_text()
    assert "## Training-distribution accuracy" in text and "Held-out" not in text
    assert "update: DiffusionNFT" in text and "rho=" not in text and "(window [" not in text
    grpo = tmp_path / "grpo"
    Trainer(_cfg(weights, grpo, **{**over, "eval.prompts_limit": 6})).train()
    text = (grpo / "report.md").read_text()
    assert "## Held-out accuracy" in text and "update: Flow-GRPO, rho=" in text and "DiffusionNFT" not in text


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(
    weights, tmp_path, monkeypatch
):
    """The disk fills while iteration 2's checkpoint is written (safetensors raises): one ConfigError naming
    train.output_dir and the fix; checkpoint 1 intact and still `latest`, no half checkpoint left."""
    from safetensors import SafetensorError

    import solace.trainer.checkpoint as ck

    real = ck.save_file

    def full(tensors, path, metadata=None):
        if "iter_000002" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full)
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match="No space left") as e:
        Trainer(_cfg(weights, out, **{"train.iterations": 2})).train()
    assert e.value.field == "train.output_dir" and "--resume" in str(e.value)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]
    assert (root / "latest").read_text() == "iter_000001"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_stdout_that_cannot_be_written_is_one_line_and_exit_code_2():
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            [sys.executable, "-m", "solace", "config", "check", "toy"],
            stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=120,
        )  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "No space left" in lines[0], res.stderr[-1500:]


def test_grid_labels_keep_visible_spaces_and_fit_their_column():
    """Row labels in a font whose spaces show ("two squares" reads as two words, wider than "twosquares"),
    the label column as wide as the longest label."""
    import numpy as np

    from solace.utils.images import make_grid

    def ink_right(label: str) -> int:
        grid = np.asarray(make_grid([torch.zeros(3, 8, 8)], 1, row_labels=[label], label_width=300))
        cols = np.where((grid[:, :300] < 128).any(axis=(0, 2)))[0]
        return int(cols.max())

    assert ink_right("two squares") >= ink_right("twosquares") + 3
    long = "a yellow square and a blue circle left of a red triangle"
    grid = make_grid([torch.ones(3, 8, 8)], 1, row_labels=[long], pad=2)  # a white image: ink is text
    label_width = grid.width - (8 + 2 * 2)
    ink = np.where((np.asarray(grid) < 128).any(axis=(0, 2)))[0]
    assert 0.8 * label_width < ink.max() < label_width - 2  # the whole label, in its column
