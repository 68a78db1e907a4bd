"""QIRC noise profile: how far a quantized vision tower drifts from fp32, block by block.

For every block L the fp32 and the quantized towers run side by side on the
same images and we accumulate, over samples:
- ``nat_update``: ||z_L - z_{L-1}|| in fp32 (the block's natural update),
- ``quant_error``: ||z_L^q - z_L^fp32|| (error accumulated up to block L),
- ``ratio`` = mean quant_error / mean nat_update,
- MSE and cosine between fp32 and quantized CLS token and patch-token mean,
- ``relative_error`` = mean ||z_L^q - z_L|| / ||z_L|| and ``token_cosine`` =
  mean cos(z_L^q, z_L): the depth-normalized error (:mod:`harness.fidelity`).
  ``ratio`` divides by one block's update, which shrinks relative to the
  stream with depth, so it grows with depth by construction; these do not,
- ``inr``: the information-to-noise ratio of the patch-token mean (the
  feature LRA-EE exits from; :func:`harness.fidelity.inr`, the one
  definition LRA-EE uses too),
where z_L is the full token tensor [1 + N, D] after block L and norms are
Frobenius norms per sample. The default split is ``heads``, where LRA-EE
computes its INR. Zero-shot top-1 of both towers on the same images
closes the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness._io import atomic_write_text
from harness.session import Session
from harness.errors import DataError
from harness.fidelity import ErrorMoments, relative_error
from harness.provenance import environment
from harness.results import without_machine_paths
from harness.trace import layer_features


@dataclass
class LayerStats:
    layer: int
    nat_update: float
    quant_error: float
    ratio: float
    cls_mse: float
    cls_cosine: float
    patch_mean_mse: float
    patch_mean_cosine: float
    relative_error: float
    token_cosine: float
    inr: float


@dataclass
class Profile:
    quant: str
    split: str
    samples: int
    batch_size: int
    layers: list[LayerStats]
    top1_fp32: float
    top1_quant: float
    wall_time_s: float
    bad_images: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [asdict(layer) for layer in self.layers]


@torch.inference_mode()
def noise_profile(session: Session, quant: str | None = None, split: str = "heads") -> Profile:
    """Run fp32 and ``quant`` side by side on ``split`` and collect per-block statistics."""
    from tqdm import tqdm

    started = time.perf_counter()
    quant = quant or session.config.quant
    fp32 = session.backbone
    quantized, _ = session.quantized(quant)
    classifier = session.classifier
    n_blocks, layout = fp32.num_blocks, fp32.tower.layout
    sums = {k: np.zeros(n_blocks) for k in ("nat", "err", "cls_se", "cls_cos", "pm_se", "pm_cos", "rel", "tok_cos")}
    moments = [ErrorMoments(fp32.width) for _ in range(n_blocks)]
    correct = np.zeros(2)
    samples = 0
    batches = session.image_batches(split)
    for images, labels, _ in tqdm(batches, desc=f"profile {quant}", unit="batch", disable=not session.progress):
        images = images.to(fp32.device)
        z, zq = fp32.embed(images), quantized.embed(images)
        for i in range(n_blocks):
            z_next, zq = fp32.blocks[i](z), quantized.blocks[i](zq)
            sums["nat"][i] += (z_next - z).flatten(1).norm(dim=1).sum().item()
            sums["err"][i] += (zq - z_next).flatten(1).norm(dim=1).sum().item()
            relative, cosine = relative_error(zq, z_next)
            sums["rel"][i] += relative.sum().item()
            sums["tok_cos"][i] += cosine.sum().item()
            z = z_next
            (cls, mean, _), (cls_q, mean_q, _) = layer_features(z, layout), layer_features(zq, layout)
            for ref, q, se, cos in ((cls, cls_q, "cls_se", "cls_cos"), (mean, mean_q, "pm_se", "pm_cos")):
                sums[se][i] += (q - ref).square().mean(dim=1).sum().item()
                sums[cos][i] += F.cosine_similarity(q, ref, dim=1).sum().item()
            moments[i].add(mean_q, mean)
        for j, (backbone, tokens) in enumerate(((fp32, z), (quantized, zq))):
            scores = classifier(backbone.head(tokens))
            correct[j] += scores.argmax(dim=1).eq(labels.to(scores.device)).sum().item()
        samples += len(images)
    if samples == 0:
        raise DataError(f"split {split!r} has no images to profile")
    mean = {k: v / samples for k, v in sums.items()}
    layers = [
        LayerStats(
            layer=i + 1, nat_update=mean["nat"][i], quant_error=mean["err"][i],
            ratio=mean["err"][i] / max(mean["nat"][i], 1e-12),
            cls_mse=mean["cls_se"][i], cls_cosine=mean["cls_cos"][i],
            patch_mean_mse=mean["pm_se"][i], patch_mean_cosine=mean["pm_cos"][i],
            relative_error=mean["rel"][i], token_cosine=mean["tok_cos"][i], inr=moments[i].inr(),
        )
        for i in range(n_blocks)
    ]
    return Profile(
        quant=quant, split=split, samples=samples, batch_size=session.config.batch_size, layers=layers,
        top1_fp32=100 * correct[0] / samples, top1_quant=100 * correct[1] / samples,
        wall_time_s=round(time.perf_counter() - started, 2),
        bad_images=batches.bad_images, config=session.describe(quant), environment=environment(),
    )


def format_table(profile: Profile) -> str:
    from tabulate import tabulate

    headers = ["block", "||z_L - z_L-1|| fp32", "||z_L^q - z_L||", "ratio",
               "CLS MSE", "CLS cos", "patch-mean MSE", "patch-mean cos", "||z_L^q - z_L|| / ||z_L||",
               "cos(z_L^q, z_L)", "INR"]
    rows = [[s.layer, s.nat_update, s.quant_error, s.ratio, s.cls_mse, s.cls_cosine,
             s.patch_mean_mse, s.patch_mean_cosine, s.relative_error, s.token_cosine, s.inr] for s in profile.layers]
    table = tabulate(rows, headers=headers,
                     floatfmt=(".0f", ".4g", ".4g", ".4f", ".4g", ".6f", ".4g", ".6f", ".4f", ".6f", ".4g"))
    skipped = "".join(f"\nskipped bad image {b['sample']}: {b['reason']}" for b in profile.bad_images)
    return (f"{table}{skipped}\n\nzero-shot top-1 on {profile.samples} '{profile.split}' images: "
            f"fp32 {profile.top1_fp32:.2f}%, {profile.quant} {profile.top1_quant:.2f}% "
            f"(delta {profile.top1_quant - profile.top1_fp32:+.2f} points)")


def plot(profile: Profile, out_dir: Path) -> list[Path]:
    """Write the noise-profile figure as PNG and SVG; return the paths."""
    import matplotlib.pyplot as plt

    fig = figure(profile)
    paths = [out_dir / "noise_profile.png", out_dir / "noise_profile.svg"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def figure(profile: Profile):
    """The noise-profile figure: norms and their ratio per block, and fp32-vs-quantized cosines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in profile.layers]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(layers, [s.nat_update for s in profile.layers], "o-", label="natural update (fp32)")
    ax1.plot(layers, [s.quant_error for s in profile.layers], "s-", label=f"quantization error ({profile.quant})")
    ax1.set_xlabel("block")
    ax1.set_ylabel("mean Frobenius norm")
    ratio_ax = ax1.twinx()
    ratio_ax.plot(layers, [s.ratio for s in profile.layers], "^--", color="tab:red", label="error / update (paper)")
    ratio_ax.plot(layers, [s.relative_error for s in profile.layers], "v:", color="tab:purple",
                  label="||z_q - z|| / ||z|| (depth-normalized)")
    ratio_ax.set_ylabel("ratio", color="tab:red")
    ratio_ax.legend(loc="upper right", fontsize=8)
    ax1.legend(loc="upper left", fontsize=8)
    ax2.plot(layers, [s.cls_cosine for s in profile.layers], "o-", label="CLS")
    ax2.plot(layers, [s.patch_mean_cosine for s in profile.layers], "s-", label="patch mean")
    ax2.set_xlabel("block")
    ax2.set_ylabel(f"cosine(fp32, {profile.quant})")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{profile.config.get('backbone', {}).get('model', '')}: noise profile, "
                 f"{profile.samples} '{profile.split}' images")
    fig.tight_layout()
    return fig


def save(profile: Profile, out_dir: Path) -> list[Path]:
    """Write profile.json, profile.md and the figure into ``out_dir``; return the paths.

    The files record no machine paths: no cache folder, checkpoint and bad-image
    paths cut to their last part (committed results are compared across machines).
    """
    profile = replace(profile, bad_images=without_machine_paths(profile.bad_images),
                      config=without_machine_paths(profile.config),
                      environment=without_machine_paths(profile.environment))
    atomic_write_text(out_dir / "profile.json", json.dumps(asdict(profile), indent=2) + "\n")
    atomic_write_text(out_dir / "profile.md", format_table(profile) + "\n")
    return [out_dir / "profile.json", out_dir / "profile.md", *plot(profile, out_dir)]
