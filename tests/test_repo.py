"""Repository invariants: CI runs exactly the README's test command; presets are reachable from configs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [
        line.strip()
        for line in ci.splitlines()
        if line.strip() and not line.startswith("#") and line.startswith("python3")
    ]
    assert ci_cmds == [test_cmd]
    assert 'rc" -eq 5' in ci  # pytest's "no tests collected" is a failure


def test_readme_main_command_trains_the_toy_preset():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert blocks[0].endswith("solace train --config configs/toy.yaml")
    assert (ROOT / "configs" / "toy.yaml").exists()
