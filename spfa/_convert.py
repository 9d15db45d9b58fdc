"""Tensors to numpy: what the fitted attributes and summaries are made of."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_numpy"]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a float64 numpy array on the host (detached)."""
    return t.detach().cpu().double().numpy()
