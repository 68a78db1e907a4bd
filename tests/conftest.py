"""Shared fixtures: real models (small) and real images, seeded."""

from __future__ import annotations

import os

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


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, "name")`` wraps a module function and returns a live ``{"n": calls}`` counter."""

    def wrap(module, name: str) -> dict:
        calls = {"n": 0}
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return wrap
