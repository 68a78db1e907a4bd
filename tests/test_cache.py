"""The on-disk caches (classifiers, traces, fits, fitted policies): keys, digests, save checks, unwritable folders."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys

import numpy as np
import pytest

from harness.cli import main
from harness.config import HarnessConfig
from harness.session import Session
from harness.policy import METHODS, create_method
from harness.session import fit_digest
from methods.cls_ee import ClsEE

PLUGIN = '''
from harness.policy import Decision
from methods._heads import PerLayerHeads


class CacheTestPlugin(PerLayerHeads):
    """An outside method built on the shared heads: exit when a head is at least half sure."""

    name = "cache-test-plugin"
    fits = 0

    def fit(self, ctx):
        type(self).fits += 1
        super().fit(ctx)

    def decide(self, layer, view):
        logits = self.layer_logits(layer, view)
        return Decision(exit=logits.softmax(-1).amax(-1) >= 0.5, logits=logits)
'''


def _context(cache_dir) -> Session:
    return Session(HarnessConfig(limit=64, batch_size=64, cache_dir=str(cache_dir)), progress=False)


@pytest.fixture(scope="module")
def _warm_cache(tmp_path_factory):
    """A cache holding the classifier and the traces of the fit splits, built once for this module."""
    root = tmp_path_factory.mktemp("warm") / "cache"
    _context(root).fit_context()
    return root


@pytest.fixture
def warm_dir(_warm_cache, tmp_path):
    """This test's own copy of the warm cache (the tests damage their entries)."""
    return shutil.copytree(_warm_cache, tmp_path / "cache")


def _register(monkeypatch, cls) -> None:
    """Register ``cls`` under ``cls.name`` for this test only."""
    METHODS.names()  # load the built-ins first, so they do not replace the registry's entries later
    monkeypatch.setitem(METHODS._entries, cls.name, cls)


