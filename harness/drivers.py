"""The two drivers that run an :class:`ExitPolicy`.

- :func:`replay` walks cached per-layer features (a trace) through the
  policy: no backbone forward, so fits and threshold sweeps are cheap.
- :func:`run_early_exit` runs the blocks one at a time on real images;
  samples that exit leave the batch, so their remaining blocks are really
  skipped (and token policies really drop tokens).

Both return an :class:`ExitOutcome` per sample. For a batch-invariant
quantizer they agree exactly on exits and predictions (tested).

Devices: replay hands a policy features on the CPU (traces are numpy
arrays); the real driver hands it features on the backbone's device. A
policy fits on the CPU and runs its modules on the device of the features it
is handed (:func:`on_device`); its decisions may come back on either device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.backbones import Backbone, cls_attention
from harness.evaluate import TOP_K, classify
from harness.heads import Classifier
from harness.policy import ExitPolicy, LayerView, SplitFeatures
from harness.towers import TokenLayout
from harness.trace import as_stored, layer_features


@dataclass
class ExitOutcome:
    """Per-sample result of running a policy.

    Attributes:
        exit_layer: int [N], the block after which each sample stopped
            (``num_blocks`` for samples that ran the whole tower).
        predictions: int [N], the class of each sample's highest score.
        top5: int [N, min(5, C)], the classes of its five highest scores, in
            no particular order (for top-5). An outcome keeps these, not the
            [N, C] scores, so its memory does not grow with the class count.
        tokens: int [N, num_blocks], patch tokens each sample carried through each
            block (all blocks after its exit are 0); for the FLOPs count.
        by_policy: bool [N], True where the policy's decision classified the
            sample, False where the backbone's own head did (full depth).
    """

    exit_layer: np.ndarray
    predictions: np.ndarray
    top5: np.ndarray
    tokens: np.ndarray
    by_policy: np.ndarray


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module``, moved in place to ``device`` where its parameters and buffers are elsewhere.

    How a policy follows the features a driver hands it, e.g.
    ``on_device(self.heads[str(layer)], feature.device)(feature)``: a no-op on
    the CPU, one copy the first time a fitted policy meets features on a GPU.
    """
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.device != device:
        module.to(device)
    return module


class TraceView(LayerView):
    """A :class:`LayerView` over rows of cached features."""

    def __init__(self, features: SplitFeatures, layer: int, rows: np.ndarray, offset: int):
        super().__init__(layer, rows)
        self._features = features
        self._samples = offset + rows

    def _compute(self, name: str) -> torch.Tensor:
        if name in ("patch_tokens", "cls_attention"):
            raise NotImplementedError(f"{name} is not cached: this policy needs the real driver")
        array = getattr(self._features, name)[self._samples, self.layer]
        return torch.from_numpy(np.asarray(array, dtype=np.float32))


class TokenView(LayerView):
    """A :class:`LayerView` over live tokens [B, prefix + N, D] inside the real driver.

    ``next_block`` is the block that runs next (None after the last one); it
    gives ``cls_attention``. ``layout`` says where the patches start.
    """

    def __init__(self, tokens: torch.Tensor, layer: int, rows: np.ndarray, next_block: torch.nn.Module | None = None,
                 layout: TokenLayout = TokenLayout()):
        super().__init__(layer, rows)
        self._tokens = tokens
        self._next_block = next_block
        self._layout = layout

    def _compute(self, name: str) -> torch.Tensor:
        if name == "patch_tokens":
            return self._layout.patches(self._tokens)
        if name == "cls_attention":
            if self._next_block is None:
                raise ValueError(f"no block runs after block {self.layer}: it has no next-block attention")
            return cls_attention(self._next_block, self._tokens, self._layout)
        if name not in ("cls", "patch_mean", "sav"):
            raise KeyError(f"unknown feature {name!r}")
        # the three summaries come from one pass over the tokens
        cls, mean, sav = layer_features(self._tokens, self._layout)
        self._cache.update(cls=as_stored(cls), patch_mean=as_stored(mean), sav=sav.float())
        return self._cache[name]


def _check_layers(policy: ExitPolicy, num_blocks: int) -> list[int]:
    layers = policy.exit_layers()
    if any(not 1 <= layer <= num_blocks for layer in layers) or layers != sorted(set(layers)):
        raise ValueError(f"method {policy.name!r}: exit layers {layers} must be ascending in 1..{num_blocks}")
    return layers


