"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------------------
# Tiny SD3 / FLUX pipelines (tests/tiny_pipelines.py). Session-scoped: read-only users share them; tests that
# attach LoRA or otherwise mutate a pipeline build their own copy with make_tiny_sd3 / make_tiny_flux.
# ---------------------------------------------------------------------------------------------------------
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_sd3_pipe():
    """Tiny ``StableDiffusion3Pipeline`` with two CLIPs and T5 (seed 0). Do not mutate."""
    from tiny_pipelines import make_tiny_sd3

    return make_tiny_sd3(seed=0, with_t5=True)


@pytest.fixture(scope="session")
def tiny_sd3_pipe_no_t5():
    """Tiny ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3=None``, seed 0). Do not mutate."""
    from tiny_pipelines import make_tiny_sd3

    return make_tiny_sd3(seed=0, with_t5=False)


@pytest.fixture(scope="session")
def tiny_flux_pipe():
    """Tiny ``FluxPipeline`` with guidance embedding (seed 0). Do not mutate."""
    from tiny_pipelines import make_tiny_flux

    return make_tiny_flux(seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tiny_sd3_pipe, tmp_path_factory):
    """``tiny_sd3_pipe`` written with ``save_pretrained`` to a temporary folder."""
    from tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline(tiny_sd3_pipe, tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_flux_folder(tiny_flux_pipe, tmp_path_factory):
    """``tiny_flux_pipe`` written with ``save_pretrained`` to a temporary folder."""
    from tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline(tiny_flux_pipe, tmp_path_factory.mktemp("tiny_flux"))
