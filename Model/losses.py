"""SAT losses: batch area loss, normalization loss and their sum with cross-entropy (paper, Sec. 3.3).

The batch area loss is ``|mean area over a batch - lambda|``: which images form that batch changes the loss
(it is not a mean of per-image terms). ``area_scope`` names it: ``process`` = the images this process
forwards in one call (its micro-batch), ``global`` = the micro-batches of all processes, averaged through a
differentiable all-reduce, as the official CUB run's DataParallel gathered its 256 per-image areas.
"""
import math
from typing import Dict

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F

AREA_SCOPES = ("global", "process")


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


def mean_area(maps: torch.Tensor, area_scope: str = "process") -> torch.Tensor:
    """Mean of the per-image areas over this process's batch, or with ``area_scope='global'`` (and an
    initialised process group) over the batches of all processes, differentiable in every process's maps."""
    areas = area_per_image(maps)
    if area_scope not in AREA_SCOPES:
        raise ValueError(f"area_scope must be one of {AREA_SCOPES}, got {area_scope!r}")
    if area_scope == "process" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return areas.mean()
    total, count = dist_nn.all_reduce(torch.stack([areas.sum(), areas.new_tensor(float(len(areas)))]))
    return total / count


def batch_area_loss(maps: torch.Tensor, area_thr: float, area_scope: str = "process") -> torch.Tensor:
    """``|mean over the batch of the per-image area - area_thr|``; ``area_scope``: see :func:`mean_area`."""
    return (mean_area(maps, area_scope) - area_thr).abs()


def normalization_per_image(maps: torch.Tensor) -> torch.Tensor:
    """``mean((1 - M') * M')`` per image, M' the map smoothed by the fixed kernel (zero padding)."""
    kernel = _KERNEL.to(device=maps.device, dtype=maps.dtype)
    smoothed = F.conv2d(maps.unsqueeze(1), kernel, padding=1)
    return ((1 - smoothed) * smoothed).flatten(1).mean(dim=1)


def normalization_loss(maps: torch.Tensor) -> torch.Tensor:
    """Batch mean of :func:`normalization_per_image`: pushes map values towards 0 or 1."""
    return normalization_per_image(maps).mean()


def sat_loss(logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, area_thr: float,
             area_scope: str = "process") -> Dict[str, torch.Tensor]:
    """Total SAT loss = cross-entropy + batch area loss + normalization loss (all weights 1).

    Returns a dict with ``loss`` (to backpropagate) and the detached terms ``ce``, ``area``, ``norm``.
    The map terms are computed in float32 whatever the autocast dtype.
    """
    maps = maps.float()
    ce = F.cross_entropy(logits.float(), targets)
    area = batch_area_loss(maps, area_thr, area_scope)
    norm = normalization_loss(maps)
    loss = ce + area + norm
    return {"loss": loss, "ce": ce.detach(), "area": area.detach(), "norm": norm.detach()}


class SATLoss(nn.Module):
    """The training criterion: ``criterion(logits, maps, targets)`` -> :func:`sat_loss`'s dict.

    ``area_scope='global'`` under DDP equals the official DataParallel loss on the concatenated batch:
    each process backpropagates the same area term, the all-reduce's backward sums the gradients of all
    processes' areas, and DDP's gradient averaging divides by the number of processes again.
    """

    def __init__(self, area_thr: float, area_scope: str = "global"):
        super().__init__()
        if area_scope not in AREA_SCOPES:
            raise ValueError(f"area_scope must be one of {AREA_SCOPES}, got {area_scope!r}")
        self.area_thr, self.area_scope = area_thr, area_scope

    def forward(self, logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return sat_loss(logits, maps, targets, self.area_thr, self.area_scope)

    def extra_repr(self) -> str:
        return f"area_thr={self.area_thr}, area_scope={self.area_scope}"
