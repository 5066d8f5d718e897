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
import contextlib
import functools
import itertools
import time

import torch

from .background import Background
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


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    """Normalize's mean and std as (3, 1, 1) tensors on ``device``, made once per device: made per batch on
    CUDA, each is a copy from pageable memory, which waits for the stream's queued work."""
    return tuple(torch.tensor(values, device=device).view(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(views):
    """uint8 -> float32 as ToTensor (x / 255) then Normalize ((x - mean) / std), in that order."""
    mean, std = _mean_std(views.device)
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


def holds_file_bytes(batch):
    """Whether ``batch``'s images are the files' bytes of ``--gpu-decode`` (an ``(images, labels)`` pair never is)."""
    return isinstance(batch, dict) and isinstance(batch.get("image"), dict) and "encoded" in batch["image"]


def batch_on_device(batch, device):
    """The batch with its 'image' through ``to_device`` (file bytes decoded first: ``decode_batch``, which
    may drop unreadable images from the batch); an ``(images, labels)`` pair (a torch DataLoader of (image, label)
    samples) becomes ``{'image': images, 'label': labels}``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = {"image": batch[0], "label": batch[1]}
    if holds_file_bytes(batch):
        batch = decode_batch(batch, device)
    return {**batch, "image": to_device(batch["image"], device)}


class on_device:
    """Iterate over ``loader`` with each batch through ``batch_on_device``; on CUDA the next batch is
    copied and transformed on a side stream while the caller computes on the current one. On CUDA, batches
    of file bytes (``--gpu-decode``) are prepared in a thread of their own (``Background``), ``AHEAD``
    batches ahead: decoding holds its calling thread about as long as a training step (nvJPEG's Huffman
    stage runs on the CPU, without the GIL), which the step would otherwise wait for. ``background``: None
    (that choice), True or False. Nothing is read ahead on the CPU (nothing to overlap) nor from a loader
    whose samples draw their crops from the caller's RNG (``reads_in_caller``: no workers): a checkpoint
    saved after a step would hold the RNG state after the next batch's draws, and a resumed run would crop
    that batch differently. ``wait``: the seconds the caller waited for its next batch (an input-bound loop
    waits; a device-bound one does not)."""

    AHEAD = 2

    def __init__(self, loader, device, background=None):
        self.loader, self.device, self.background = loader, torch.device(device), background
        self.wait = 0.0

    def __len__(self):
        return len(self.loader)

    def _timed(self, items):
        """``items`` with the time the caller waited for each added to ``wait``."""
        while True:
            start = time.perf_counter()
            item = next(items, None)
            self.wait += time.perf_counter() - start
            if item is None:
                return
            yield item

    def _prepared(self, first, rest):
        """``first``, then the batches of ``rest``, through ``batch_on_device``; on CUDA on a side stream,
        each with the event that ends its work. Closing it closes ``rest`` (the loader's pass)."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for batch in itertools.chain([first], rest):
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    ready = batch_on_device(batch, self.device)
                    done = torch.cuda.Event() if cuda else None
                    if cuda:
                        done.record(stream)
                yield ready, done
        finally:
            close = getattr(rest, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        batches = iter(self.loader)
        start = time.perf_counter()
        first = next(batches, None)
        self.wait += time.perf_counter() - start
        if first is None:
            return
        ahead = self.device.type == "cuda" and not getattr(self.loader, "reads_in_caller", False)
        background = self.background
        if background is None:
            background = ahead and holds_file_bytes(first)
        if background:
            setup = None
            if self.device.type == "cuda":  # the thread's current device: this one's when the index is not given
                index = torch.cuda.current_device() if self.device.index is None else self.device.index
                setup = functools.partial(torch.cuda.set_device, index)
            thread = Background(self._prepared(first, batches), self.AHEAD, setup, name="sat-on-device")
            try:
                for item in self._timed(iter(thread)):
                    yield self._ready(*item)
            finally:
                thread.stop()
            return
        prepared = self._prepared(first, self._timed(batches))
        if not ahead:
            yield from (self._ready(*item) for item in prepared)
            return
        pending = next(prepared)  # one batch ahead: the next is prepared on the side stream during the step
        for item in prepared:
            yield self._ready(*pending)
            pending = item
        yield self._ready(*pending)

    def _ready(self, batch, done):
        """The caller's stream waits for the batch's preparation and keeps its images' memory until it is done."""
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            batch["image"].record_stream(current)
        return batch
