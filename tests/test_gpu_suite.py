"""``bench/gpu_suite.sh`` on tiny models on the CPU (``TINY=1``; the toy runs left out): its stage timeouts
add up to 540 s at most, every stage runs through the real shell wiring and writes its JSON, the SD3.5-M
stages are the trainer's own iterations (their forwards counted), and the collector gathers one
``gpu_suite.json``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER_STAGES = ("sd35m", "sd35m_encoders", "sd35m_offloaded")


def test_gpu_suite_tiny_runs_every_model_stage_into_one_json(tmp_path):
    env = {**os.environ, "TINY": "1", "SKIP_TOY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    total = int(re.search(r"stage timeouts: (\d+) s in all", r.stdout).group(1))
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    st = res["stages"]
    limits = [st[n]["status"]["timeout"] for n in ("build", *TRAINER_STAGES, "flux_memory")]
    assert total <= 540 and sum(limits) < total  # + the toy runs' timeout, left out here
    for name in ("build", *TRAINER_STAGES, "flux_memory"):
        assert st[name]["status"]["rc"] == 0, (name, (tmp_path / f"{name}.log").read_text()[-2000:])
    main = st["sd35m"]["result"]
    assert len(main["iterations"]) == 2  # a warm-up, then the measured one
    it = main["iterations"][-1]
    assert set(it["stages"]) == {"sampling", "reward", "update"}
    # the trainer's forwards at G=2, T=2, K=2, window ceil(0.6 * 2) = 2 steps, CFG in sampling and training
    assert it["stages"]["sampling"]["rows"] == 2 * 2 * 2
    assert it["stages"]["reward"]["rows"] == 2 * 2 * 2
    assert it["stages"]["update"]["rows_grad"] == it["stages"]["update"]["rows_nograd"] == 2 * 2 * 2
    for key in ("time/sampling", "time/reward", "time/update", "train/loss", "train/kl", "train/grad_norm"):
        assert math.isfinite(it["stats"][key]), key
    f = main["flops_per_row"]
    # a backward through frozen weights with a LoRA: input gradients (and attention's), not two forwards
    assert f["forward"] < f["forward_backward"] < 3 * f["forward"]
    up = it["stages"]["update"]
    assert math.isclose(
        up["model_tflop"] * 1e12, up["rows_grad"] * f["forward_backward"] + up["rows_nograd"] * f["forward"]
    )
    enc, off = st["sd35m_encoders"]["result"], st["sd35m_offloaded"]["result"]
    assert (
        main["config"]["model"]["text_encoder_3"] is False and "text_encoder_3" not in main["text_encoders"]
    )
    assert enc["config"]["model"]["text_encoder_3"] is True and "text_encoder_3" in enc["text_encoders"]
    assert enc["config"]["model"]["offload_text_encoders"] == "off"
    assert off["config"]["model"]["offload_text_encoders"] == "cpu"
    assert main["text_tokens"] == enc["text_tokens"] == off["text_tokens"]  # T5 off: zeros, same count
    flux = st["flux_memory"]["result"]
    assert flux["lora_grads_finite"] and flux["lora_params"] > 0
    assert {"sampling", "reward", "train"} <= set(flux)
    assert "toy_runs" in st and st["toy_runs"]["status"] is None  # left out by SKIP_TOY
