"""The package's structure, read from the source (AST) of every module of ``solace/``:

* no import cycle, counting every ``import`` / ``from ... import`` of a solace module, at module level
  (``if TYPE_CHECKING:`` blocks included: a type-only import still ties the two modules together) and inside
  functions alike (relative imports resolved; ``from solace.x import y`` is an import of the module
  ``solace.x.y`` where ``y`` is a submodule);
* nothing outside ``solace/toy/`` names the toy world: no import of ``solace.toy``, no module, identifier
  (names, attributes, function / class / argument names, import aliases) or string constant containing
  ``toy`` in any case (docstrings may mention it; comments are not read). The toy world registers itself
  through its plugin (:mod:`solace.toy.plugin`), so everything else reaches it by registered name.

Each checker is also run on a small synthetic case where it must fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "solace"
WORLD = "toy"
WORLD_PACKAGE = f"solace.{WORLD}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """``{module: (source, is_package)}`` of every ``.py`` file under ``root``."""
    return {
        module_name(p, root): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in root.rglob("*.py")
    }


def imported_modules(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The solace modules ``module`` imports anywhere (module level, ``TYPE_CHECKING`` blocks, functions)."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == "solace" or base.startswith("solace.")):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    out.add(sub)  # a submodule
                elif base in known:
                    out.add(base)
    out.discard(module)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    known = set(sources)
    return {m: imported_modules(m, src, pkg, known) for m, (src, pkg) in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (first statement of a module, class or function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    out.add(id(first.value))
    return out


def world_namings(
    module: str, source: str, is_package: bool, known: set[str], word: str = WORLD
) -> list[str]:
    """Where ``module`` names the embedded world ``word``: imports of its package, the module's own name,
    identifiers and string constants (docstrings excepted), one line each (``module:line: what``)."""
    found: list[str] = []
    pkg = f"solace.{word}"
    if word in module.lower():
        found.append(f"{module}: the module's name")
    tree = ast.parse(source)
    for m in imported_modules(module, source, is_package, known | {pkg}):
        if m == pkg or m.startswith(pkg + "."):
            found.append(f"{module}: imports {m}")
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.asname or node.name]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names = list(node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if word in node.value.lower():
                found.append(f"{module}:{node.lineno}: string {node.value[:60]!r}")
        for n in names:
            if word in n.lower():
                found.append(f"{module}:{getattr(node, 'lineno', 0)}: name {n!r}")
    return found


# ------------------------------------------------------------------------------------------------ the package


def test_no_import_cycles_in_the_package():
    cycles = import_cycles(import_graph(package_sources()))
    assert not cycles, "import cycles (module-level and function-level imports): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_nothing_outside_the_world_package_names_it():
    sources = package_sources()
    known = set(sources)
    found = [
        line
        for m, (src, pkg) in sorted(sources.items())
        if not (m == WORLD_PACKAGE or m.startswith(WORLD_PACKAGE + "."))
        for line in world_namings(m, src, pkg, known)
    ]
    assert not found, f"{len(found)} namings of the toy world outside solace/toy/:\n" + "\n".join(found)


def test_the_world_registers_through_its_plugin():
    """What the checks above forbid elsewhere is reachable by name: the plugin registers it."""
    from solace.cli.plugins import COMMANDS
    from solace.evaluation.evaluators import EVALUATORS
    from solace.prompts import PROMPT_SETS
    from solace.rewards.prompt_edits import EDIT_PROVIDERS
    from solace.rewards.registry import REWARDS

    assert {"toy", "toy_heldout", "toy_train_eval"} <= set(PROMPT_SETS.names())
    assert "toy" in EVALUATORS and "toy" in EDIT_PROVIDERS and "toy" in COMMANDS
    assert "toy_geneval" in REWARDS


# ------------------------------------------------------------------------------------ the checkers must fail


def _sources(**mods: str) -> dict[str, tuple[str, bool]]:
    return {name.replace("__", "."): (src, False) for name, src in mods.items()}


def test_cycle_checker_finds_a_two_module_cycle_through_a_function_level_import():
    sources = _sources(
        solace__a="from solace import b\n",
        solace__b="def f():\n    from solace.a import x\n    return x\n",
        solace__c="import solace.a\n",
    )
    assert import_cycles(import_graph(sources)) == [["solace.a", "solace.b"]]
    # a type-only import under TYPE_CHECKING ties the modules together too
    sources["solace.b"] = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from solace.a import x\n",
        False,
    )
    assert import_cycles(import_graph(sources)) == [["solace.a", "solace.b"]]
    sources["solace.b"] = ("import os\n", False)  # the edge removed: no cycle
    assert import_cycles(import_graph(sources)) == []


def test_cycle_checker_resolves_relative_and_submodule_imports():
    sources = {
        "solace.p": ("", True),
        "solace.p.one": ("from . import two\n", False),
        "solace.p.two": ("from .one import thing\n", False),
    }
    assert import_graph(sources)["solace.p.one"] == {"solace.p.two"}
    assert import_cycles(import_graph(sources)) == [["solace.p.one", "solace.p.two"]]


def test_naming_checker_flags_imports_identifiers_and_strings_not_docstrings():
    known = {"solace.toy", "solace.toy.world", "solace.other"}
    clean = (
        '"""The toy world is mentioned in docstrings only."""\n\ndef f(x):\n    """A Toy."""\n    return x\n'
    )
    assert world_namings("solace.other", clean, False, known) == []
    cases = {
        "import solace.toy.world\n": "imports solace.toy.world",
        "from solace.toy import world\n": "imports solace.toy.world",
        "def load(toy_weights):\n    return toy_weights\n": "name 'toy_weights'",
        "class ToyThing:\n    pass\n": "name 'ToyThing'",
        "x = adapter.is_toy\n": "name 'is_toy'",
        "f(model='TOY')\n": "string 'TOY'",
        "def g(a):\n    return f'a {a} toy'\n": "string ' toy'",
        "f(toy=1)\n": "name 'toy'",
    }
    for src, what in cases.items():
        found = world_namings("solace.other", src, False, known)
        assert any(what in line for line in found), (src, found)
    assert world_namings("solace.models.toy", "", False, known) == ["solace.models.toy: the module's name"]


def function_level_solace_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """``module:line`` of every ``import solace...`` / ``from solace... import`` inside a function."""
    found = []
    for module, (source, _) in sources.items():
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                if isinstance(node, ast.ImportFrom) and node.level:
                    names = ["solace"]  # a relative import inside the package
                if any(n == "solace" or n.startswith("solace.") for n in names):
                    found.append(f"{module}:{node.lineno}")
    return found


def test_no_solace_import_inside_a_function():
    """Solace's own modules are imported at the top (heavy optional dependencies such as diffusers or
    open_clip may still load inside the function that needs them); the checker catches one that is not."""
    assert function_level_solace_imports(package_sources()) == []
    bad = _sources(a="def f():\n    from solace.b import x\n    return x\n", b="x = 1\n")
    assert function_level_solace_imports(bad) == ["a:2"]


def test_the_trainer_module_is_the_loop_only():
    """``solace/trainer/trainer.py`` stays the loop: at most 450 lines (setup, scoring, checkpoints and
    updates live in their own modules)."""
    n = len((ROOT / "trainer" / "trainer.py").read_text().splitlines())
    assert n <= 450, f"solace/trainer/trainer.py has {n} lines"


def test_docs_imports_name_what_exists():
    """Every ``from solace... import a, b`` line in the docs' code (README, docs/) imports: an API renamed
    without its guide fails here."""
    import importlib
    import re

    docs = [ROOT.parent / "README.md", *sorted((ROOT.parent / "docs").glob("*.md"))]
    lines = {
        (d.name, m.group(1), m.group(2))
        for d in docs
        for m in re.finditer(r"^\s*from (solace[\w.]*) import ([\w, ]+)$", d.read_text(), flags=re.M)
    }
    assert len(lines) >= 5, "the extending guide's code imports solace's registries"
    missing = [
        f"{doc}: from {mod} import {name.strip()}"
        for doc, mod, names in sorted(lines)
        for name in names.split(",")
        if not hasattr(importlib.import_module(mod), name.strip())
    ]
    assert not missing, missing
    assert not hasattr(importlib.import_module("solace.registry"), "NoSuchRegistry")  # the check can fail
