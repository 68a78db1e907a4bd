from __future__ import annotations

import types

import pytest

from harness._registry import Registry, UnknownNameError


def test_register_get_and_duplicates():
    reg: Registry = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        """First widget.

        More text that is not part of the one-line description."""

    assert reg.get("alpha") is Alpha
    assert reg.describe() == [("alpha", "First widget.")]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(type("Other", (), {}))


def test_unknown_name_suggests_and_lists():
    reg: Registry = Registry("widget")
    for name in ("int8-dynamic", "int8-torchao", "fp32"):
        reg.register(name)(type(name, (), {}))
    with pytest.raises(UnknownNameError) as err:
        reg.get("int8-dinamic")
    assert str(err.value) == (
        "Unknown widget 'int8-dinamic'. Did you mean 'int8-dynamic', 'int8-torchao'? "
        "Available: fp32, int8-dynamic, int8-torchao"
    )


def test_pattern_binds_named_groups():
    reg: Registry = Registry("widget")

    @reg.register_pattern("w-N", r"w-(?P<n>\d+)")
    def make(n: str) -> int:
        """Numbered widgets."""
        return int(n) * 2

    assert reg.get("w-21")() == 42
    assert reg.names() == ["w-N"]
    with pytest.raises(UnknownNameError):
        reg.get("w-x")


class _FakeEntryPoint:
    def __init__(self, name, obj=None, error=None, dist="some-plugin", on_load=None):
        self.name, self._obj, self._error, self._on_load = name, obj, error, on_load
        self.dist = types.SimpleNamespace(name=dist)

    def load(self):
        if self._on_load:
            self._on_load()
        if self._error:
            raise self._error
        return self._obj


def test_entry_points_load_and_broken_plugins_are_reported(monkeypatch):
    class Good:
        """An outside plugin."""

    eps = [_FakeEntryPoint("good", Good), _FakeEntryPoint("broken", error=ImportError("no module named zzz"))]
    monkeypatch.setattr("harness._registry.entry_points", lambda group: eps if group == "test.group" else [])
    reg: Registry = Registry("widget", entry_point_group="test.group")
    assert reg.get("good") is Good
    assert reg.load_errors == {"broken": "ImportError: no module named zzz (from package some-plugin)"}
    with pytest.raises(UnknownNameError, match="'broken' failed to load: ImportError"):
        reg.get("broken")
    assert "broken" not in reg.names()


def test_entry_point_may_not_take_a_builtin_name(monkeypatch):
    reg: Registry = Registry("widget", entry_point_group="test.group")

    @reg.register("alpha")
    class Alpha:
        pass

    monkeypatch.setattr("harness._registry.entry_points", lambda group: [_FakeEntryPoint("alpha", object)])
    assert reg.get("alpha") is Alpha
    assert "registered twice" in reg.load_errors["alpha"]


def test_builtins_load_first_and_a_clashing_plugin_is_refused_whole(monkeypatch):
    """A plugin found first on sys.path may not replace a built-in, nor keep what it registered before the clash."""
    reg: Registry = Registry("widget", entry_point_group="test.group")

    class Impostor:
        pass

    class Extra:
        pass

    class Builtin:
        pass

    def impostor_module():  # registers a new name, then a built-in's name, as a plugin module's decorators do
        reg.register("extra")(Extra)
        reg.register("alpha")(Impostor)

    eps = [_FakeEntryPoint("impostor", types.ModuleType("impostor"), on_load=impostor_module, dist="impostor-pkg"),
           _FakeEntryPoint("builtin", types.ModuleType("builtin"), dist="exitbench",
                           on_load=lambda: reg.register("alpha")(Builtin))]
    monkeypatch.setattr("harness._registry.entry_points", lambda group: eps)
    assert reg.get("alpha") is Builtin
    assert reg.names() == ["alpha"]  # "extra" rolled back with the refused plugin
    error = reg.load_errors["impostor"]
    assert "'alpha' is registered twice" in error and "Builtin" in error and "impostor-pkg" in error


def test_a_plugin_that_exits_on_import_is_reported_not_fatal(monkeypatch):
    def leave():
        raise SystemExit(3)

    class Good:
        pass

    eps = [_FakeEntryPoint("quitter", on_load=leave), _FakeEntryPoint("good", Good)]
    monkeypatch.setattr("harness._registry.entry_points", lambda group: eps)
    reg: Registry = Registry("widget", entry_point_group="test.group")
    assert reg.names() == ["good"]
    assert reg.load_errors["quitter"].startswith("SystemExit: 3")


def test_pattern_names_are_contained():
    from harness.quantizers import QUANTIZERS

    assert "fake-w4a8" in QUANTIZERS and "fake-w9a9" not in QUANTIZERS and "int8-dynamic" in QUANTIZERS
