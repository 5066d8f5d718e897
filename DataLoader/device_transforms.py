"""The official transforms split in two, so that the device does the per-pixel work.

In the loader workers (``TrainPixels``, ``EvalPixels``): PIL decoding and ``Resize`` exactly as the
official transforms (same pixels), returned as uint8 HWC tensors, plus the crops to take from them:
``(top, left, flip)`` rows, the random ones drawn with torch's RNG in the same calls and order as
``RandomCrop`` + ``RandomHorizontalFlip`` (same crops for the same seed). On the device
(``to_device``): crop, flip, ``ToTensor`` scaling and ``Normalize``, in the official order of float
operations. A uint8 256x256 batch is 50 MB per 256 images against 1.5 GB for ten float crops, and the
copy is ``non_blocking`` from pinned memory; ``on_device`` prefetches the next batch on a side CUDA
stream while the current one is computed. The result equals the torchvision transforms: bit for bit on
the CPU, within 1 ulp on CUDA (tests/test_device_transforms.py).
"""
import numpy as np
import torch
from torchvision import transforms as T

from .transforms import IMAGENET_MEAN, IMAGENET_STD


def centre_offset(size, crop_size):
    """torchvision's CenterCrop offset (``round`` of half the gap, ties to even)."""
    return int(round((size - crop_size) / 2.0))


def tencrop_boxes(size, crop_size):
    """TenCrop's (top, left, flip) in its order: corners, centre, then the same crops of the mirrored
    image, i.e. the mirrored positions of the original, flipped."""
    far, mid = size - crop_size, centre_offset(size, crop_size)
    five = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    return [(top, left, 0) for top, left in five] + [(top, far - left, 1) for top, left in five]


def _pixels(image):
    return torch.from_numpy(np.array(image, dtype=np.uint8))  # RGB PIL image -> (H, W, 3)


class TrainPixels:
    """PIL image -> ``{'pixels': uint8 (R, R, 3), 'crops': (top, left, flip)}``: Resize((R, R)), then the
    parameters of RandomCrop(S) and RandomHorizontalFlip drawn as those transforms draw them."""

    def __init__(self, img_size=224, resize_size=256):
        self.img_size = img_size
        self.resize = T.Resize((resize_size, resize_size))

    def __call__(self, image):
        image = self.resize(image)
        top, left, _, _ = T.RandomCrop.get_params(image, (self.img_size, self.img_size))
        flip = int(torch.rand(1) < 0.5)
        return {"pixels": _pixels(image), "crops": torch.tensor([top, left, flip]), "crop_size": self.img_size}


class EvalPixels:
    """PIL image -> the uint8 sources of the evaluation views: ``'pixels'`` (Resize((R, R))) with its
    ``'crops'`` (1 centre crop or the 10 of TenCrop) when protocol A is on, and ``'wsol'``
    (Resize((S, S)), the whole view) when protocol B is on; ``to_device`` gives the same
    (V, 3, S, S) stack as ``utils.evaluation.EvalViews``."""

    def __init__(self, n_a, n_b, img_size=224, resize_size=256):
        self.img_size = img_size
        self.resize_a = T.Resize((resize_size, resize_size)) if n_a else None
        self.resize_b = T.Resize((img_size, img_size)) if n_b else None
        if n_a:
            mid = centre_offset(resize_size, img_size)
            boxes = tencrop_boxes(resize_size, img_size) if n_a == 10 else [(mid, mid, 0)]
            self.crops = torch.tensor(boxes)

    def __call__(self, image):
        out = {}
        if self.resize_a is not None:
            out.update(pixels=_pixels(self.resize_a(image)), crops=self.crops, crop_size=self.img_size)
        if self.resize_b is not None:
            out["wsol"] = _pixels(self.resize_b(image))
        return out


def crop_views(pixels, crops, crop_size):
    """uint8 (B, R, R, 3) and (B, [V,] 3) crop rows -> uint8 (B, [V,] 3, S, S): each row's S x S crop at
    (top, left), mirrored left-right when flip is 1."""
    single = crops.dim() == 2
    crops = crops[:, None] if single else crops
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
    (B, V, 3, S, S) for evaluation views (protocol A crops, then the wsol view). Tensors (images
    already transformed on the host) are only copied."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    views = []
    if "pixels" in images:
        pixels = images["pixels"].to(device, non_blocking=True)
        crops = images["crops"].to(device, non_blocking=True)
        views.append(crop_views(pixels, crops, images["crop_size"]))
    if "wsol" in images:
        views.append(images["wsol"].to(device, non_blocking=True).permute(0, 3, 1, 2)[:, None])
    return normalize(views[0] if len(views) == 1 else torch.cat(views, dim=1))


class on_device:
    """Iterate over ``loader`` with each batch's 'image' already through ``to_device``; on CUDA the next
    batch is copied and transformed on a side stream while the caller computes on the current one."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield {**batch, "image": to_device(batch["image"], self.device)}
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                ready = {**batch, "image": to_device(batch["image"], self.device)}
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            ready["image"].record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending
