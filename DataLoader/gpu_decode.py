"""``--gpu-decode``: JPEG decoding and Resize on the device instead of PIL in the loader workers.

The workers (``TrainPixels`` / ``EvalPixels`` with ``gpu_decode``) return each file's bytes and the crops
drawn as the PIL path draws them; here a batch is decoded with ``torchvision.io.decode_jpeg`` (a list, so
batched nvJPEG on CUDA; libjpeg on the CPU), each image resized to (R, R) (and to (S, S) for the ``wsol``
view) with bilinear antialiased interpolation rounded back to uint8, giving the same uint8 sources as the
PIL path for ``device_transforms.to_device``. Pixels differ slightly from PIL's (nvJPEG's IDCT and
upsampling, float interpolation against PIL's fixed point; docs/performance.md), so it is a named option,
not the default.

Files the batched decoder cannot take (not JPEG, CMYK, or refused by nvJPEG) are decoded one by one: on
the device, else ``decode_image`` on the CPU, else PIL; a file none of them reads is unreadable, as in the
PIL path: skipped and named in training (a DataError with ``strict_data``), a DataError in evaluation.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from utils.errors import DataError

from .dataset import UNREADABLE, rgb, unreadable_message

PER_IMAGE = ("encoded", "path", "jpeg")  # the keys of a gpu_decode sample that collate keeps as lists


def pack(encoded):
    """The files' bytes of a batch -> one flat uint8 tensor and their sizes: a batch crosses from a worker in
    one shared-memory block (a list of tensors takes a file descriptor each and can run out of them) and
    is pinned and copied as one."""
    return {"encoded": torch.cat(encoded), "encoded_sizes": torch.tensor([len(data) for data in encoded])}


def unpack(images):
    """``pack``'s inverse: the list of each file's bytes (views of the flat tensor)."""
    return list(torch.split(images["encoded"], images["encoded_sizes"].tolist()))


def _decode_one(data, device, jpeg):
    """One file's bytes -> uint8 (3, H, W) RGB on ``device``; the error if no decoder reads it. ``jpeg``: the
    device's JPEG decoder may take it (``transforms.file_bytes``), else torchvision's or PIL's on the CPU."""
    if jpeg:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    try:
        decoded = decode_image(data, mode=ImageReadMode.RGB)
        if decoded.ndim == 4:  # an animated GIF, (frames, 3, H, W): its first frame, as PIL reads it
            decoded = decoded[0]
        if decoded.dtype != torch.uint8:  # a 16-bit PNG: its high byte, as PIL and dataset.rgb read it
            decoded = (decoded.to(torch.int32) >> 8).to(torch.uint8)
        return decoded.to(device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return torch.from_numpy(np.array(rgb(image))).permute(2, 0, 1).to(device)
    except UNREADABLE as err:  # only its message is used; its traceback would keep the callers' frames in a cycle
        return err.with_traceback(None)


def decode(encoded, jpeg, device):
    """File bytes (a list of uint8 tensors) -> a list of uint8 (3, H, W) RGB tensors on ``device`` (or
    the exception of a file no decoder reads). ``jpeg[k]``: file k may go to the device's JPEG decoder (batched,
    else alone; ``transforms.file_bytes``), else to the CPU decoders."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one spelling: torchvision rebuilds its decoder (and
        device = torch.device("cuda", torch.cuda.current_device())  # leaks the old one) when the device differs
    if device.type == "cuda":
        # torchvision's nvJPEG decode allocates its outputs on the current stream but writes them on a stream of
        # its own without waiting for this one (pytorch/vision#9606): memory freed here while queued kernels
        # still read it (the previous batch's) would be overwritten under them. Wait for those kernels first.
        torch.cuda.current_stream(device).synchronize()
    images = [None] * len(encoded)
    batched = [k for k, ok in enumerate(jpeg) if ok]
    if batched:
        try:
            for k, image in zip(batched, decode_jpeg([encoded[k] for k in batched], mode=ImageReadMode.RGB,
                                                     device=device)):
                images[k] = image
        except RuntimeError:  # one file refused fails the whole batch: each is retried below
            pass
    return [image if image is not None else _decode_one(data, device, ok)
            for image, data, ok in zip(images, encoded, jpeg)]


def _bilinear(images, height, width):
    """Float (N, 3, H, W) -> (N, 3, height, width), antialiased bilinear (PIL's filter), rounded to integers."""
    out = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def resize(images, size):
    """uint8 (3, H, W) images of any sizes -> uint8 (N, size, size, 3) as PIL's Resize((size, size)):
    antialiased bilinear, in PIL's two passes (width, then height) each rounded to integers (one pass
    of float interpolation rounds differently at ~18% of the pixels, two passes at ~0.3%). Images of
    one shape are resized together and put back in order by one stack (no index tensor copied to the
    device: a copy from pageable memory waits for the stream, once per shape)."""
    shapes = {}
    for k, image in enumerate(images):
        shapes.setdefault(tuple(image.shape), []).append(k)
    resized = [None] * len(images)
    for (_, height, _), indices in shapes.items():
        group = torch.stack([images[k] for k in indices]).float()
        group = _bilinear(_bilinear(group, height, size), size, size).to(torch.uint8)
        for k, image in zip(indices, group):
            resized[k] = image
    return torch.stack(resized).permute(0, 2, 3, 1).contiguous()


def _select(value, kept):
    if torch.is_tensor(value):
        return value[torch.tensor(kept, dtype=torch.long)]
    return [value[k] for k in kept]


def decode_batch(batch, device):
    """A collated batch whose 'image' holds file bytes -> the same batch with the uint8 sources the PIL
    path gives (``'pixels'`` (B, R, R, 3) and/or ``'wsol'`` (B, S, S, 3) with the crops) on ``device``.
    Unreadable files: a DataError naming the first when the samples are ``strict`` (evaluation,
    ``strict_data``), else dropped from the batch and named in ``batch['skipped']``."""
    images = batch["image"]
    decoded = decode(unpack(images), images["jpeg"], device)
    failed = [(path, err) for path, err in zip(images["path"], decoded) if isinstance(err, Exception)]
    if failed and images["strict"]:
        raise DataError(unreadable_message(*failed[0]))
    kept = [k for k, image in enumerate(decoded) if torch.is_tensor(image)]
    batch = dict(batch)
    if failed:
        batch.update({key: _select(value, kept) for key, value in batch.items()
                      if key not in ("image", "num_skipped", "skipped")})
        batch.update(num_skipped=batch["num_skipped"] + len(failed),
                     skipped=list(batch["skipped"]) + [f"skipping {unreadable_message(*f)}" for f in failed])
    if not kept:
        batch["image"] = torch.empty(0)
        return batch
    decoded = [decoded[k] for k in kept]
    out = {key: value for key, value in images.items() if key in ("crops", "crop_size")}
    if failed and "crops" in out:  # (B, 3) or (B, V, 3)
        out["crops"] = _select(out["crops"], kept)
    if "resize_size" in images:
        out["pixels"] = resize(decoded, images["resize_size"])
    if "wsol_size" in images:
        out["wsol"] = resize(decoded, images["wsol_size"])
    batch["image"] = out
    return batch
