# ruff: noqa: E501  (a table of cases: one case a line)
"""Bad inputs and faults, each run on the current code; writes RELIABILITY.md.

    python bench/reliability.py            # about 3 minutes on 2 cores; tiny toy models, no download

Input errors run through the command line in-process (typer's runner): each must exit with code 2 and one
line naming the input and the fix, and leave nothing behind. Faults run ``python -m solace train`` in
subprocesses on a tiny toy model: non-finite rewards, signals, kill -9, a locked folder, damaged
checkpoints, a changed config on resume. The table records the command, what happened (exit code, the
message) and what was kept; a row whose outcome is not the expected one is marked FAIL and the script
exits non-zero.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from trainer_helpers import make_bad_inputs, make_tiny_toy_weights, tiny_overrides  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from solace.cli.main import app

    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output.strip()


def sh(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "solace", *args], env=ENV, capture_output=True, text=True, **kw
    )


def first_error(text: str) -> str:
    """The line that matters: an error, else a stop message, else the first warning."""
    lines = text.splitlines()
    for marker in ("error:", "stopped:", "WARNING", "RuntimeWarning:", "StaleLockWarning:"):
        for ln in lines:
            if marker in ln:
                return ln[ln.index(marker) :].replace("RuntimeWarning:", "warning:")[:230]
    return (text.strip().splitlines() or [""])[-1][:230]


def input_cases(d: Path, w: Path) -> list[tuple[str, list[str], str]]:
    """(what, CLI arguments, text the one-line error must contain)."""
    t = ["train", "--config", "toy", f"train.output_dir={d}/never"]
    s = ["sample", "--out", f"{d}/x.png"]
    return [
        ("unknown preset", ["train", "--config", "nosuch"], "neither a file nor a preset"),
        ("override without =", [*t, "grpo.rho"], "key=value"),
        ("rho = 0", [*t, "grpo.rho=0"], "grpo.rho"),
        ("rho = 1.5", [*t, "grpo.rho=1.5"], "grpo.rho"),
        ("odd K", [*t, "reward.self_confidence.num_probes=3"], "num_probes"),
        ("delta = 0", [*t, "reward.self_confidence.delta=0"], "delta"),
        ("group of 1", [*t, "sampling.group_size=1"], "sampling.group_size"),
        ("unknown KL form", [*t, "grpo.kl_form=wrong"], "grpo.kl_form"),
        ("text for a number", [*t, "sampling.cfg_scale=abc"], "sampling.cfg_scale"),
        ("unknown field", [*t, "grpo.not_a_field=1"], "grpo.not_a_field"),
        ("missing prompt file", [*t, "data.train_prompts=/no/such/file.txt"], "data.train_prompts"),
        ("probed step out of range", [*t, "reward.self_confidence.timesteps=99"], "timesteps"),
        ("trained step out of range", [*t, "grpo.train_steps=10"], "grpo.train_steps"),
        ("negative time budget", [*t, "train.max_minutes=-1"], "train.max_minutes"),
        ("lr = inf", [*t, "optim.lr=inf"], "optim.lr"),
        ("CFG = nan", [*t, "sampling.cfg_scale=nan"], "sampling.cfg_scale"),
        ("every reward weight 0", [*t, "reward.components=[{name: self_confidence, weight: 0.0}]"], "every weight"),
        ("negative threads", [*t, "train.threads=-3"], "train.threads"),
        ("negative non-finite limit", [*t, "train.max_nonfinite=-1"], "train.max_nonfinite"),
        ("unknown update", [*t, "train.algorithm=ppo"], "train.algorithm"),
        ("NFT beta = 0", [*t, "train.algorithm=nft", "nft.beta=0"], "nft.beta"),
        ("Flow-GRPO on the ODE", [*t, "sampling.noise_level=0"], "sampling.noise_level"),
        ("unknown reward", [*t, "reward.components=[{name: nosuch}]"], "unknown reward"),
        ("unknown reward keyword", [*t, "reward.components=[{name: toy_geneval, kwargs: {moode: x}}]"], "moode"),
        ("prompt file not UTF-8", [*t, f"data.train_prompts={d}/latin1.txt"], "UTF-8"),
        ("a folder as prompt file", [*t, f"data.train_prompts={d}/folder"], "folder"),
        ('{"prompt": 42} in .jsonl', [*t, f"data.train_prompts={d}/number.jsonl"], "'prompt'"),
        ('"include": "oops" in GenEval .jsonl', [*t, f"eval.prompts={d}/include.jsonl"], "include"),
        ("bad JSON line", [*t, f"data.train_prompts={d}/bad.jsonl"], "not valid JSON"),
        ("empty prompt file", [*t, f"data.train_prompts={d}/empty.txt"], "no prompts"),
        ("output folder is a file", ["train", "--config", "toy", f"train.output_dir={d}/a_file"], "cannot be written"),
        ("cuda without a GPU", [*t, "train.device=cuda"], "train.device"),
        ("sample --steps 0", [*s, "--steps", "0"], "--steps"),
        ('sample --seeds ","', [*s, "--seeds", ","], "--seeds"),
        ("sample --cfg -5", [*s, "--cfg", "-5"], "--cfg"),
        ("sample --out a folder", ["sample", "--out", str(d / "folder")], "--out"),
        ("garbage safetensors as model", [*s, "--model", f"{d}/garbage.safetensors"], "model"),
        ("garbage safetensors as LoRA", [*s, "--lora", f"{d}/garbage.safetensors"], "lora"),
        ("LoRA of another model", [*s, "--lora", f"{d}/other_lora", "--seeds", "0"], "does not fit"),
        ("eval --samples 0", ["eval", "--suite", "toy", "--samples", "0"], "--samples"),
        ("eval --limit -1", ["eval", "--suite", "toy", "--limit", "-1"], "--limit"),
        ("unknown suite", ["eval", "--suite", "parti", "--prompts", f"{d}/empty.txt"], "unknown suite"),
        ("suite without --prompts", ["eval", "--suite", "drawbench"], "--prompts"),
        ("score --probes 3", ["score", "-p", "a", "--generate", "1", "--probes", "3"], "--probes"),
        ("score without --prompt", ["score", "--generate", "1"], "--prompt"),
        ("rerank --n 0", ["rerank", "--n", "0"], "--n"),
        ("rerank --seeds a", ["rerank", "--seeds", "a"], "--seeds"),
        ("config check, unknown reward", ["config", "check", "toy", "reward.components=[{name: nosuch}]"], "unknown"),
        ("a tiny model that loads", ["sample", "--model", str(w), "--out", f"{d}/ok.png", "--seeds", "0", "--steps", "2"], ""),
    ]  # fmt: skip


def run_inputs(d: Path, w: Path) -> list[dict]:
    rows = []
    for what, args, needle in input_cases(d, w):
        code, out = cli(args)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if needle:
            ok = code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
            written = (d / "never").exists() or (d / "a_file").is_dir()
            kept = "FOLDER WRITTEN" if written else "nothing written"
            ok = ok and not written
            shutil.rmtree(d / "never", ignore_errors=True)
        else:
            ok, kept = code == 0, "the grid"
        rows.append(
            {
                "what": what,
                "command": "solace " + " ".join(args),
                "outcome": f"exit {code}: {(lines or [''])[0][:200]}",
                "kept": kept,
                "ok": ok,
            }
        )
    return rows


def train(w: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "toy", *tiny_overrides(w, out), *extra]


def wait_for(p: Path, proc: subprocess.Popen, limit: float = 300) -> None:
    t0 = time.time()
    while not p.exists() and time.time() - t0 < limit and proc.poll() is None:
        time.sleep(0.02)


def lora_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "lora" / "pytorch_lora_weights.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_faults(d: Path, w: Path) -> list[dict]:
    from solace.trainer.runlock import RunLock

    rows: list[dict] = []

    def row(what: str, command: str, outcome: str, kept: str, ok: bool) -> None:
        rows.append({"what": what, "command": command, "outcome": outcome, "kept": kept, "ok": ok})

    ref = d / "ref"
    r = sh(train(w, ref, "train.iterations=4"))
    row(
        "an uninterrupted reference run",
        "solace train (tiny toy, 4 iterations)",
        f"exit {r.returncode}",
        "LoRA, 4 checkpoints",
        r.returncode == 0,
    )
    # SIGTERM mid-run, then resume
    out = d / "term"
    p = subprocess.Popen(
        [sys.executable, "-m", "solace", *train(w, out, "train.iterations=4", "train.checkpoint_every=100")],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "log.csv", p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    ck = (out / "checkpoints" / "latest").read_text() if (out / "checkpoints" / "latest").exists() else "none"
    r2 = sh([*train(w, out, "train.iterations=4", "train.checkpoint_every=100"), "--resume"])
    eq = r2.returncode == 0 and lora_equal(ref, out)
    row(
        "SIGTERM mid-run, then --resume",
        "kill -TERM <pid>; solace train ... --resume",
        f"exit {p.returncode}: {first_error(err)}",
        f"checkpoint {ck}; resumed LoRA {'bitwise equal' if eq else 'DIFFERS'}",
        p.returncode == 143 and eq,
    )
    # SIGINT twice: the second aborts at once
    out = d / "int2"
    p = subprocess.Popen(
        [sys.executable, "-m", "solace", *train(w, out, "train.iterations=50")],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "log.csv", p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    p.communicate()
    row(
        "Ctrl-C twice",
        "kill -INT <pid> twice",
        f"exit {p.returncode}",
        "the last checkpoint (aborted at once)",
        p.returncode in (-2, 130),
    )
    # kill -9 mid-run, then resume
    out = d / "kill"
    p = subprocess.Popen(
        [sys.executable, "-m", "solace", *train(w, out, "train.iterations=4")],
        env=ENV,
        stderr=subprocess.DEVNULL,
    )
    wait_for(out / "checkpoints" / "iter_000002", p)
    p.kill()
    p.wait()
    mid = not (out / "lora").exists()
    r2 = sh([*train(w, out, "train.iterations=4"), "--resume"])
    eq = r2.returncode == 0 and lora_equal(ref, out)
    row(
        "kill -9 mid-run, then --resume",
        "kill -9 <pid>; solace train ... --resume",
        f"killed mid-training: {mid}",
        f"resumed LoRA {'bitwise equal' if eq else 'DIFFERS'}",
        mid and eq,
    )
    # a second run into a locked folder; a stale lock
    out = d / "locked"
    with RunLock(out):
        r = sh(train(w, out))
    row(
        "a second run into a live run's folder",
        "solace train (same train.output_dir)",
        f"exit {r.returncode}: {first_error(r.stderr)}",
        "the first run's files untouched",
        r.returncode == 2 and "train.output_dir" in r.stderr,
    )
    out = d / "stale"
    out.mkdir()
    (out / ".solace.lock").write_text(json.dumps({"pid": 999999, "host": os.uname().nodename, "token": "x"}))
    r = sh(train(w, out, "train.iterations=1"))
    row(
        "a stale lock (dead pid)",
        "solace train into a folder whose lock holder died",
        f"exit {r.returncode}: {first_error(r.stdout + r.stderr)}",
        "lock taken over with a warning",
        r.returncode == 0,
    )
    # non-finite rewards
    out = d / "nan1"
    r = sh(
        [
            *train(
                w,
                out,
                "reward.components=[{name: toy_geneval, weight: 1.0, kwargs: {mode: dense}}]",
                "optim.lr=inf",
            )
        ]
    )
    row(
        "lr = inf on the command line",
        "solace train optim.lr=inf",
        f"exit {r.returncode}: {first_error(r.stderr)}",
        "nothing written",
        r.returncode == 2,
    )
    for what, extra, want in (
        (
            "NaN reward for one sample per batch",
            ["reward.components=[{name: test_nonfinite, weight: 1.0}]"],
            0,
        ),
        (
            "inf reward for one sample per batch",
            ["reward.components=[{name: test_nonfinite, weight: 1.0, kwargs: {value: inf}}]"],
            0,
        ),
        (
            "NaN reward for every sample",
            [
                "reward.components=[{name: test_nonfinite, weight: 1.0, kwargs: {every: true}}]",
                "train.iterations=4",
                "train.max_nonfinite=2",
            ],
            2,
        ),
    ):
        out = d / f"nf{len(rows)}"
        r = subprocess.run(
            [sys.executable, str(HERE / "reliability_nonfinite.py"), str(w), str(out), *extra],
            env=ENV,
            capture_output=True,
            text=True,
        )
        ck = (
            sorted(p.name for p in (out / "checkpoints").glob("iter_*"))
            if (out / "checkpoints").exists()
            else []
        )
        row(
            what,
            "a registered reward returning it; solace train",
            f"exit {r.returncode}: {first_error(r.stdout + r.stderr)}",
            f"checkpoints {ck}; {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}",
            r.returncode == want,
        )
    # resume cases
    base = d / "res"
    sh(train(w, base, "train.iterations=3", "train.checkpoint_every=1"))
    before = (base / "config.yaml").read_text()
    r = sh([*train(w, base, "train.iterations=4", "optim.lr=0.5"), "--resume"])
    field = next((ln.strip() for ln in r.stderr.splitlines() if "optim.lr" in ln), "")
    row(
        "--resume with a changed lr",
        "solace train ... optim.lr=0.5 --resume",
        f"exit {r.returncode}: {first_error(r.stderr)} {field}",
        "config.yaml unchanged" if (base / "config.yaml").read_text() == before else "CONFIG OVERWRITTEN",
        r.returncode == 2 and "optim.lr" in r.stderr,
    )
    r = sh([*train(w, base, "train.iterations=4", "optim.lr=0.5"), "--resume", "--allow-changes"])
    row(
        "--resume --allow-changes",
        "solace train ... optim.lr=0.5 --resume --allow-changes",
        f"exit {r.returncode}: {first_error(r.stdout)}",
        "continued from iteration 3",
        r.returncode == 0,
    )
    for what, damage in (
        ("newest state.json truncated", lambda c: (c / "state.json").write_text('{"iter')),
        ("newest lora.safetensors garbage", lambda c: (c / "lora.safetensors").write_bytes(b"junk" * 10)),
        (
            "newest optimizer.safetensors cut short",
            lambda c: (c / "optimizer.safetensors").write_bytes(
                (c / "optimizer.safetensors").read_bytes()[:-7]
            ),
        ),
        ("latest points to a missing folder", lambda c: (c.parent / "latest").write_text("iter_000099")),
    ):
        out = d / f"dmg{len(rows)}"
        sh(train(w, out, "train.iterations=3"))
        newest = out / "checkpoints" / "iter_000003"
        damage(newest)
        (out / "checkpoints" / ".tmp_iter_000004_1").mkdir()
        r = sh([*train(w, out, "train.iterations=3"), "--resume"])
        rows_after = len((out / "log.csv").read_text().splitlines()) - 1
        row(
            what,
            "solace train ... --resume",
            f"exit {r.returncode}: {first_error(r.stderr.replace('RuntimeWarning', 'WARNING'))[:200]}",
            f"older intact checkpoint used; log.csv {rows_after} rows; .tmp removed: {not (out / 'checkpoints' / '.tmp_iter_000004_1').exists()}",
            r.returncode == 0 and rows_after == 3,
        )
    out = d / "nothing"
    r = sh([*train(w, out, "train.iterations=1"), "--resume"])
    row(
        "--resume with nothing to resume",
        "solace train ... --resume (empty folder)",
        f"exit {r.returncode}: {first_error(r.stdout)}",
        "a new run",
        r.returncode == 0 and "no checkpoint" in r.stdout,
    )
    return rows


def main() -> int:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        w = make_tiny_toy_weights(d / "tiny_toy.safetensors")
        make_bad_inputs(d, w)
        t0 = time.time()
        rows = run_inputs(d, w) + run_faults(d, w)
        wall = time.time() - t0
    bad = [r for r in rows if not r["ok"]]
    lines = [
        "# Reliability: bad inputs and faults",
        "",
        f"Measured by `python bench/reliability.py` on the final code ({len(rows)} cases, {wall / 60:.1f} min on 2 cores, "
        f"{len(rows) - len(bad)} as expected). Input errors run through the command line (exit code 2, one line "
        "naming the input and the fix, nothing written); faults run `solace train` on a tiny toy model in a "
        "subprocess. `tests/test_run_safety.py` and `tests/test_reliability.py` assert the same behaviours.",
        "",
        "| # | case | command | outcome | kept | as expected |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        cells = [
            str(i),
            r["what"],
            f"`{r['command'][:140]}`",
            r["outcome"].replace("|", "/"),
            r["kept"].replace("|", "/"),
            "yes" if r["ok"] else "**FAIL**",
        ]
        lines.append("| " + " | ".join(c.replace("\n", " ") for c in cells) + " |")
    (ROOT / "RELIABILITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
