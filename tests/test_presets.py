"""Shipped presets: the repository's ``configs/`` and the package's ``solace/configs/`` hold the same files,
the released-code preset carries the released code's settings, and every prompt file a preset names ships."""

from __future__ import annotations

from pathlib import Path

from solace.trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_PRESETS = ROOT / "solace" / "configs"


def _presets() -> list[Path]:
    """The training presets (accelerate's launch configs under accelerate/ are not solace configs)."""
    return sorted(p for p in PACKAGE_PRESETS.rglob("*.yaml") if "accelerate" not in p.parts)


def test_repository_and_package_presets_are_identical():
    repo = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    pkg = sorted(p.relative_to(PACKAGE_PRESETS) for p in PACKAGE_PRESETS.rglob("*.yaml"))
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


def _prompt_files(cfg) -> list[tuple[str, str]]:
    builtin = ("toy", "toy_heldout", "toy_train_eval")
    named = [("data.train_prompts", cfg.data.train_prompts), ("eval.prompts", cfg.eval.prompts)]
    return [(f, v) for f, v in named if v not in builtin]


def test_every_prompt_file_a_shipped_preset_names_ships(monkeypatch):
    monkeypatch.chdir(ROOT)
    named = {}
    for path in _presets():
        cfg = load_config(str(path), check_paths=False)
        for field, value in _prompt_files(cfg):
            named[(path.name, field)] = value
            assert (ROOT / value).is_file(), f"{path.name}: {field} = {value} does not ship"
    # the SD3.5-M presets train on the shipped Pick-a-Pic prompts, kept out of the package
    for name in ("sd35m.yaml", "sd35m_nft.yaml"):
        assert named[(name, "data.train_prompts")] == str(ROOT / "data/prompts/pickscore_train.txt")
    assert not list((ROOT / "solace").rglob("*.txt"))  # no prompt file inside the installed package
    # they read cleanly through the one prompt reader (the check `solace train` does), from any folder
    monkeypatch.chdir(ROOT / "solace")
    cfg = load_config("sd35m", check_paths=True)
    assert cfg.data.train_prompts.endswith("pickscore_train.txt")
    notes = " ".join((ROOT / "data" / "prompts" / "README.md").read_text().split())
    assert "Flow-GRPO" in notes and "OCR" in notes and "not available" in notes


def test_large_model_presets_bound_their_checkpoints():
    """SD3.5 / FLUX checkpoints are 0.27-0.78 GiB each (BENCHMARKS.md, Memory): their presets keep the
    newest 3; the toy presets keep all (0)."""
    for name in ("sd35m", "sd35m_nft", "flux"):
        assert load_config(name, check_paths=False).train.checkpoints_total_limit == 3, name
    assert load_config("toy", check_paths=False).train.checkpoints_total_limit == 0
