"""SAT losses: batch area loss, normalization loss and their sum with cross-entropy (paper, Sec. 3.3).

The batch area loss is ``|mean area over a batch - lambda|``: which images form that batch changes the loss
(it is not a mean of per-image terms). ``area_loss_scope`` says which, for one call (one micro-batch per process):
``process`` = this process's images; ``global`` = the images of all processes, summed through a differentiable
all-reduce, as the official CUB run's DataParallel gathered its 256 per-image areas; an integer N = the images
of all processes in rank order, cut into consecutive groups of N images, one area term per group, averaged, as
the official ImageNet run's DDP gave each of its 4 GPUs its own 128 images (whatever the number of processes).
"""
import functools
import math
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

AREA_LOSS_SCOPES = ("global", "process")
# What sat_loss returns, each averaged over the epoch's images into metrics.jsonl (train_<key>) and the epoch's line
LOSS_KEYS = ("loss", "ce", "area", "norm")


def sat_loss(logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, area_thr: float,
             area_loss_scope="global", micro_batch=None, area_loss_weight=1.0,
             norm_loss_weight=1.0) -> Dict[str, torch.Tensor]:
    """Total SAT loss = cross-entropy + batch area loss + normalization loss (official weights 1; other weights,
    0 included, for ablations of the map terms).

    Returns a dict with ``loss`` (to backpropagate) and the detached terms ``ce``, ``area``, ``norm`` (LOSS_KEYS),
    unweighted: a term weighted 0 is still reported. The map terms are computed in float32 whatever the autocast
    dtype.
    """
    maps = maps.float()
    ce = F.cross_entropy(logits.float(), targets)
    area = batch_area_loss(maps, area_thr, area_loss_scope, micro_batch)
    norm = normalization_loss(maps)
    loss = ce + area_loss_weight * area + norm_loss_weight * norm
    return {"loss": loss, "ce": ce.detach(), "area": area.detach(), "norm": norm.detach()}


