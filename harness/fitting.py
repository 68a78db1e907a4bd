"""How a policy is fitted: what it sees (:class:`~harness.policy.FitContext`) and how fits are cached.

Kept apart from the session so that the fit cache's key names exactly the
harness code that feeds a fit (:data:`harness.cache.FIT_MODULES`): an edit to
scoring, drivers or reports refits nothing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from harness.cache import cached_state, fit_fields
from harness.datasets import Split
from harness.policy import ExitPolicy, FitContext

if TYPE_CHECKING:
    from harness.session import Session


def fit_context(session: "Session", quant: str | None = None, seed: int | None = None) -> FitContext:
    """What a policy fits on under ``quant``: ``session``'s heads and gate traces (never test).

    ``seed`` seeds the fit's own randomness (default: the session's); the
    splits are the session's.
    """
    backbone, _ = session.quantized(quant)
    seed = session.config.seed if seed is None else seed
    return FitContext(
        heads=session.trace(quant, "heads"),
        gate=session.trace(quant, "gate"),
        load_heads_fp32=lambda: session.trace("fp32", "heads"),
        classifier=session.classifier,
        num_blocks=backbone.num_blocks,
        width=backbone.width,
        embed_dim=backbone.embed_dim,
        block_flops=session.block_flops,
        seed=seed,
        backbone=backbone,
        image_batches=functools.partial(_fit_images, session, quant),
        store=functools.partial(_stored_fit, session, quant, seed),
    )


def _fit_images(session: "Session", quant: str | None, split: str, batch_size: int,
                rows: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
    """:attr:`FitContext.image_batches`: (images, labels) of ``heads`` or ``gate``, in the split's order, or of
    the trace's ``rows`` in that order."""
    if split not in ("heads", "gate"):
        raise ValueError(f"policies fit on the heads and gate splits only, not {split!r}")
    backbone, _ = session.quantized(quant)
    chosen: Split | str = split
    if rows is not None:
        traced = session.trace(quant, split)
        chosen = Split(session.splits[split].part, np.asarray(traced.indices)[np.asarray(rows)])
    for images, labels, _ in session.image_batches(chosen, batch_size, backbone):
        yield images, labels


def _stored_fit(session: "Session", quant: str | None, seed: int, name: str, build: Callable[[], dict]) -> dict:
    """:meth:`FitContext.cached` on disk: keyed by ``name``, the code that defines ``build``, the fit
    splits' traces and rows, and the seed."""
    traces = (session.trace(quant, "heads"), session.trace(quant, "gate"))
    fields = {"name": name, **fit_fields(traces, seed, [build.__module__])}
    return cached_state(session.cache_dir, "fits", fields, build, f"fit {name!r}")


def policy_key(policy: ExitPolicy, fit_ctx: FitContext) -> dict[str, Any]:
    """Cache key fields of a fitted policy: its config, the code of its class hierarchy (outside plugins and
    the shared bases they build on) and of the harness, the FLOPs, the data it fits on, the seed."""
    # the fp32 twin of the heads split is fixed by the heads trace's key, so it needs no entry here
    return {"policy": policy.describe(), "block_flops": fit_ctx.block_flops,
            **fit_fields((fit_ctx.heads, fit_ctx.gate), fit_ctx.seed, [cls.__module__ for cls in type(policy).__mro__])}


def fit_cached(session: "Session", policy: ExitPolicy) -> ExitPolicy:
    """``policy`` fitted on ``session``'s heads/gate splits with its seed, from the disk cache when an
    identical fit exists.

    Raises:
        TypeError: the policy's state holds something other than tensors and plain values.
    """
    fit_ctx = fit_context(session)
    fitted: list[bool] = []  # set by a fresh fit, which needs no reload from its own state

    def fit() -> dict[str, Any]:
        policy.fit(fit_ctx)
        fitted.append(True)
        return policy.state_dict()

    state = cached_state(session.cache_dir, "policies", policy_key(policy, fit_ctx), fit,
                         f"{policy.kind} {policy.name!r}")
    if not fitted:
        policy.load_state_dict(state)
    return policy
