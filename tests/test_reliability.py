"""A run is never lost and never silently wrong: the run lock, intact-checkpoint resume, resume config
checks, log truncation and the non-finite guard (issue 17). Building blocks only; no training here."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from solace.errors import ConfigError
from solace.grpo.advantages import group_advantages
from solace.trainer import checkpoint as ckm
from solace.trainer.checkpoint import (
    checkpoint_problem,
    checkpoints_to_prune,
    clean_partial,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    safetensors_problem,
    save_checkpoint,
)
from solace.trainer.guard import (
    NonFiniteGuard,
    all_zero,
    drop_nonfinite,
    group_advantages_masked,
)
from solace.trainer.resume_check import ABSENT, EVAL_FIELDS, SAFE, check_resume, config_diff, truncate_log
from solace.trainer.runlock import LOCK_NAME, RunLock, StaleLockWarning, pid_alive, read_lock

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================ run lock
def test_lock_is_taken_released_and_idempotent(tmp_path):
    out = tmp_path / "run"  # does not exist yet: acquiring creates it
    lock = RunLock(out)
    assert lock.acquire() is None
    info = json.loads((out / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["token"] == lock.token and info["started"]
    assert lock.acquire() is None  # re-acquiring a held lock is a no-op
    # another RunLock of the same process is a second run on the folder
    with pytest.raises(ConfigError) as e:
        RunLock(out).acquire()
    assert (
        e.value.field == "train.output_dir" and str(out) in str(e.value) and str(os.getpid()) in str(e.value)
    )
    lock.release()
    assert not (out / LOCK_NAME).exists()
    lock.release()  # idempotent
    with RunLock(out) as again:
        assert again.held and (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_lock_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    other = {**read_lock(tmp_path), "token": "someone-else"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    lock.release()
    assert read_lock(tmp_path) == other


_HOLDER = """
import sys, time
from solace.trainer.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_is_refused_then_takes_over_once_the_holder_dies(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert e.value.field == "train.output_dir"
        assert str(out) in msg and f"pid {holder.pid}" in msg and f"kill {holder.pid}" in msg
        assert "another train.output_dir" in msg
        holder.kill()  # SIGKILL: no release; not reaped yet, so the holder is a zombie
        deadline = time.time() + 10
        while pid_alive(holder.pid) and time.time() < deadline:
            time.sleep(0.02)
        lock = RunLock(out)
        with pytest.warns(StaleLockWarning, match=f"pid {holder.pid} is no longer running"):
            msg = lock.acquire()
        assert msg is not None and str(holder.pid) in msg and lock.held
        assert read_lock(out)["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


_RACER = """
import sys, time
from solace.errors import ConfigError
from solace.trainer.runlock import RunLock
lock = RunLock(sys.argv[1])
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lock.acquire()
except ConfigError:
    print("busy", flush=True)
else:
    print("ok", flush=True)
    time.sleep(2.0)
    lock.release()
"""


def test_racers_on_a_stale_lock_let_exactly_one_run_in(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = f"{time.time() + 3.0}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", _RACER, str(tmp_path), start],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["busy", "busy", "busy", "ok"]
    assert not (tmp_path / LOCK_NAME).exists() and not (tmp_path / (LOCK_NAME + ".break")).exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder: Path, **info):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"pid": 1, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00", "token": "x"}
    (folder / LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    lock = RunLock(tmp_path)
    with pytest.warns(StaleLockWarning) as rec:
        msg = lock.acquire()
    assert msg == str(rec[0].message) and f"pid {pid}" in msg and str(tmp_path / LOCK_NAME) in msg
    assert read_lock(tmp_path)["token"] == lock.token
    lock.release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_reused_pid_and_own_pid_without_a_lock_are_stale(tmp_path):
    # pid alive, but its start time is not the recorded one: the pid was reused
    _write_lock(tmp_path / "a", pid=os.getppid(), proc_start=1)
    with pytest.warns(StaleLockWarning, match="another process"):
        RunLock(tmp_path / "a").acquire()
    # the lock names this very process, which holds no RunLock on it (a restarted container's pid 1)
    _write_lock(tmp_path / "b", pid=os.getpid())
    with pytest.warns(StaleLockWarning, match="this process"):
        RunLock(tmp_path / "b").acquire()
    # a live pid with its recorded start time is a live holder
    from solace.trainer.runlock import _proc_start

    _write_lock(tmp_path / "c", pid=os.getppid(), proc_start=_proc_start(os.getppid()))
    with pytest.raises(ConfigError, match="in use by another run"):
        RunLock(tmp_path / "c").acquire()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-node")
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path).acquire()
    assert "some-other-node" in str(e.value) and f"delete {tmp_path / LOCK_NAME}" in str(e.value)


def test_garbage_lock_file_is_taken_over_after_a_short_wait(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a holder killed between create and write
    lock = RunLock(tmp_path, wait_unreadable_s=0.1)
    with pytest.warns(StaleLockWarning, match="not a solace lock"):
        lock.acquire()
    assert lock.held


# ============================================================================================ checkpoints
def _opt() -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([w], lr=1e-2)
    w.sum().backward()
    opt.step()
    return {"lora_A.weight": w.detach().clone()}, opt


def _save(root: Path, it: int, **kw) -> Path:
    lora, opt = _opt()
    return save_checkpoint(root, it, lora, {"lora_config": "{}"}, opt, {"history": [{"x": it}]}, **kw)


def _ckpts(root: Path, *its: int) -> None:
    for it in its:
        _save(root, it)


def test_config_round_trips_through_the_checkpoint(tmp_path):
    cfg = {"train": {"seed": 3}, "eval": {"image_prompts": ["a", "b"]}, "grpo": {"rho": 0.6}, "preset": "toy"}
    path = _save(tmp_path, 5, config=cfg)
    assert read_state(path)["config"] == cfg
    _, opt = _opt()
    lora, state = load_checkpoint(path, opt)
    assert state["config"] == cfg and state["iteration"] == 5 and state["history"] == [{"x": 5}]
    assert "config" not in read_state(_save(tmp_path, 6))  # optional
    with pytest.raises(ConfigError, match="config"):
        _save(tmp_path, 7, config={"x": object()})
    with pytest.raises(ConfigError, match="config"):
        _save(tmp_path, 7, config=[1, 2])
    assert not (tmp_path / "iter_000007").exists()


def test_safetensors_header_check_accepts_real_files_and_catches_damage(tmp_path):
    f = tmp_path / "t.safetensors"
    save_file(
        {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.zeros(0)},
        str(f),
        metadata={"k": "v"},
    )
    assert safetensors_problem(f) is None
    save_file({}, str(tmp_path / "empty.safetensors"))
    assert safetensors_problem(tmp_path / "empty.safetensors") is None
    data = f.read_bytes()
    cases = {
        "truncated": data[:-3],
        "padded": data + b"\0",
        "header cut": data[:20],
        "tiny": data[:5],
        "garbage": os.urandom(len(data)),
        "zero": b"\0" * len(data),
    }
    for name, blob in cases.items():
        g = tmp_path / f"{name}.safetensors"
        g.write_bytes(blob)
        assert safetensors_problem(g), name
    assert "missing" in safetensors_problem(tmp_path / "nope.safetensors")


def _damage(path: Path, how: str) -> None:
    if how == "no_state":
        (path / "state.json").unlink()
    elif how == "state_truncated":
        s = (path / "state.json").read_text()
        (path / "state.json").write_text(s[: len(s) // 2])
    elif how == "state_wrong_iteration":
        s = json.loads((path / "state.json").read_text())
        (path / "state.json").write_text(json.dumps({**s, "iteration": s["iteration"] + 1}))
    elif how == "lora_truncated":
        b = (path / "lora.safetensors").read_bytes()
        (path / "lora.safetensors").write_bytes(b[: len(b) - 8])
    elif how == "optimizer_garbage":
        n = (path / "optimizer.safetensors").stat().st_size
        (path / "optimizer.safetensors").write_bytes(os.urandom(n))
    elif how == "lora_missing":
        (path / "lora.safetensors").unlink()
    elif how == "folder_missing":
        import shutil

        shutil.rmtree(path)


@pytest.mark.parametrize(
    "how",
    [
        "no_state",
        "state_truncated",
        "state_wrong_iteration",
        "lora_truncated",
        "optimizer_garbage",
        "lora_missing",
        "folder_missing",
    ],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, how, monkeypatch):
    _ckpts(tmp_path, 10, 20, 30)
    assert find_resumable(tmp_path) == (tmp_path / "iter_000030", [])
    _damage(tmp_path / "iter_000030", how)
    # nothing is unpickled or loaded while checking
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(ckm, "load_file", lambda *a, **k: pytest.fail("load_file called"))
    path, warns = find_resumable(tmp_path)
    assert path == tmp_path / "iter_000020"
    assert any("iter_000030" in w and "skipped" in w for w in warns), warns
    assert "iter_000020" in warns[-1]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert latest_checkpoint(tmp_path) == tmp_path / "iter_000020"
    assert [str(w.message) for w in rec] == warns


def test_every_broken_checkpoint_is_named_and_none_left_is_an_error(tmp_path):
    _ckpts(tmp_path, 10, 20)
    _damage(tmp_path / "iter_000020", "lora_truncated")
    _damage(tmp_path / "iter_000010", "no_state")
    path, warns = find_resumable(tmp_path)
    assert path is None
    assert sum("skipped" in w for w in warns) == 2 and "no intact checkpoint" in warns[-1]
    with pytest.warns(RuntimeWarning), pytest.raises(ConfigError) as e:
        latest_checkpoint(tmp_path)
    assert e.value.field == "resume" and "iter_000010" in str(e.value) and "iter_000020" in str(e.value)


def test_nothing_to_resume(tmp_path):
    assert find_resumable(tmp_path / "absent") == (None, [])
    assert find_resumable(tmp_path) == (None, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path) is None


def test_pointer_is_trusted_over_newer_folders_and_missing_pointer_falls_back(tmp_path):
    _ckpts(tmp_path, 10, 20, 30)
    (tmp_path / "latest").write_text("iter_000020")  # iter_000030 from an earlier run in this folder
    path, warns = find_resumable(tmp_path)
    assert path == tmp_path / "iter_000020"
    assert len(warns) == 1 and "iter_000030" in warns[0] and "not used" in warns[0]
    # latest names a broken checkpoint: only older ones are candidates
    _damage(tmp_path / "iter_000020", "no_state")
    path, warns = find_resumable(tmp_path)
    assert path == tmp_path / "iter_000010"
    assert any("iter_000030" in w for w in warns) and any("iter_000020" in w for w in warns)
    # no pointer (killed before the first pointer write): the newest intact folder
    (tmp_path / "latest").unlink()
    path, warns = find_resumable(tmp_path)
    assert path == tmp_path / "iter_000030" and "missing" in warns[0]
    (tmp_path / "latest").write_text("garbage\n")
    assert find_resumable(tmp_path)[0] == tmp_path / "iter_000030"


def test_intact_checkpoint_still_loads_and_problem_is_none(tmp_path):
    p = _save(tmp_path, 3)
    assert checkpoint_problem(p) is None
    _, opt = _opt()
    lora, state = load_checkpoint(p, opt)
    assert lora["lora_A.weight"].shape == (3, 4) and state["iteration"] == 3


def test_clean_partial_removes_interrupted_writes_only(tmp_path):
    _ckpts(tmp_path, 10)
    (tmp_path / ".tmp_iter_000020_123").mkdir()
    (tmp_path / ".tmp_iter_000020_123" / "lora.safetensors").write_bytes(b"half")
    (tmp_path / ".latest_123").write_text("iter_000020")
    removed = clean_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".latest_123", ".tmp_iter_000020_123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000010", "latest"]
    assert clean_partial(tmp_path) == [] and clean_partial(tmp_path / "absent") == []


def test_pruning_keeps_the_newest_intact_checkpoints_and_never_the_resumable_one():
    every = {it: True for it in (1, 2, 3, 4, 5)}
    assert checkpoints_to_prune(every, 5, 2) == [1, 2, 3]
    assert checkpoints_to_prune(every, 5, 9) == [] and checkpoints_to_prune(every, 5, 0) == []
    # the two newest are broken: a resume takes 3, which is kept (keeping the two newest folders would
    # leave nothing to resume from); the broken ones above it are left for find_resumable to name
    broken_top = {1: True, 2: True, 3: True, 4: False, 5: False}
    assert checkpoints_to_prune(broken_top, 3, 2) == [1]
    assert checkpoints_to_prune(broken_top, 3, 1) == [1, 2]
    # a broken one between kept ones stays, an older broken one goes; newer than the resumable: untouched
    mixed = {1: False, 2: True, 3: False, 4: True, 6: True}
    assert checkpoints_to_prune(mixed, 4, 2) == [1]


def test_prune_checkpoints_on_disk(tmp_path):
    _ckpts(tmp_path, 10, 20, 30, 40)
    _damage(tmp_path / "iter_000040", "lora_truncated")  # latest names it: a resume takes iter_000030
    removed = prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in removed) == ["iter_000010", "iter_000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000030", "iter_000040", "latest"]
    assert find_resumable(tmp_path)[0] == tmp_path / "iter_000030"
    assert prune_checkpoints(tmp_path, 0) == [] and prune_checkpoints(tmp_path / "absent", 1) == []
    _damage(tmp_path / "iter_000030", "no_state")  # nothing resumable: nothing removed
    assert prune_checkpoints(tmp_path, 1) == [] and (tmp_path / "iter_000030").is_dir()


# ============================================================================================ resume check
def test_config_diff_walks_nested_dicts():
    old = {"train": {"seed": 0, "lr": 1, "p": (1, 2), "x": float("nan")}, "a": [{"k": 1}], "gone": 1}
    new = {"train": {"seed": 1, "lr": 1.0, "p": [1, 2], "x": float("nan")}, "a": [{"k": 2}], "added": True}
    assert config_diff(old, new) == [
        ("a", [{"k": 1}], [{"k": 2}]),
        ("added", ABSENT, True),
        ("gone", 1, ABSENT),
        ("train.seed", 0, 1),
    ]
    assert config_diff({"f": 1}, {"f": True}) == [("f", 1, True)]
    assert config_diff(old, old) == []


def _cfg() -> dict:
    from solace.trainer.config import SolaceConfig

    return dataclasses.asdict(SolaceConfig())


def test_safe_and_eval_field_names_exist_in_the_config():
    keys = set(_flat(_cfg()))
    for pat in SAFE + EVAL_FIELDS:
        assert any(k == pat or (pat.endswith(".*") and k.startswith(pat[:-1])) for k in keys), pat


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_check_resume_accepts_safe_changes_and_names_every_unsafe_one():
    old = _cfg()
    new = _cfg()
    new["train"].update(iterations=500, output_dir="/moved", device="cuda", max_minutes=30.0)
    new["monitor"]["window"] = 9
    new["preset"] = "toy"
    lines = check_resume(old, new, allow_changes=False)
    assert len(lines) == 6 and "train.iterations: 100 -> 500" in lines
    assert check_resume(old, old) == []

    new["train"]["seed"] = 7
    new["grpo"]["rho"] = 1.0
    new["reward"]["components"][0]["weight"] = 2.0
    new["eval"]["prompts"] = "other.txt"
    with pytest.raises(ConfigError) as e:
        check_resume(old, new, allow_changes=False)
    msg = str(e.value)
    assert e.value.field == "--resume"
    for key in ("train.seed: 0 -> 7", "grpo.rho: 0.6 -> 1.0", "reward.components", "eval.prompts"):
        assert key in msg, key
    assert "earlier evaluations" in msg and "--allow-changes" in msg
    assert "train.iterations" not in msg  # safe changes are not blamed
    lines = check_resume(old, new, allow_changes=True)
    assert len(lines) == 10 and sum(line.endswith("(unsafe, allowed)") for line in lines) == 4


def _write_log(path: Path, rows: list[dict]) -> None:
    """As the trainer does: the first row's keys are the header; append one row at a time."""
    from solace.utils.files import append_csv_row

    for stats in rows:
        append_csv_row(path, stats)


def test_truncate_log_drops_rows_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    _write_log(log, [{"iteration": i, "reward/mean": i / 10} for i in range(1, 6)])
    header = log.read_text().splitlines()[0]
    assert truncate_log(log, 3) == 2
    rows = list(csv.DictReader(open(log)))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3] and log.read_text().splitlines()[0] == header
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]  # no temporary left
    before = log.read_bytes()
    assert truncate_log(log, 3) == 0 and log.read_bytes() == before
    # a resumed run appends to it as before
    _write_log(log, [{"iteration": 4, "reward/mean": 0.4}])
    assert [int(r["iteration"]) for r in csv.DictReader(open(log))] == [1, 2, 3, 4]


