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
    return run_early_exits([policy], backbone, images, classifier)[0]


@dataclass
class _Branch:
    """Policies that have decided alike so far, and the batch they share: its tokens and active rows."""

    members: list[int]
    x: torch.Tensor
    active: np.ndarray


@torch.inference_mode()
def run_early_exits(policies: list[ExitPolicy], backbone: Backbone, images: torch.Tensor,
                    classifier: Classifier) -> list[ExitOutcome]:
    """:func:`run_early_exit` of each policy on one batch, with the blocks run once for the policies that
    have made the same decisions so far.

    The policies share the batch until their decisions differ (samples that exit, tokens kept or
    merged); from then on each group of them carries its own batch. So a sweep of one method's knob runs
    the blocks before its first exit or drop once for every value. Each outcome is the one the policy
    gets alone, bit for bit: a group's batch is exactly the batch a lone run would hold. The groups'
    batches are alive at once: up to one per policy, each no larger than a lone run's.
    """
    if len({id(policy) for policy in policies}) != len(policies):
        raise ValueError("run_early_exits needs distinct policy objects (each keeps its own batch state)")
    if not policies:
        return []
    num_blocks = backbone.num_blocks
    layers = [set(_check_layers(policy, num_blocks)) for policy in policies]
    batch = len(images)
    for policy in policies:
        policy.start_batch(batch)
    exit_layer = [np.full(batch, num_blocks, dtype=np.int64) for _ in policies]
    by_policy = [np.zeros(batch, dtype=bool) for _ in policies]
    logits = [torch.zeros(batch, classifier.num_classes) for _ in policies]
    tokens = [np.zeros((batch, num_blocks), dtype=np.int64) for _ in policies]
    layout = backbone.tower.layout
    branches = [_Branch(list(range(len(policies))), backbone.embed(images.to(backbone.device)), np.arange(batch))]
    for layer in range(1, num_blocks + 1):
        next_block = backbone.blocks[layer] if layer < num_blocks else None
        after: list[_Branch] = []
        for branch in branches:
            for i in branch.members:
                tokens[i][branch.active, layer - 1] = branch.x.shape[1] - layout.prefix
            x = backbone.blocks[layer - 1](branch.x)
            view = TokenView(x, layer, branch.active, next_block, layout)
            exits: dict[bytes, tuple[list[int], np.ndarray]] = {}  # the members by the samples they let exit
            for i in branch.members:
                leaving = np.zeros(len(branch.active), dtype=bool)
                if layer in layers[i]:
                    decision = policies[i].decide(layer, view)
                    leaving = decision.exit.cpu().numpy().astype(bool)
                    rows = branch.active[leaving]
                    exit_layer[i][rows], by_policy[i][rows] = layer, True
                    logits[i][torch.from_numpy(rows)] = decision.logits[torch.from_numpy(leaving)].float().cpu()
                exits.setdefault(leaving.tobytes(), ([], leaving))[0].append(i)
            for members, leaving in exits.values():
                if leaving.any():
                    stay = torch.from_numpy(~leaving).to(x.device)
                    kept = _Branch(members, x[stay], branch.active[~leaving])
                    kept_view = TokenView(kept.x, layer, kept.active, next_block, layout)
                else:
                    kept, kept_view = _Branch(members, x, branch.active), view
                if len(kept.active):
                    after.extend(_keep_tokens(policies, kept, kept_view, layer, layout.prefix))
        branches = after
        if not branches:
            break
    for branch in branches:
        final = classifier(backbone.head(branch.x).float()).cpu()
        for i in branch.members:
            logits[i][torch.from_numpy(branch.active)] = final
    return [ExitOutcome(exit_layer[i], *classify(logits[i].numpy()), tokens[i], by_policy[i])
            for i in range(len(policies))]


def _keep_tokens(policies: list[ExitPolicy], branch: _Branch, view: TokenView, layer: int,
                 prefix: int) -> list[_Branch]:
    """``branch`` after each member's token decision at ``layer``: one branch per distinct resulting batch."""
    groups: list[_Branch] = []
    for i in branch.members:
        policy = policies[i]
        keep = policy.keep_tokens(layer, view)
        x = branch.x
        if keep is not None:
            if not policy.prunes_tokens:
                raise ValueError(f"method {policy.name!r} keeps tokens but does not set prunes_tokens = True "
                                 "(which keeps it out of trace replay)")
            keep = keep.to(x.device)
            merged = policy.merge_tokens(layer, view, keep)
            x = _drop_tokens(x, keep, prefix)
            if merged is not None:
                x = torch.cat([x, merged.to(x.device, x.dtype)], dim=1)
        same = next((g for g in groups if g.x is x or _same_bits(g.x, x)), None)
        if same is None:
            groups.append(_Branch([i], x, branch.active))
        else:
            same.members.append(i)
    return groups


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the very same bits (``torch.equal`` takes -0.0 for 0.0)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


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
