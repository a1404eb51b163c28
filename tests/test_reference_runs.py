"""Refactors keep behaviour: fixed-seed toy trainings, ``solace rerank`` and ``solace score`` reproduce the
LoRA weights, logged rewards and scores recorded before the structure refactor (issue 14), bitwise.

The reference (``tests/data/reference_runs.safetensors``) was written by ``python tests/reference_runs.py
record`` on the commit before the refactor. Bitwise equality is promised on the CPU and torch build it was
recorded with (its metadata); elsewhere float reductions may round differently, so the comparison falls
back to a tight tolerance there and says so.
"""

from __future__ import annotations

import torch
from reference_runs import REF, platform_tag, run_cases
from safetensors import safe_open
from safetensors.torch import load_file


def test_fixed_seed_runs_match_the_recorded_reference(tmp_path):
    ref = load_file(str(REF))
    with safe_open(str(REF), "pt") as f:
        recorded_on = f.metadata()["platform"]
    got = run_cases(tmp_path)
    assert sorted(got) == sorted(ref)
    bitwise = recorded_on == platform_tag()
    for k, v in ref.items():
        if bitwise:
            assert torch.equal(got[k], v), f"{k} differs from the recorded reference"
        else:  # pragma: no cover - another CPU or torch build than the recording's
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{k} ({recorded_on})")
    # the runs trained something: every case's LoRA B matrices moved off zero
    for case in {k.split(".")[1] for k in ref if k.startswith("train.")}:
        assert any(
            got[k].abs().sum() > 0 for k in got if k.startswith(f"train.{case}.lora.") and "lora_B" in k
        ), case