def test_truncate_log_drops_a_row_cut_short_and_handles_odd_files(tmp_path):
    log = tmp_path / "log.csv"
    _write_log(log, [{"iteration": i, "reward/mean": 0.5} for i in range(1, 4)])
    log.write_bytes(log.read_bytes()[:-4])  # killed in the middle of writing row 3
    assert truncate_log(log, 10) == 1
    assert [int(r["iteration"]) for r in csv.DictReader(open(log))] == [1, 2]
    assert truncate_log(tmp_path / "absent.csv", 3) == 0
    (tmp_path / "empty.csv").write_text("")
    assert truncate_log(tmp_path / "empty.csv", 3) == 0 and not (tmp_path / "empty.csv").exists()
    (tmp_path / "cut.csv").write_text("iteration,rew")  # killed writing the header
    assert truncate_log(tmp_path / "cut.csv", 3) == 0 and not (tmp_path / "cut.csv").exists()
    (tmp_path / "other.csv").write_text("step,x\r\n1,2\r\n")
    with pytest.raises(ConfigError, match="iteration"):
        truncate_log(tmp_path / "other.csv", 0)


# ============================================================================================ guard
def test_drop_nonfinite_marks_bad_rewards_and_bad_rows():
    r = torch.tensor([0.1, float("nan"), 0.3, float("inf"), 0.5, -float("inf")])
    g = torch.arange(6) // 3
    keep, n = drop_nonfinite(r, g)
    assert keep.tolist() == [True, False, True, False, True, False] and n == 3
    lat = torch.zeros(6, 2, 3)
    lat[0, 1, 2] = float("nan")
    keep, n = drop_nonfinite(r, g, lat, torch.zeros(6, 4))
    assert keep.tolist() == [False, False, True, False, True, False] and n == 4
    assert drop_nonfinite(torch.ones(4), torch.zeros(4))[1] == 0
    with pytest.raises(ConfigError):
        drop_nonfinite(r, g, torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"global_std": True}, {"clip": 0.5, "eps": 0.0}, {"eps": 1e-2}])
