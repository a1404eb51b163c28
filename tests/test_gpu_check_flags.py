"""``bench/gpu_check.py`` measures ``solace train``'s own Trainer, not a copy of it: run as a command on
a tiny pipeline on the CPU, its flags land in the trainer's config and drive the forwards it counts, and a
change to the trainer's update (a setting it reads, or its loss patched) changes the benchmark's result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import TENFOLD_LOSS

from solace.sampling.sampler import sample

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    cmd = [sys.executable, str(ROOT / "bench" / "sd3_pipeline.py"), str(folder), "--size", "tiny"]
    subprocess.run(cmd + ["--dtype", "fp32", "--device", "cpu"], env=ENV, check=True, timeout=300)
    return folder


def run_bench(tmp: Path, pipeline: Path, *args: str, patch: str | None = None) -> dict:
    """The benchmark's JSON after one tiny iteration (``patch``: a script that runs it after a change)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "result.json"
    cmd = [sys.executable]
    if patch:
        (tmp / "patched.py").write_text(patch)
        cmd.append(str(tmp / "patched.py"))
    cmd += [str(BENCH), "--tiny", "--iters", "1", "--pipeline", str(pipeline), "--out", str(tmp / "run")]
    cmd += ["--json", str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_flags_reach_the_trainer_and_its_forwards(tmp_path, pipeline):
    res = run_bench(tmp_path, pipeline, "--no-t5", "--offload-text-encoders", "free", "sampling.group_size=4")
    m = res["config"]["model"]
    assert m["text_encoder_3"] is False and m["offload_text_encoders"] == "free"
    assert m["embedding_cache"] and Path(m["embedding_cache"]).is_dir()  # free needs the disk cache
    assert res["text_encoders"] == {}  # freed after encoding (and T5 never loaded)
    it = res["iterations"][0]
    G, T, K = 4, 2, 2
    assert it["stages"]["sampling"]["rows"] == G * T * 2  # CFG: [null, cond] in one forward
    assert it["stages"]["reward"]["rows"] == K * T * G  # the conditional velocity, no CFG
    assert it["stats"]["reward/mean"] == pytest.approx(it["stats"]["reward/self_confidence_mean"])
    for stage, timer in (("sampling", "time/sampling"), ("reward", "time/reward"), ("update", "time/update")):
        assert it["stages"][stage]["trainer_seconds"] == it["stats"][timer]  # the trainer's own timers


def test_a_change_to_the_trainers_update_changes_the_benchmarks_result(tmp_path, pipeline):
    base = run_bench(tmp_path / "base", pipeline)
    no_kl = run_bench(tmp_path / "beta0", pipeline, "grpo.beta=0")
    tenfold = run_bench(tmp_path / "patched", pipeline, patch=TENFOLD_LOSS)
    b, z, p = (r["iterations"][0] for r in (base, no_kl, tenfold))
    # the samples and rewards come before the update: the same in all three
    assert b["stats"]["reward/mean"] == z["stats"]["reward/mean"] == p["stats"]["reward/mean"]
    # grpo.beta=0: the update computes no KL and runs no LoRA-off reference forward
    assert b["stats"]["train/kl"] > 0 and b["stages"]["update"]["rows_nograd"] > 0
    assert z["stats"]["train/kl"] == 0 and z["stages"]["update"]["rows_nograd"] == 0
    assert z["stages"]["update"]["rows_grad"] == b["stages"]["update"]["rows_grad"]
    assert z["stats"]["train/loss"] != b["stats"]["train/loss"]
    assert z["stages"]["update"]["model_tflop"] < b["stages"]["update"]["model_tflop"]
    # the loss patched to ten times itself: ten times the gradient norm, the same KL (it is not the loss)
    assert p["stats"]["train/grad_norm"] == pytest.approx(10 * b["stats"]["train/grad_norm"], rel=1e-3)
    assert p["stats"]["train/kl"] == pytest.approx(b["stats"]["train/kl"], rel=1e-2)
    assert p["stats"]["train/policy_loss"] == pytest.approx(
        b["stats"]["train/policy_loss"], rel=1e-2, abs=1e-6
    )


def test_sampler_carries_latents_in_the_asked_dtype():
    class Linear:
        dtype = torch.float32

        def velocity(self, z, t, cond):
            return -z

    from solace.models.base import Conditioning

    cond = Conditioning({"x": torch.zeros(2, 1)})
    sig = torch.tensor([1.0, 0.5, 0.0])
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    lo = sample(Linear(), cond, None, sig, noise, 1.0, 0.7, generator=gen, latent_dtype=torch.bfloat16)
    hi = sample(Linear(), cond, None, sig, noise, 1.0, 0.7, generator=torch.Generator().manual_seed(1))
    assert lo.latents.dtype == torch.bfloat16 and hi.latents.dtype == torch.float32
    assert lo.log_probs.dtype == torch.float32
    assert not torch.equal(lo.final.float(), hi.final)  # bf16 rounding is visible
    torch.testing.assert_close(lo.final.float(), hi.final, rtol=0, atol=0.05)
