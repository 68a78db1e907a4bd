"""Trace driver and on-disk cache: one backbone pass, per-layer features for every sample.

For each sample and each layer L = 0 (after the token embedding) .. num_blocks
the trace keeps the CLS token, the patch-token mean and the spatial-activation
variance SAV = mean_i ||z_i - mean(z)||^2 over patch tokens, plus the final
image embedding and zero-shot logits. Policies are fitted and swept on
traces with no further backbone forward.

Cache layout: a :mod:`harness.cache` entry ``<cache_dir>/traces/<key>/``
with one ``.npy`` file per array and ``meta.json`` (key fields, a blake2b
digest per file, rows, skipped images). Arrays are filled batch by batch
through memory maps, so memory stays bounded, in the entry's temporary
folder; the cache renames it into place when complete and checks every file
on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from harness.backbones import Backbone
from harness._io import release_free_heap
from harness.cache import (Entry, find_entry, first_positions, get_or_build, get_or_build_together, remove_entry,
                           source_digest)
from harness.config import default_cache_dir
from harness.datasets import Dataset, ImageBatches, Split
from harness.heads import Classifier
from harness.quantizers import Quantizer
from harness.towers import TokenLayout

TRACE_FORMAT = 1
# CLS and patch-mean are stored in fp16 (both drivers read features through
# `as_stored`, so replay and real early exit see the same numbers).
FEATURE_DTYPE = np.float16
# glibc keeps the pages of freed activations and its heap fragments, so without a trim now and then
# resident memory climbs with the number of batches traced (50,000 images: 0.8 -> 1.26 GB anonymous).
# Every 8 batches kept it near 0.9 GB at no measurable cost; after every batch it cost 26% (README).
_TRIM_EVERY = 8
_PER_SAMPLE = ("cls", "patch_mean", "sav", "embedding", "logits")  # filled batch by batch
_ARRAYS = _PER_SAMPLE + ("labels", "indices")
_CHUNK_ROWS = 4096  # rows copied at a time between memory maps


def as_stored(features: torch.Tensor) -> torch.Tensor:
    """Round features as the trace stores them (fp16), returned as fp32."""
    return features.to(torch.float16).to(torch.float32)


def layer_features(tokens: torch.Tensor, layout: TokenLayout = TokenLayout()
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLS [B, D], patch mean [B, D], SAV [B]) of tokens [B, prefix + N, D]; without a class token,
    CLS is the patch mean (see :class:`~harness.towers.TokenLayout`)."""
    patches = layout.patches(tokens)
    mean = patches.mean(dim=1)
    # centred, for accuracy with large activations; torch.var_mean over dim 1 is ~7x slower on CPU
    sav = (patches - mean[:, None]).square().sum(dim=-1).mean(dim=1)
    return tokens[:, 0] if layout.class_token else mean, mean, sav


