from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.datasets import fashion_mnist
from harness.train_embedded import TrainConfig, _augment, train

pytestmark = pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / fashion_mnist.FILES["train"][0]).is_file(),
    reason="needs Debian's dataset-fashion-mnist (installed by .ci/run)",
)


def test_training_script_runs_and_writes_loadable_weights(tmp_path):
    import shutil

    from harness import embedded
    from harness.backbones import create_backbone

    shutil.copy(embedded.CONFIG_PATH, tmp_path)
    card = train(TrainConfig(max_steps=2, batch_size=16), fashion_mnist.DEFAULT_DIR, out_dir=tmp_path)
    assert card["training_images"] == 60000 - embedded.HOLDOUT_SIZE
    assert json.loads((tmp_path / "card.json").read_text())["weights_sha256"] == card["weights_sha256"]
    backbone = create_backbone("embedded", pretrained=str(tmp_path / "open_clip_model.safetensors"))
    assert backbone.num_blocks == 12
    with np.load(tmp_path / embedded.DATA_PATH.name) as fresh, np.load(embedded.DATA_PATH) as shipped:
        for key in shipped.files:  # the shipped compact data is what the script makes
            assert np.array_equal(fresh[key], shipped[key])


def test_augmentation_shifts_and_flips_by_hand():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 10, 5] = 255
    cfg = TrainConfig(shift=2, hflip=False)
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        out = _augment(image, cfg, gen)
        y, x = (out[0] == 255).nonzero()[0].tolist()
        seen.add((y - 10, x - 5))
    assert seen <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(seen) > 10
    flipped = _augment(image, TrainConfig(shift=0, hflip=True), torch.Generator().manual_seed(1))
    assert flipped.sum() == 255
