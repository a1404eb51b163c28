"""Shipped presets: the repository's ``configs/`` and the package's ``solace/configs/`` hold the same files,
the released-code preset carries the released code's settings, and every prompt file a preset names ships."""

from __future__ import annotations

from pathlib import Path

from solace.trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_PRESETS = ROOT / "solace" / "configs"


def _presets() -> list[Path]:
    return sorted(PACKAGE_PRESETS.rglob("*.yaml"))


def test_repository_and_package_presets_are_identical():
    repo = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    pkg = [p.relative_to(PACKAGE_PRESETS) for p in _presets()]
    assert repo == pkg and len(pkg) > 10
    for rel in pkg:
        assert (ROOT / "configs" / rel).read_bytes() == (PACKAGE_PRESETS / rel).read_bytes(), rel


def test_released_code_preset_uses_the_released_delta():
    released = load_config("toy_released_code", check_paths=False).reward.self_confidence
    paper = load_config("toy", check_paths=False).reward.self_confidence
    assert released.delta == 1e-6  # the authors' released code
    assert paper.delta == 1e-3  # our default (the paper leaves delta unset)
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if "`reward.self_confidence.delta`" in line)
    assert "1e-3" in row and "1e-6" in row