@dataclasses.dataclass
class Trace:
    """Per-layer features of one split, memory-mapped from the cache.

    Arrays (N = samples traced, bad images excluded; L = num_blocks + 1 layers):
    ``cls`` and ``patch_mean`` [N, L, D] fp16, ``sav`` [N, L] fp32,
    ``embedding`` [N, E] fp32, ``logits`` [N, C] fp32, ``labels`` and
    ``indices`` (into the dataset part) [N] int64.
    """

    path: Path
    meta: dict[str, Any]
    cls: np.ndarray
    patch_mean: np.ndarray
    sav: np.ndarray
    embedding: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def bad_images(self) -> list[dict]:
        return self.meta["bad_images"]

    def select(self, indices: np.ndarray, cache_dir: Path) -> "Trace":
        """The rows of the given dataset indices, in that order (skipped bad images are left out).

        The rows are copied once, chunk by chunk, into a cache entry of their
        own (``trace-rows``) and memory-mapped like the trace, so a split drawn
        from a large traced part costs disk, not memory.
        """
        if len(indices) == len(self.indices) and np.array_equal(indices, self.indices):
            return self
        order = np.argsort(self.indices, kind="stable")
        pos = np.clip(np.searchsorted(self.indices, indices, sorter=order), 0, max(len(order) - 1, 0))
        rows = order[pos] if len(order) else np.zeros(len(indices), np.int64)
        rows = rows[self.indices[rows] == indices] if len(order) else rows[:0]
        wanted = set(np.asarray(indices).tolist())

        def build(folder: Path) -> dict[str, Any]:
            for name in _ARRAYS:
                source = getattr(self, name)
                _write_rows(folder / f"{name}.npy", source, len(rows),
                            (source[rows[start:start + _CHUNK_ROWS]] for start in range(0, len(rows), _CHUNK_ROWS)))
            return {"rows": len(rows), "bad_images": [b for b in self.bad_images if b["index"] in wanted]}

        key = {"trace": self.meta["key"], "indices_sha256": hashlib.sha256(
            np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()}
        return _open(get_or_build(cache_dir, "trace-rows", key, build))


def _code_sha256() -> str:
    """Digest of the source that computes traced numbers, so a code change invalidates old entries."""
    from harness import backbones, quantizers

    return source_digest([Path(__file__), Path(backbones.__file__), *Path(quantizers.__file__).parent.glob("*.py")])


def trace_key(
    backbone: Backbone, quantizer: Quantizer, dataset: Dataset, split: Split,
    classifier: Classifier, batch_size: int,
) -> dict[str, Any]:
    """Everything that changes the traced numbers (the cache key's fields)."""
    from importlib.metadata import version

    device = backbone.device
    return {
        "format": TRACE_FORMAT,
        "code_sha256": _code_sha256(),
        "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "open_clip_torch", "pillow", "numpy")},
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # TF32 changes fp32 results on a GPU: cuBLAS matmuls (off by default), cuDNN convolutions (on by default)
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if device.type == "cuda" else None,
        "model": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "quantizer": quantizer.config(),
        "dataset": dataset.name,
        "part": split.part,
        "dataset_fingerprint": dataset.fingerprint(split.part),
        "indices_sha256": hashlib.sha256(np.ascontiguousarray(split.indices, dtype=np.int64).tobytes()).hexdigest(),
        "preprocess": repr(backbone.preprocess),
        "classifier_sha256": classifier_sha256(classifier),
        # A batch-dependent quantizer gives other numbers at another batch size.
        "batch_size": None if quantizer.batch_invariant else batch_size,
    }


def classifier_sha256(classifier: Classifier) -> str:
    """Digest of what the classifier computes (its weights, and its bias or temperature)."""
    digest = hashlib.sha256(classifier.weight.detach().cpu().float().numpy().tobytes())
    if classifier.bias is not None:
        digest.update(classifier.bias.detach().cpu().float().numpy().tobytes())
    if classifier.logit_scale is None:
        digest.update(b"linear")
    return digest.hexdigest()


def shard_bounds(rows: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per rank, cut at multiples of ``batch_size`` (so each rank reads the very
    batches one process would; ranks past the last batch get an empty range)."""
    batches = -(-rows // batch_size)
    per_rank = [batches // world + (rank < batches % world) for rank in range(world)]
    cuts = np.minimum(np.cumsum([0, *per_rank]) * batch_size, rows)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _open(entry: Entry) -> Trace:
    """The trace in a verified cache entry, its arrays memory-mapped."""
    arrays = {name: np.load(entry.path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return Trace(path=entry.path, meta=entry.meta, **arrays)


@torch.inference_mode()
def trace_batch(backbone: Backbone, images: torch.Tensor, classifier: Classifier) -> dict[str, torch.Tensor]:
    """One traced forward: per-layer features (in their stored dtypes), embedding and logits."""
    x = backbone.embed(images)
    layout = backbone.tower.layout
    per_layer = [layer_features(x, layout)]
    for block in backbone.blocks:
        x = block(x)
        per_layer.append(layer_features(x, layout))
    cls, mean, sav = (torch.stack(f, dim=1) for f in zip(*per_layer))
    embedding = backbone.head(x).float()
    logits = classifier(embedding)
    return {"cls": cls.to(torch.float16), "patch_mean": mean.to(torch.float16), "sav": sav.float(),
            "embedding": embedding, "logits": logits}


def store_batch(out: dict[str, np.ndarray], row: int, features: dict[str, torch.Tensor]) -> int:
    """Copy one batch of :func:`trace_batch` output into ``out`` at ``row``; return the next row."""
    stop = row
    for name, value in features.items():
        stop = row + len(value)
        out[name][row:stop] = value.cpu().numpy()
    return stop


def _allocate(tmp: Path, n: int, backbone: Backbone, num_classes: int) -> dict[str, np.memmap]:
    """The per-sample arrays of a trace, as writable memory maps in ``tmp``."""
    layers, width = backbone.num_blocks + 1, backbone.width
    specs = {
        "cls": (FEATURE_DTYPE, (n, layers, width)),
        "patch_mean": (FEATURE_DTYPE, (n, layers, width)),
        "sav": (np.float32, (n, layers)),
        "embedding": (np.float32, (n, backbone.embed_dim)),
        "logits": (np.float32, (n, num_classes)),
    }
    return {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, shape)
            for name, (dtype, shape) in specs.items()}


@torch.inference_mode()
def _run_backbones(
    backbones: Sequence[Backbone], batches: ImageBatches, classifier: Classifier, tmps: Sequence[Path], n: int,
    desc: str | None,
) -> int:
    """Write every array of a trace of each backbone into its folder of ``tmps``, decoding each batch once
    for all of them; return the rows filled (fewer than ``n`` when bad images were skipped).
    ``desc=None`` hides the progress bar."""
    from tqdm import tqdm

    outs = [_allocate(tmp, n, backbone, classifier.num_classes) for backbone, tmp in zip(backbones, tmps)]
    labels, indices = [], []
    row = 0
    for images, batch_labels, batch_indices in tqdm(batches, desc=desc, unit="batch", disable=desc is None):
        on_device = {}  # the batch on each backbone's device, copied there once
        for backbone, out in zip(backbones, outs):
            if backbone.device not in on_device:
                on_device[backbone.device] = images.to(backbone.device)
            store_batch(out, row, trace_batch(backbone, on_device[backbone.device], classifier))
        row += len(images)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
        indices.append(np.asarray(batch_indices, dtype=np.int64))
        if len(labels) % _TRIM_EVERY == 0:
            release_free_heap()
    release_free_heap()  # what follows starts from a trimmed heap, whatever the number of batches
    for array in (array for out in outs for array in out.values()):
        array.flush()
    del outs  # unmap before any file is rewritten below
    for tmp in tmps:
        np.save(tmp / "labels.npy", np.concatenate(labels) if labels else np.zeros(0, np.int64))
        np.save(tmp / "indices.npy", np.concatenate(indices) if indices else np.zeros(0, np.int64))
        if row < n:  # drop the rows reserved for skipped images
            for name in _PER_SAMPLE:
                _keep_rows(tmp / f"{name}.npy", row)
    return row


def _write_rows(file: Path, like: np.ndarray, rows: int, chunks: Iterable[np.ndarray]) -> None:
    """Write a new .npy ``file`` of ``rows`` rows, typed and shaped like ``like``'s, from ``chunks`` in order
    (a few thousand rows each, so memory stays bounded whatever the size)."""
    out = np.lib.format.open_memmap(file, "w+", like.dtype, (rows, *like.shape[1:]))
    row = 0
    for chunk in chunks:
        out[row:row + len(chunk)] = chunk
        row += len(chunk)
    out.flush()
    del out


def _keep_rows(file: Path, rows: int) -> None:
    """Rewrite an .npy file with only its first ``rows`` rows, chunk by chunk."""
    full = np.load(file, mmap_mode="r")
    kept_file = file.with_suffix(".kept.npy")
    _write_rows(kept_file, full, rows,
                (full[start:min(rows, start + _CHUNK_ROWS)] for start in range(0, rows, _CHUNK_ROWS)))
    del full
    os.replace(kept_file, file)


def trace_split(
    backbone: Backbone,
    quantizer: Quantizer,
    batches: ImageBatches,
    classifier: Classifier,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Trace:
    """Trace the split of ``batches`` through ``backbone`` (already quantized by ``quantizer``), cached
    (:func:`trace_splits` of one backbone).

    Args:
        batches: the split's images as the trace reads them (dataset, split, batch size, bad-image
            policy, decoding workers); bad images skipped are listed in ``Trace.bad_images``.
        classifier: what scores the embeddings into the stored logits.
        cache_dir: cache root (default :func:`default_cache_dir`).
    """
    return trace_splits([(backbone, quantizer)], batches, classifier, cache_dir, progress)[0]


def trace_splits(
    quantized: Sequence[tuple[Backbone, Quantizer]],
    batches: ImageBatches,
    classifier: Classifier,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[Trace]:
    """The traces of the split of ``batches`` through each backbone of ``quantized`` (quantized by its
    quantizer), cached like :func:`trace_split`'s; the missing ones are traced in one pass over the images,
    which are decoded and preprocessed once for all of them."""
    keys = _trace_keys(quantized, batches, classifier)
    dataset, split = batches.dataset, batches.split

    def build(folders: dict[int, Path]) -> list[dict[str, Any]]:
        todo = [quantized[i] for i in folders]
        desc = f"trace {_names(todo)} {dataset.name}:{split.part}" if progress else None
        rows = _run_backbones([backbone for backbone, _ in todo], batches, classifier, list(folders.values()),
                              len(split), desc)
        return [{"rows": rows, "bad_images": batches.bad_images}] * len(folders)

    cache_dir = cache_dir or default_cache_dir()
    return [_open(entry) for entry in get_or_build_together(cache_dir, "traces", keys, build)]


def _trace_keys(quantized: Sequence[tuple[Backbone, Quantizer]], batches: ImageBatches,
                classifier: Classifier) -> list[dict[str, Any]]:
    """:func:`trace_key` of each pair, once every backbone is checked to read the images ``batches`` give."""
    for backbone, quantizer in quantized:
        if backbone.quantizer != quantizer.name:
            raise ValueError(f"backbone runs {backbone.quantizer!r} but quantizer is {quantizer.name!r}")
        if repr(backbone.preprocess) != repr(batches.transform):
            raise ValueError(f"{backbone.name}/{quantizer.name} preprocesses images otherwise than the batches")
    return [trace_key(backbone, quantizer, batches.dataset, batches.split, classifier, batches.batch_size)
            for backbone, quantizer in quantized]


def _names(quantized: Sequence[tuple[Backbone, Quantizer]]) -> str:
    """``model/quant+quant``: what a progress bar says is being traced."""
    return f"{quantized[0][0].name}/{'+'.join(quantizer.name for _, quantizer in quantized)}"


def trace_shard(
    quantized: Sequence[tuple[Backbone, Quantizer]],
    batches: ImageBatches,
    classifier: Classifier,
    cache_dir: Path,
    rank: int,
    world: int,
    progress: bool = True,
) -> list[Trace] | None:
    """One rank's part of :func:`trace_splits`: the traces of the split of ``batches``, sharded across
    ``world`` processes that all call this (a collective: it waits for every rank at a ``torch.distributed``
    barrier).

    Each rank traces its contiguous shard (:func:`shard_bounds`) under every quantizer in one pass, into
    cache entries of its own, written atomically like every entry: a rank that dies leaves no half-written
    shard, and a re-run reuses the shards that completed. Rank 0 then merges each trace's shards, in order,
    into the entry :func:`trace_splits` builds (same key, same arrays for a batch-invariant quantizer),
    removes them and returns the traces; the other ranks return None. Nothing is traced for a trace whose
    merged entry exists.
    """
    import torch.distributed as dist

    dataset, split = batches.dataset, batches.split
    keys = _trace_keys(quantized, batches, classifier)
    first = first_positions(keys)  # a key given twice is looked up and traced once
    entries = {i: find_entry(cache_dir, "traces", keys[i]) for i in sorted(set(first))}
    todo = [i for i, entry in entries.items() if entry is None]
    if todo:
        bounds = shard_bounds(len(split), batches.batch_size, world)
        shards = {r: (a, b) for r, (a, b) in enumerate(bounds) if b > a}
        shard_keys = {i: {r: {**keys[i], "shard": [r, world], "rows": [a, b]} for r, (a, b) in shards.items()}
                      for i in todo}
        start, stop = bounds[rank]
        mine = batches.subset(start, stop)

        def build_shards(folders: dict[int, Path]) -> list[dict[str, Any]]:
            pending = [quantized[todo[j]] for j in folders]
            desc = (f"trace {_names(pending)} {dataset.name}:{split.part} rank {rank}/{world}"
                    if progress else None)
            rows = _run_backbones([backbone for backbone, _ in pending], mine, classifier, list(folders.values()),
                                  stop - start, desc)
            return [{"rows": rows, "bad_images": mine.bad_images}] * len(folders)

        if rank in shards:
            get_or_build_together(cache_dir, "trace-shards", [shard_keys[i][rank] for i in todo], build_shards)
        dist.barrier()
        if rank == 0:
            for i in todo:
                parts = [find_entry(cache_dir, "trace-shards", k) for k in shard_keys[i].values()]
                if None in parts:
                    raise RuntimeError("a trace shard is missing or damaged after every rank passed the barrier")
                entries[i] = get_or_build(cache_dir, "traces", keys[i], lambda folder: _merge(parts, folder))
                for k in shard_keys[i].values():
                    remove_entry(cache_dir, "trace-shards", k)
    if rank != 0:
        return None
    return [_open(entries[i]) for i in first]


def _merge(shards: list[Entry], folder: Path) -> dict[str, Any]:
    """Concatenate the shards' arrays into ``folder``, in shard order, chunk by chunk (memory stays bounded)."""
    for name in _ARRAYS:
        parts = [np.load(shard.path / f"{name}.npy", mmap_mode="r") for shard in shards]
        _write_rows(folder / f"{name}.npy", parts[0], sum(len(p) for p in parts),
                    (part[start:start + _CHUNK_ROWS] for part in parts for start in range(0, len(part), _CHUNK_ROWS)))
    return {"rows": sum(s.meta["rows"] for s in shards),
            "bad_images": [bad for s in shards for bad in s.meta["bad_images"]]}
