"""How far quantized features drift from fp32: one definition of each measure, shared by the noise
profile (:mod:`harness.profile`) and the methods that use one (LRA-EE picks its exit layers by INR).

- **INR**, the information-to-noise ratio of a feature p (e.g. the patch-token
  mean after block L) over samples x: ||E_x[p_fp32]||^2 / Var_x[p_q - p_fp32],
  the squared norm of the fp32 feature's mean over the total variance of the
  quantization error. The signal is fp32's: what there is to keep, not
  what survived.
- **Depth-normalized error** of the residual stream z after block L:
  ||z_q - z|| / ||z|| and cos(z_q, z) per sample (whole token tensor). The
  paper's noise ratio divides the accumulated error by one block's update,
  which shrinks relative to the stream as depth grows, so that ratio rises
  with depth by construction; these two do not.

Both are computed from running sums, so a profile streams over any number of
images.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class ErrorMoments:
    """Running sums of one feature over samples, fp32 and quantized side by side, for :meth:`inr`."""

    def __init__(self, width: int):
        self.samples = 0
        self.fp32_sum = np.zeros(width)
        self.error_sum = np.zeros(width)
        self.error_square_sum = 0.0

    def add(self, quantized: torch.Tensor | np.ndarray, fp32: torch.Tensor | np.ndarray) -> None:
        """Add a batch: ``quantized`` and ``fp32`` are [B, D] features of the same samples, row for row."""
        q, ref = (np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
                  for x in (quantized, fp32))
        error = q - ref
        self.samples += len(q)
        self.fp32_sum += ref.sum(axis=0)
        self.error_sum += error.sum(axis=0)
        self.error_square_sum += float(np.square(error).sum())

    def inr(self) -> float:
        """||mean fp32||^2 / total error variance; ``inf`` when the error has no variance (fp32 itself)."""
        if self.samples == 0:
            raise ValueError("INR of no samples")
        mean_error = self.error_sum / self.samples
        noise = self.error_square_sum / self.samples - float(np.square(mean_error).sum())
        signal = float(np.square(self.fp32_sum / self.samples).sum())
        return math.inf if noise <= 0.0 else signal / noise


def inr(quantized: np.ndarray, fp32: np.ndarray) -> float:
    """INR of one feature from [N, D] arrays of the same N samples (see the module docstring).

    Example:
        >>> inr(np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[1.0, 0.0], [2.0, 0.0]]))
        9.0
    """
    moments = ErrorMoments(np.shape(fp32)[1])
    moments.add(quantized, fp32)
    return moments.inr()


def relative_error(quantized: torch.Tensor, fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: ||z_q - z|| / ||z|| and cos(z_q, z) over the whole token tensor [B, T, D] -> two [B] tensors."""
    q, ref = quantized.flatten(1).double(), fp32.flatten(1).double()
    ratio = (q - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-12)
    return ratio, torch.nn.functional.cosine_similarity(q, ref, dim=1)