def replay(policy: ExitPolicy, features: SplitFeatures, num_blocks: int, num_patches: int,
           chunk: int = 4096) -> ExitOutcome:
    """Run ``policy`` over cached ``features`` (no backbone forward).

    Raises:
        NotImplementedError: ``policy`` prunes tokens; its later features
            depend on the dropped tokens, so it runs under
            :func:`run_early_exit` only.
    """
    if policy.prunes_tokens:
        raise NotImplementedError(f"method {policy.name!r} prunes tokens: the features of its later blocks depend "
                                  "on the dropped tokens, so cached traces cannot be replayed for it; "
                                  "run it with the real driver (run_early_exit)")
    layers = _check_layers(policy, num_blocks)
    n = len(features.labels)
    exit_layer = np.full(n, num_blocks, dtype=np.int64)
    by_policy = np.zeros(n, dtype=bool)
    predictions = np.zeros(n, dtype=np.int64)
    top5 = np.zeros((n, min(TOP_K, features.logits.shape[1])), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            policy.start_batch(size)
            active = np.arange(size)
            logits = np.array(features.logits[start:start + size], dtype=np.float32)  # the full-depth scores
            for layer in layers:
                if len(active) == 0:
                    break
                decision = policy.decide(layer, TraceView(features, layer, active, start))
                leaving = decision.exit.cpu().numpy().astype(bool)
                rows = start + active[leaving]
                exit_layer[rows] = layer
                by_policy[rows] = True
                logits[active[leaving]] = decision.logits[torch.from_numpy(leaving)].float().cpu().numpy()
                active = active[~leaving]
            predictions[start:start + size], top5[start:start + size] = classify(logits)
    tokens = np.where(np.arange(1, num_blocks + 1)[None, :] <= exit_layer[:, None], num_patches, 0)
    return ExitOutcome(exit_layer, predictions, top5, tokens, by_policy)


@torch.inference_mode()
def run_early_exit(policy: ExitPolicy, backbone: Backbone, images: torch.Tensor,
                   classifier: Classifier) -> ExitOutcome:
    """Run one batch block by block; exited samples leave the batch, dropped tokens leave the samples."""
    num_blocks = backbone.num_blocks
    layers = set(_check_layers(policy, num_blocks))
    batch = len(images)
    policy.start_batch(batch)
    x = backbone.embed(images.to(backbone.device))
    active = np.arange(batch)
    exit_layer = np.full(batch, num_blocks, dtype=np.int64)
    by_policy = np.zeros(batch, dtype=bool)
    logits = torch.zeros(batch, classifier.num_classes)
    tokens = np.zeros((batch, num_blocks), dtype=np.int64)
    layout = backbone.tower.layout
    for layer in range(1, num_blocks + 1):
        tokens[active, layer - 1] = x.shape[1] - layout.prefix
        x = backbone.blocks[layer - 1](x)
        next_block = backbone.blocks[layer] if layer < num_blocks else None
        view = TokenView(x, layer, active, next_block, layout)
        if layer in layers:
            decision = policy.decide(layer, view)
            leaving = decision.exit.cpu()
            exit_layer[active[leaving.numpy()]] = layer
            by_policy[active[leaving.numpy()]] = True
            logits[torch.from_numpy(active[leaving.numpy()])] = decision.logits[leaving].float().cpu()
            x, active = x[~leaving.to(x.device)], active[~leaving.numpy()]
            view = TokenView(x, layer, active, next_block, layout)
        keep = policy.keep_tokens(layer, view) if len(active) else None
        if keep is not None:
            if not policy.prunes_tokens:
                raise ValueError(f"method {policy.name!r} keeps tokens but does not set prunes_tokens = True "
                                 "(which keeps it out of trace replay)")
            keep = keep.to(x.device)
            merged = policy.merge_tokens(layer, view, keep)
            x = _drop_tokens(x, keep, layout.prefix)
            if merged is not None:
                x = torch.cat([x, merged.to(x.device, x.dtype)], dim=1)
        if len(active) == 0:
            break
    if len(active):
        logits[torch.from_numpy(active)] = classifier(backbone.head(x).float()).cpu()
    return ExitOutcome(exit_layer, *classify(logits.numpy()), tokens, by_policy)


def _drop_tokens(x: torch.Tensor, keep: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Keep the ``prefix`` tokens (class, registers) plus the kept patch tokens, in their order; every
    sample must keep the same count."""
    if keep.dtype != torch.bool or keep.shape != (x.shape[0], x.shape[1] - prefix):
        raise ValueError(f"keep_tokens must return bool [{x.shape[0]}, {x.shape[1] - prefix}] (patch tokens, "
                         f"class and register tokens excluded), not {keep.dtype} {list(keep.shape)}")
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("a token policy must keep the same number of tokens in every sample of a batch")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
    patches = torch.gather(x[:, prefix:], 1, order[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], patches], dim=1)
