"""The device half of the input pipeline: crop, flip, ToTensor scaling and Normalize of uint8 batches.

The loader workers run ``DataLoader.transforms.TrainPixels`` / ``EvalPixels``: PIL decoding and
``Resize`` exactly as the official transforms (same pixels), returned as uint8 HWC tensors with the
crops to take from them as ``(top, left, flip)`` rows, the random ones drawn with torch's RNG in the
same calls and order as ``RandomCrop`` + ``RandomHorizontalFlip`` (same crops for the same seed).
Here (``to_device``) the crops, flips, x / 255 and (x - mean) / std run on the device, in the
official order of float operations. A uint8 256x256 batch is 50 MB per 256 images against 1.5 GB
for ten float crops; the copy is ``non_blocking`` from pinned memory, and ``on_device`` prepares the
next batch on a side CUDA stream while the current one is computed. The result equals the torchvision
transforms: bit for bit on the CPU, within 1e-6 on CUDA (tests/test_device_transforms.py).
With ``--gpu-decode`` the workers return file bytes instead, decoded and resized here first
(DataLoader/gpu_decode.py).
"""
import time

import torch

from .gpu_decode import decode_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_views(pixels, crops, crop_size):
    """uint8 (B, R, R, 3) and (B, [V,] 3) crop rows -> uint8 (B, [V,] 3, S, S): each row's S x S crop at
    (top, left), mirrored left-right when flip is 1. Crops the same for every image (evaluation, given
    on the CPU) are slices; per-image crops (training) one gather on the pixels' device."""
    single = crops.dim() == 2
    crops = crops[:, None] if single else crops
    if crops.device.type == "cpu" and bool((crops == crops[:1]).all()):  # evaluation: the same crops for all
        views = [pixels[:, top:top + crop_size, left:left + crop_size] for top, left, _ in crops[0].tolist()]
        views = torch.stack([v.flip(2) if flip else v for v, (_, _, flip) in zip(views, crops[0].tolist())], 1)
        views = views.permute(0, 1, 4, 2, 3)
        return views[:, 0] if single else views
    steps = torch.arange(crop_size, device=pixels.device)
    top, left, flip = (crops[..., k, None] for k in range(3))  # (B, V, 1) each
    rows = top + steps
    cols = left + torch.where(flip.bool(), crop_size - 1 - steps, steps)
    batch = torch.arange(len(pixels), device=pixels.device)[:, None, None, None]
    views = pixels[batch, rows[..., :, None], cols[..., None, :]]  # (B, V, S, S, 3)
    views = views.permute(0, 1, 4, 2, 3)
    return views[:, 0] if single else views


def normalize(views):
    """uint8 -> float32 as ToTensor (x / 255) then Normalize ((x - mean) / std), in that order."""
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=views.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=views.device).view(shape)
    return views.contiguous().float().div_(255).sub_(mean).div_(std)


def to_device(images, device):
    """A collated batch's 'image' -> normalised float32 on ``device``: (B, 3, S, S) for train pixels,
    (B, V, 3, S, S) for evaluation views (the sat views' crops, then the wsol view). Tensors (images
    already transformed on the host) are only copied."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    views = []
    if "pixels" in images:
        pixels = images["pixels"].to(device, non_blocking=True)
        crops = images["crops"]
        if not bool((crops == crops[:1]).all()):  # random training crops: gathered on the device
            crops = crops.to(device, non_blocking=True)
        views.append(crop_views(pixels, crops, images["crop_size"]))
    if "wsol" in images:
        views.append(images["wsol"].to(device, non_blocking=True).permute(0, 3, 1, 2)[:, None])
    return normalize(views[0] if len(views) == 1 else torch.cat(views, dim=1))


def batch_on_device(batch, device):
    """The batch with its 'image' through ``to_device`` (file bytes decoded first: ``decode_batch``, which
    may drop unreadable images from the batch)."""
    if isinstance(batch["image"], dict) and "encoded" in batch["image"]:
        batch = decode_batch(batch, device)
    return {**batch, "image": to_device(batch["image"], device)}


class on_device:
    """Iterate over ``loader`` with each batch through ``batch_on_device``; on CUDA the next batch is
    copied and transformed on a side stream while the caller computes on the current one. ``wait``: the
    seconds the caller waited for the loader (an input-bound loop waits; a device-bound one does not)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)
        self.wait = 0.0

    def __len__(self):
        return len(self.loader)

    def _loaded(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self._loaded():
                yield batch_on_device(batch, self.device)
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self._loaded():
            with torch.cuda.stream(stream):
                ready = batch_on_device(batch, self.device)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            ready["image"].record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending
