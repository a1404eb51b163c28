"""solace.registry: names register once, an unknown name fails naming the field, plugins import once."""

import sys

import pytest

from solace.errors import ConfigError
from solace.registry import Registry, import_plugin, load_plugins


def test_register_get_and_unknown_name():
    r: Registry[int] = Registry("widget", "section.widget")
    r.register("a", 1)

    @r.register("b")
    def b() -> int:
        return 2

    assert r.get("a") == 1 and r.get("b") is b and r.names() == ["a", "b"] and "a" in r
    with pytest.raises(ConfigError, match=r"section.widget: no widget named 'c'; registered: a, b"):
        r.get("c")
    r.register("a", 1)  # the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", 3)


def test_plugins_load_from_entry_points_and_by_name(tmp_path, monkeypatch):
    load_plugins()
    assert "solace.toy.plugin" in sys.modules  # the embedded world's entry point
    (tmp_path / "my_plugin_mod.py").write_text("import solace\nsolace._test_marker = 41\n")
    (tmp_path / "broken_plugin_mod.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import solace

    load_plugins(["my_plugin_mod"])
    assert solace._test_marker == 41
    with pytest.raises(ConfigError, match="plugins: no plugin module named 'nope_mod'"):
        import_plugin("nope_mod")
    with pytest.raises(ConfigError, match="ModuleNotFoundError.*install what it imports"):
        import_plugin("broken_plugin_mod")
