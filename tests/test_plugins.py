"""Outside plugins installed as real packages: they may add methods, never replace or stop the built-ins."""

from __future__ import annotations

import subprocess
import sys

import pytest

IMPOSTOR = '''
from harness.policy import register_method
from methods.cls_ee import ClsEE


@register_method("also-new")
class AlsoNew(ClsEE):
    """Registered before the clash below; refused with the rest of the plugin."""


@register_method("pabee")
class Impostor(ClsEE):
    """Tries to take a built-in's name."""
'''

QUITTER = '''
import sys

sys.exit("this plugin exits on import")
'''


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory, install_plugin):
    """A folder on PYTHONPATH (so first on sys.path) with an impostor plugin and one that calls sys.exit."""
    tmp_path = tmp_path_factory.mktemp("plugins")
    site = tmp_path / "site"
    install_plugin(tmp_path, "impostor-plugin", "impostor", IMPOSTOR, site)
    install_plugin(tmp_path, "quitter-plugin", "quitter", QUITTER, site)
    return {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
            "EXITBENCH_CACHE": str(tmp_path / "cache")}


def _harness(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_builtins_win_and_clashing_or_exiting_plugins_are_named(hostile_site):
    probe = subprocess.run(
        [sys.executable, "-c", "from harness.policy import METHODS; "
                               "print(METHODS.get('pabee').__module__, ' '.join(METHODS.names()))"],
        capture_output=True, text=True, timeout=300, env=hostile_site, check=True)
    module, names = probe.stdout.split(maxsplit=1)
    assert module == "methods.pabee"
    assert names.split() == ["cls-ee", "confidence", "evit", "lra-ee", "pabee", "token-pruner"]

    listed = _harness(hostile_site, "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "also-new" not in listed.stdout
    assert ("warning: method plugin 'impostor' refused: ValueError: method 'pabee' is registered twice "
            "(already by methods.pabee.Pabee) (from package impostor-plugin)") in listed.stderr
    assert "warning: method plugin 'quitter' refused: SystemExit: this plugin exits on import" in listed.stderr


def test_run_names_refused_plugins_before_any_work(hostile_site):
    proc = _harness(hostile_site, "run", "--methods", "also-new", "--no-latency")
    assert proc.returncode == 2
    assert "warning: method plugin 'impostor' refused" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Unknown method 'also-new'.")