def test_masked_advantages_with_everything_kept_are_bitwise_group_advantages(dtype, kw):
    torch.manual_seed(1)
    r = torch.randn(24, dtype=dtype)
    r[4:8] = 0.25  # a flat group
    g = torch.randperm(24) % 6  # non-contiguous groups
    ref = group_advantages(r, group_ids=g, **kw)
    for keep in (None, torch.ones(24, dtype=torch.bool)):
        out = group_advantages_masked(r, g, keep, **kw)
        assert out.dtype == ref.dtype and torch.equal(out, ref)
    ref = group_advantages(r, group_size=4, **kw)
    assert torch.equal(
        group_advantages_masked(r, keep=torch.ones(24, dtype=torch.bool), group_size=4, **kw), ref
    )


def test_masked_advantages_exclude_dropped_samples_from_their_group():
    nan, inf = float("nan"), float("inf")
    r = torch.tensor([1.0, 2.0, nan, 4.0, 5.0, inf, nan, -inf, 3.0, 3.0, 1.0, 2.0])
    g = torch.arange(12) // 4
    keep, n = drop_nonfinite(r, g)
    adv = group_advantages_masked(r, g, keep, clip=5.0)
    assert n == 4 and torch.isfinite(adv).all()
    assert (adv[~keep] == 0).all()
    # group 0: the kept three alone
    assert torch.equal(adv[[0, 1, 3]], group_advantages(r[[0, 1, 3]], group_size=3, clip=5.0))
    # group 1 has a single finite sample left: a flat group, all zero
    assert (adv[4:8] == 0).all()
    # group 2 untouched by the others' drops
    assert torch.equal(adv[8:], group_advantages(r[8:], group_size=4, clip=5.0))
    # global std over the kept samples only
    glob = group_advantages_masked(r, g, keep, global_std=True)
    assert torch.isfinite(glob).all() and (glob[~keep] == 0).all()
    assert torch.equal(glob[keep], group_advantages(r[keep], group_ids=g[keep], global_std=True))
    none_kept = group_advantages_masked(r, g, torch.zeros(12, dtype=torch.bool))
    assert torch.equal(none_kept, torch.zeros(12)) and all_zero(none_kept)
    assert not all_zero(adv) and all_zero(torch.zeros(3))
    with pytest.raises(ConfigError):
        group_advantages_masked(r, g, keep[:5])


def test_nonfinite_guard_counts_consecutive_bad_iterations_and_checkpoints():
    guard = NonFiniteGuard(3)
    assert [guard.record(b) for b in (True, True, False, True, True)] == [False] * 5
    assert guard.consecutive == 2 and guard.total == 4
    state = json.loads(json.dumps(guard.state_dict()))  # goes into state.json
    resumed = NonFiniteGuard(3)
    resumed.load_state_dict(state)
    assert resumed.record(True) is True and resumed.stop
    assert "3 consecutive" in resumed.message() and "5 bad" in resumed.message()
    assert resumed.record(False) is False and resumed.consecutive == 0
    never = NonFiniteGuard(0)
    assert not any(never.record(True) for _ in range(100))
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ConfigError):
            NonFiniteGuard(bad)
