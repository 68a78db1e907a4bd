"""Train the embedded default CLIP on Fashion-MNIST (``python -m harness train-embedded``).

The recipe is image-to-class-prompt cross-entropy: every step encodes the
class prompts with the text tower (template ensemble) and classifies the
image embeddings against them with CLIP's learnable temperature, so both
towers train and the result is a genuine zero-shot model. Images held out
for the harness's ``heads``/``gate`` splits are never used here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness import embedded
from harness._io import atomic_path, atomic_write_text, file_digest
from harness.datasets import fashion_mnist
from harness.zeroshot import class_text_embeddings


@dataclass
class TrainConfig:
    epochs: int = 7  # ~6.5 min/epoch on 2 CPU cores at batch 128
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak learning rate (one-cycle: warm-up then cosine)
    warmup_fraction: float = 0.05
    weight_decay: float = 0.05
    shift: int = 2  # random translation in pixels (zero padding)
    hflip: bool = True
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None  # stop early; for smoke tests of the script


def write_embedded_data(root: Path, out: Path = embedded.DATA_PATH) -> dict[str, str]:
    """Write the compact copy of the data the embedded runs need; return IDX hashes."""
    train_x, train_y = fashion_mnist.load_split(root, "train")
    test_x, test_y = fashion_mnist.load_split(root, "t10k")
    held = fashion_mnist.holdout_indices(len(train_y))
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            holdout_images=train_x[held], holdout_labels=train_y[held].astype(np.uint8),
            holdout_train_index=held.astype(np.int32),
            test_images=test_x, test_labels=test_y.astype(np.uint8),
        )
    return {name: file_digest(root / name) for pair in fashion_mnist.FILES.values() for name in pair}


def _augment(images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random shift (zero padding, then crop) and horizontal flip on a uint8 batch [B, 28, 28]."""
    n, h, w = images.shape
    padded = F.pad(images, (cfg.shift,) * 4)
    dy = torch.randint(0, 2 * cfg.shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * cfg.shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    if cfg.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def to_model_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [B, 28, 28] -> normalised float [B, 3, 28, 28], as open_clip's transform does."""
    x = images.float().div_(255.0).sub_(mean).div_(std)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def train(cfg: TrainConfig, data_root: Path, out_dir: Path = embedded.EMBEDDED_DIR) -> dict:
    """Train and write weights + card into ``out_dir``; return the card."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.time()

    data_hashes = write_embedded_data(data_root, out_dir / embedded.DATA_PATH.name)
    train_x, train_y = fashion_mnist.load_split(data_root, "train")
    keep = np.setdiff1d(np.arange(len(train_y)), fashion_mnist.holdout_indices(len(train_y)))
    images = torch.from_numpy(train_x[keep].copy())
    labels = torch.from_numpy(train_y[keep].copy())

    model_name = f"local-dir:{embedded.EMBEDDED_DIR}"
    model = open_clip.create_model(model_name, load_weights=False)
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = model.visual.preprocess_cfg
    mean, std = float(pp["mean"][0]), float(pp["std"][0])

    steps_per_epoch = len(labels) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))),
    )
    model.train()
    bar = tqdm(total=total, desc="train-embedded", unit="step")
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=gen)
        for step in range(min(steps_per_epoch, total - bar.n)):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = to_model_input(_augment(images[idx], cfg, gen), mean, std)
            classes = class_text_embeddings(model, tokenizer, fashion_mnist.CLASSES, fashion_mnist.TEMPLATES)
            feats = F.normalize(model.encode_image(x), dim=-1)
            logits = model.logit_scale.exp() * feats @ classes.T
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / embedded.WEIGHTS_PATH.name
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    card = {
        "model": "embedded",
        "architecture": json.loads(embedded.CONFIG_PATH.read_text())["model_cfg"],
        "training": asdict(cfg),
        "training_images": int(len(labels)),
        "holdout": {"seed": embedded.HOLDOUT_SEED, "size": embedded.HOLDOUT_SIZE},
        "data": "Fashion-MNIST (MIT license), Debian package dataset-fashion-mnist",
        "data_sha256": data_hashes,
        "weights_sha256": file_digest(weights),
        "command": f"python -m harness train-embedded --epochs {cfg.epochs} --seed {cfg.seed}",
        "wall_time_s": round(time.time() - started, 1),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    atomic_write_text(out_dir / embedded.CARD_PATH.name, json.dumps(card, indent=2) + "\n")
    return card


CARD_QUANTIZERS = ("fp32", "int8-dynamic", "int8-torchao", "int8-pt2e", "fake-w8a8", "fake-w6a6", "fake-w4a8",
                   "fake-w4a4", "fake-w8a4-tensor", "fake-w8a3-tensor", "outliers-b7-c4-x300-fp32",
                   embedded.DEFAULT_QUANT)
# The default quantizer's candidates, mildest first, and the full-depth drop it must cause (points).
DEFAULT_CANDIDATES = tuple(f"outliers-b7-c4-x{scale}-fake-w8a8" for scale in (100, 200, 300, 500))
DEFAULT_MIN_DROP = 2.0


def screen_default_quantizer(candidates: tuple[str, ...] = DEFAULT_CANDIDATES) -> dict[str, Any]:
    """Pick the embedded default quantizer on the holdout images (heads and gate splits, never test).

    The candidates share a batch-invariant base (per-token int8) and add
    function-preserving LayerNorm-channel outliers of growing scale; the
    first whose full-depth zero-shot top-1 falls at least
    :data:`DEFAULT_MIN_DROP` points below fp32 is chosen. Stored in card.json.
    """
    from harness.config import HarnessConfig
    from harness.session import Session

    session = Session(HarnessConfig(model="embedded", data="embedded"))

    def holdout_top1(quant: str) -> float:
        traces = [session.trace(quant, split) for split in ("heads", "gate")]
        correct = sum(int((np.asarray(t.logits).argmax(1) == np.asarray(t.labels)).sum()) for t in traces)
        return 100 * correct / sum(len(t) for t in traces)

    percent = {q: round(holdout_top1(q), 2) for q in ("fp32", "fake-w8a8", *candidates)}
    chosen = next((q for q in candidates if percent["fp32"] - percent[q] >= DEFAULT_MIN_DROP), None)
    card = json.loads(embedded.CARD_PATH.read_text())
    card["default_quantizer_screening"] = {
        "split": f"embedded heads + gate splits (seed {session.config.seed}; the holdout images, never test)",
        "rule": f"the first candidate, mildest first, whose full-depth top-1 is at least {DEFAULT_MIN_DROP:g} "
                f"points below fp32; every candidate is batch-invariant",
        "percent": percent, "chosen": chosen,
    }
    atomic_write_text(embedded.CARD_PATH, json.dumps(card, indent=2) + "\n")
    return card["default_quantizer_screening"]


def record_accuracies(quantizers: tuple[str, ...] = CARD_QUANTIZERS) -> dict[str, float]:
    """Measure the shipped weights' zero-shot test top-1 per quantizer; store it in card.json."""
    from harness.config import HarnessConfig
    from harness.session import Session

    session = Session(HarnessConfig(model="embedded", data="embedded"))
    accuracies = {q: round(session.zero_shot_top1(q, "test"), 2) for q in dict.fromkeys(quantizers)}
    card = json.loads(embedded.CARD_PATH.read_text())
    card["zero_shot_test_top1"] = {
        "split": f"embedded test ({len(session.splits['test'])} images, Fashion-MNIST t10k)",
        "batch_size": session.config.batch_size,
        "text_precision": session.config.text_precision,
        "percent": accuracies,
    }
    atomic_write_text(embedded.CARD_PATH, json.dumps(card, indent=2) + "\n")
    return accuracies