def test_outside_plugin_refits_after_a_change_to_a_base_module(tmp_path, warm_dir, monkeypatch):
    import methods._heads

    plugin_file = tmp_path / "plugin" / "cache_test_plugin.py"  # another package's folder, not methods/
    plugin_file.parent.mkdir()
    plugin_file.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("cache_test_plugin", plugin_file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cache_test_plugin", module)
    spec.loader.exec_module(module)
    plugin = module.CacheTestPlugin
    _register(monkeypatch, plugin)
    # methods/_heads.py as another checkout would have it: a copy we may edit
    heads_copy = tmp_path / "methods" / "_heads.py"
    heads_copy.parent.mkdir()
    shutil.copy(methods._heads.__file__, heads_copy)
    monkeypatch.setattr(methods._heads, "__file__", str(heads_copy))

    _context(warm_dir).fit(plugin.name, 0, epochs=1)
    _context(warm_dir).fit(plugin.name, 0, epochs=1)  # a new session: from the disk cache
    assert plugin.fits == 1  # unchanged code: cached
    with heads_copy.open("a") as fh:
        fh.write("# a one-line change\n")
    _context(warm_dir).fit(plugin.name, 0, epochs=1)
    assert plugin.fits == 2


def _classifier(ctx: Session) -> str:
    classifier = ctx.backbone.zero_shot_classifier(ctx.dataset.classnames, ctx.dataset.templates,
                                                   ctx.config.text_precision, ctx.cache_dir)  # as ctx.classifier
    return hashlib.sha256(classifier.numpy().tobytes()).hexdigest()


def _heads_fit(ctx: Session) -> str:
    policy = create_method("cls-ee", epochs=1)
    policy.fit(ctx.fit_context())  # through FitContext.cached, not the policy cache
    return fit_digest(policy)


def _policy(ctx: Session) -> str:
    fresh = Session(ctx.config, progress=False)  # a session keeps its fits: a new one reads the cache entry
    return fit_digest(fresh.fit("cls-ee", 0, epochs=1))


@pytest.mark.parametrize("kind, result", [("classifiers", _classifier), ("fits", _heads_fit),
                                          ("policies", _policy)])
def test_a_flipped_byte_is_detected_and_rebuilt(kind, result, warm_dir, capsys):
    ctx = _context(warm_dir)  # each result reads its cache entry again
    fresh = result(ctx)
    [entry] = (warm_dir / kind).rglob("*.pt")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, inside the stored numbers
    entry.write_bytes(bytes(data))
    capsys.readouterr()

    assert result(ctx) == fresh
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: cache entry")]
    assert len(notes) == 1 and f"/{kind}/" in notes[0] and "corrupt" in notes[0] and "rebuilding" in notes[0]
    result(ctx)
    assert "note:" not in capsys.readouterr().err  # the rebuilt entry is sound


class NumpyState(ClsEE):
    """A method whose state holds a numpy array: torch.save takes it, torch.load(weights_only=True) does not."""

    name = "numpy-state"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calibration": np.zeros(3)}


def test_a_state_that_cannot_be_loaded_back_fails_at_save(warm_dir, monkeypatch):
    _register(monkeypatch, NumpyState)
    with pytest.raises(TypeError, match=r"method 'numpy-state'.*'calibration'.*numpy\.ndarray"):
        _context(warm_dir).fit("numpy-state", 0, epochs=1)
    assert not list((warm_dir / "policies").rglob("*.pt"))


def test_unwritable_cache_folder_is_a_one_line_config_error(tmp_path, capsys):
    (tmp_path / "file").write_text("a file where the cache's parent folder should be")
    folder = tmp_path / "file" / "cache"
    code = main(["profile", "--limit", "8", "--cache-dir", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert str(folder) in err and "--cache-dir" in err and "EXITBENCH_CACHE" in err


def _write(folders, calls):
    calls.append(sorted(folders))
    for i, folder in folders.items():
        (folder / "value.txt").write_text(str(i))
    return [{"position": i} for i in folders]


def test_entries_built_together_are_whole_entries_and_a_key_given_twice_is_built_once(tmp_path):
    from harness.cache import get_or_build, get_or_build_together, read_entry

    calls = []
    fields = [{"k": "a"}, {"k": "b"}, {"k": "a"}]
    entries = get_or_build_together(tmp_path, "demo", fields, lambda folders: _write(folders, calls))
    assert calls == [[0, 1]] and entries[0].path == entries[2].path != entries[1].path
    for entry, position in zip(entries, (0, 1, 0)):
        read_entry(entry.path)  # every file present with its recorded digest
        assert (entry.path / "value.txt").read_text() == str(position) and entry.meta["position"] == position
    assert get_or_build(tmp_path, "demo", {"k": "b"}, lambda folder: pytest.fail("rebuilt")).path == entries[1].path
    again = get_or_build_together(tmp_path, "demo", [{"k": "c"}, {"k": "b"}], lambda folders: _write(folders, calls))
    assert calls[-1] == [0] and again[1].path == entries[1].path  # only the missing one


def test_an_entry_finished_elsewhere_meanwhile_is_taken_and_the_rest_built(tmp_path, monkeypatch):
    import harness.cache as cache

    other = cache.get_or_build(tmp_path, "demo", {"k": "b"}, lambda folder: {"by": "another process"})
    real, stale = cache.find_entry, {"n": 0}

    def find_before_the_other_finished(cache_dir, kind, fields):
        if fields == {"k": "b"} and stale["n"] == 0:
            stale["n"] += 1
            return None  # not there yet when looked for; there when built
        return real(cache_dir, kind, fields)

    monkeypatch.setattr(cache, "find_entry", find_before_the_other_finished)
    calls = []
    entries = cache.get_or_build_together(tmp_path, "demo", [{"k": "a"}, {"k": "b"}, {"k": "c"}],
                                          lambda folders: _write(folders, calls))
    assert calls == [[0, 2]] and entries[1].path == other.path and entries[1].meta["by"] == "another process"
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")]  # no temporary folder left
