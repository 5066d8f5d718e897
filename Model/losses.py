"""SAT losses: batch area loss, normalization loss and their sum with cross-entropy (SPEC section 2)."""
import math
from typing import Dict

import torch
import torch.nn.functional as F


def gaussian_kernel_3x3() -> torch.Tensor:
    """The fixed 3x3 smoothing kernel of the official code, shape (1, 1, 3, 3), summing to 1."""
    xs = torch.linspace(-6 - 13 / 6, 6 + 13 / 6, 4, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    k1d = torch.diff(cdf)
    k1d = k1d / k1d.sum()
    kernel = torch.sqrt(torch.outer(k1d, k1d))
    return (kernel / kernel.sum()).float().view(1, 1, 3, 3)


_KERNEL = gaussian_kernel_3x3()


def area_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Mean of each map: (B, h, w) -> (B,)."""
    return maps.flatten(1).mean(dim=1)


def batch_area_loss(maps: torch.Tensor, area_thr: float) -> torch.Tensor:
    """``|mean over the batch of the per-image area - area_thr|``."""
    return (area_per_image(maps).mean() - area_thr).abs()


def normalization_per_image(maps: torch.Tensor) -> torch.Tensor:
    """``mean((1 - M') * M')`` per image, M' the map smoothed by the fixed kernel (zero padding)."""
    kernel = _KERNEL.to(device=maps.device, dtype=maps.dtype)
    smoothed = F.conv2d(maps.unsqueeze(1), kernel, padding=1)
    return ((1 - smoothed) * smoothed).flatten(1).mean(dim=1)


def normalization_loss(maps: torch.Tensor) -> torch.Tensor:
    """Batch mean of :func:`normalization_per_image`: pushes map values towards 0 or 1."""
    return normalization_per_image(maps).mean()


def sat_loss(logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, area_thr: float) -> Dict[str, torch.Tensor]:
    """Total SAT loss = cross-entropy + batch area loss + normalization loss (all weights 1).

    Returns a dict with ``loss`` (to backpropagate) and the detached terms ``ce``, ``area``, ``norm``.
    The map terms are computed in float32 whatever the autocast dtype.
    """
    maps = maps.float()
    ce = F.cross_entropy(logits.float(), targets)
    area = batch_area_loss(maps, area_thr)
    norm = normalization_loss(maps)
    loss = ce + area + norm
    return {"loss": loss, "ce": ce.detach(), "area": area.detach(), "norm": norm.detach()}
