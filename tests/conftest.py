"""Shared fixtures: real models (small) and real images, seeded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("EXITBENCH_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "exitbench-test-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded_backbone():
    from harness.backbones import create_backbone

    return create_backbone("embedded")


@pytest.fixture(scope="session")
def vit_b32_backbone():
    """open_clip ViT-B-32 with a seeded random init (no network needed)."""
    from harness.backbones import create_backbone

    return create_backbone("ViT-B-32", pretrained="none", seed=0)


@pytest.fixture(scope="session")
def embedded_dataset():
    from harness.datasets import create_dataset

    return create_dataset("embedded")


@pytest.fixture(scope="session")
def fmnist_images(embedded_dataset):
    """16 real Fashion-MNIST test images (PIL, RGB) and their labels."""
    images = [embedded_dataset.read_image("test", i) for i in range(16)]
    return images, embedded_dataset.labels("test")[:16]


@pytest.fixture(scope="session")
def images(embedded_backbone, fmnist_images):
    """The 16 Fashion-MNIST test images, preprocessed for the embedded backbone [16, 3, 28, 28]."""
    return torch.stack([embedded_backbone.preprocess(im) for im in fmnist_images[0]])


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, "name")`` wraps a module function or a class's method and returns a live ``{"n": calls}`` counter."""

    def wrap(module, name: str) -> dict:
        calls = {"n": 0}
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return wrap


@pytest.fixture(scope="session")
def install_plugin():
    """``install_plugin(tmp_path, name, module, source, site)``: a real package whose ``harness.methods`` entry
    point names ``module`` (holding ``source``), pip-installed into the folder ``site``."""

    def install(tmp_path, name: str, module: str, source: str, site) -> None:
        pkg = tmp_path / name
        (pkg / module).mkdir(parents=True)
        (pkg / module / "__init__.py").write_text(source)
        (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{name}"
            version = "0.1"
            [project.entry-points."harness.methods"]
            {module} = "{module}"
        """))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)

    return install
