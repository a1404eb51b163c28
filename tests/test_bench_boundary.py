"""bench/ uses the library, the tests use the library: no test module brings bench code into the test process
(an import of a bench module, ``bench`` put on ``sys.path``, ``runpy`` / ``importlib`` on a bench file).
Running a bench script as a command (a subprocess) is fine: that is how its users run it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = {"bench"} | {p.stem for p in (ROOT / "bench").glob("*.py")}
LOADERS = {"run_path", "run_module", "import_module", "spec_from_file_location", "SourceFileLoader"}


def _mentions_bench(node: ast.AST) -> bool:
    """Whether a string constant under ``node`` names the bench folder or one of its modules."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            text = sub.value
            if "bench" in text.split("/") or text in BENCH_MODULES or text.startswith("bench."):
                return True
        if isinstance(sub, ast.Name | ast.Attribute) and "BENCH" in ast.unparse(sub).upper():
            return True
    return False


def bench_imports(source: str) -> list[str]:
    """The lines of ``source`` (a test module) that bring bench code into the process running it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            loads = attr in LOADERS or (owner == "sys.path" and attr in ("insert", "append", "extend"))
            if loads and any(_mentions_bench(a) for a in node.args):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        else:
            continue
        if any(n.split(".")[0] in BENCH_MODULES for n in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_module_imports_bench_code():
    offenders = {
        p.name: hits
        for p in sorted((ROOT / "tests").glob("*.py"))
        if (hits := bench_imports(p.read_text(encoding="utf-8")))
    }
    assert not offenders, f"tests import bench code (run the script as a command instead): {offenders}"


def test_the_check_catches_every_way_in():
    must_fail = [
        "import bench.grad_snr",
        "from bench.grad_snr import policy_grad",
        "import signal_report",
        "from edit_gap import own_samples",
        "import sys\nsys.path.insert(0, str(ROOT / 'bench'))",
        "import sys\nsys.path.append('bench')",
        "import runpy\nrunpy.run_path(str(ROOT / 'bench' / 'gpu_check.py'))",
        "import runpy\nrunpy.run_path(BENCH)",
        "import importlib\nimportlib.import_module('bench.signal_report')",
    ]
    for src in must_fail:
        assert bench_imports(src), src
    may_pass = [
        "import subprocess\nsubprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py')])",
        "from solace.toy.world import CATEGORIES",
        "from trainer_helpers import tiny_overrides",
        "PATCH = 'import runpy; runpy.run_path(sys.argv[0])'",  # text of a script run as a subprocess
        "x = (ROOT / 'bench' / 'data' / 'overfit_two.jsonl').read_text()",
    ]
    for src in may_pass:
        assert not bench_imports(src), src