class SATLoss(nn.Module):
    """The training criterion: ``criterion(logits, maps, targets)`` -> :func:`sat_loss`'s dict.

    Under DDP, ``global`` and group sizes equal the official loss on the concatenated batch: each process
    backpropagates the same area term, the all-reduce's backward sums the gradients of all processes' areas,
    and DDP's gradient averaging divides by the number of processes again. ``micro_batch``: images each
    process forwards per call (see :func:`batch_area_loss`).
    """

    def __init__(self, area_thr: float, area_loss_scope="global", micro_batch=None, area_loss_weight=1.0,
                 norm_loss_weight=1.0):
        super().__init__()
        self.area_thr, self.micro_batch = area_thr, micro_batch
        self.area_loss_scope = check_area_loss_scope(area_loss_scope)
        self.area_loss_weight, self.norm_loss_weight = area_loss_weight, norm_loss_weight

    def forward(self, logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return sat_loss(logits, maps, targets, self.area_thr, self.area_loss_scope, self.micro_batch,
                        self.area_loss_weight, self.norm_loss_weight)

    def extra_repr(self) -> str:
        return (f"area_thr={self.area_thr}, area_loss_scope={self.area_loss_scope}, micro_batch={self.micro_batch}, "
                f"area_loss_weight={self.area_loss_weight}, norm_loss_weight={self.norm_loss_weight}")


# ------------------------------------------------------------------- the two map terms
def area_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Mean of each map: (B, h, w) -> (B,)."""
    return maps.flatten(1).mean(dim=1)


def batch_area_loss(maps: torch.Tensor, area_thr: float, area_loss_scope="global", micro_batch=None) -> torch.Tensor:
    """``|mean area of a batch - area_thr|``, averaged over the batches ``area_loss_scope`` (see the module) makes.

    Image i of the process of rank r has the place ``r * micro_batch + i`` in the global micro-batch;
    ``micro_batch`` is the size of every process's call when no image was dropped (a process with fewer
    images leaves the others' groups as they are; needed for a group size with several processes, else
    this call's size). With ``global`` or a group size every process returns the same value,
    differentiable in every process's maps.
    """
    areas = area_per_image(maps)
    check_area_loss_scope(area_loss_scope)
    if area_loss_scope == "process":
        return (areas.mean() - area_thr).abs()
    world_size, rank = _process()
    if micro_batch is None and world_size > 1 and area_loss_scope != "global":
        # each process's count of groups would follow its own batch: one with a dropped image would hang
        raise ValueError("an area group size with several processes needs micro_batch")
    micro_batch = micro_batch or len(areas)
    if len(areas) > micro_batch:
        raise ValueError(f"{len(areas)} maps in one call, more than micro_batch={micro_batch}")
    group_size = area_span(area_loss_scope, micro_batch, world_size)
    num_groups = -(-world_size * micro_batch // group_size)
    place = rank * micro_batch + torch.arange(len(areas), device=areas.device)
    member = (place // group_size == torch.arange(num_groups, device=areas.device)[:, None]).to(areas.dtype)
    stats = torch.stack([(member * areas).sum(dim=1), member.sum(dim=1)])  # (2, groups): area sums, counts
    if world_size > 1:
        stats = AllReduceSum.apply(stats)
    sums, counts = stats
    filled = (counts > 0).to(areas.dtype)  # a partial last batch leaves some groups empty
    return ((sums / counts.clamp(min=1) - area_thr).abs() * filled).sum() / filled.sum()


def gaussian_kernel_3x3() -> torch.Tensor:
    """The fixed 3x3 smoothing kernel of the official code, shape (1, 1, 3, 3), summing to 1, built as it builds
    it: the square root of the outer product of a 3-bin Gaussian over +-6 sigma (bins 13/3 sigma wide, edges
    -6 - 13/6 ... 6 + 13/6). So wide a range leaves it nearly the identity (centre weight 0.81)."""
    xs = torch.linspace(-6 - 13 / 6, 6 + 13 / 6, 4, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    k1d = torch.diff(cdf)
    k1d = k1d / k1d.sum()
    kernel = torch.sqrt(torch.outer(k1d, k1d))
    return (kernel / kernel.sum()).float().view(1, 1, 3, 3)


_KERNEL = gaussian_kernel_3x3()


@functools.lru_cache(maxsize=None)
def _kernel_on(device, dtype):
    """The smoothing kernel on ``device`` in ``dtype``, copied once: a copy per step from pageable memory would
    make the host wait for the GPU's queued work (the whole forward) at every step. A normal tensor even when
    first asked for under inference mode, so that training can use it afterwards."""
    with torch.inference_mode(False):
        return _KERNEL.to(device=device, dtype=dtype)


def normalization_per_image(maps: torch.Tensor) -> torch.Tensor:
    """``mean((1 - M') * M')`` per image, M' the map smoothed by the fixed kernel (zero padding)."""
    smoothed = F.conv2d(maps.unsqueeze(1), _kernel_on(maps.device, maps.dtype), padding=1)
    return ((1 - smoothed) * smoothed).flatten(1).mean(dim=1)


def normalization_loss(maps: torch.Tensor) -> torch.Tensor:
    """Batch mean of :func:`normalization_per_image`: pushes map values towards 0 or 1."""
    return normalization_per_image(maps).mean()


# ------------------------------------------------ the batch area loss across processes
def check_area_loss_scope(area_loss_scope):
    """``area_loss_scope`` if it is 'global', 'process' or a group size in images (an int >= 1); else ValueError."""
    if area_loss_scope in AREA_LOSS_SCOPES or (type(area_loss_scope) is int and area_loss_scope >= 1):
        return area_loss_scope
    raise ValueError(f"area_loss_scope must be one of {AREA_LOSS_SCOPES} or a number of images >= 1, got "
                     f"{area_loss_scope!r}")


class AllReduceSum(torch.autograd.Function):
    """Sum over all processes, differentiable: each input's gradient is the sum of all processes' output
    gradients (what torch.distributed.nn.functional.all_reduce computed before its deprecation)."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _process():
    """(number of processes, this process's rank): (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def area_span(area_loss_scope, micro_batch, world_size=1):
    """Images in one area term (the last group of an integer scope may hold fewer) when each of
    ``world_size`` processes forwards ``micro_batch`` images per call."""
    check_area_loss_scope(area_loss_scope)
    if area_loss_scope == "process":
        return micro_batch
    return world_size * micro_batch if area_loss_scope == "global" else min(area_loss_scope, world_size * micro_batch)
