"""The map-style dataset every format builds: image loading, the skip policy and sample dicts."""
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import DataError

from .annotations import check_boxes

# What PIL raises for missing, truncated or corrupt files.
UNREADABLE = (OSError, ValueError, SyntaxError)


def unreadable_message(path, err):
    """How an unreadable image is named, in Skipped messages and DataErrors alike."""
    return f"unreadable image {path} ({err.__class__.__name__}: {err})"


class Skipped(NamedTuple):
    """What an unreadable train image gives instead of a sample: ``collate_samples`` drops it and
    lists ``message`` (naming the file) in ``batch['skipped']``, which the training loop logs."""
    message: str


def size_differences(batch):
    """Images of an evaluation batch whose file is not the size their annotation states (none in a batch
    without ``'file_size'``, e.g. one built by hand)."""
    sizes = batch.get("size", ())
    return sum(tuple(size) != tuple(file_size) for size, file_size in zip(sizes, batch.get("file_size", sizes)))


def size_difference_warning(count):
    """The one warning of an evaluation over ``count`` (> 0) images counted by :func:`size_differences`."""
    return (f"{count} image(s) are not the size their box annotation states: their boxes are mapped into the "
            "crop with the stated size, as the official code does")


class WSOLDataset(Dataset):
    """Items of one split read from ``image_root``.

    Train samples: ``{'image', 'label', 'index'}``. Evaluation samples (``evaluation=True``) add
    ``'boxes'`` (K, 4) float32 in original pixels, ``'size'`` (W, H) of those pixels, ``'file_size'`` (W, H)
    of the decoded file, ``'image_id'`` and, for mask datasets, ``'mask_paths'`` and ``'ignore_path'``.
    ``'size'`` is the size the annotation states where it states one (ImageNet val_gt.txt and XML files,
    Stanford Dogs XML files, wsolevaluation image_sizes.txt), else the file's: boxes are mapped into the
    crop with it, as the official code maps them with the sizes written in its box lists.

    An unreadable image in a train split gives a ``Skipped`` naming the file (dropped by
    ``collate_samples``, logged by the training loop in the main process, so that it reaches log.txt
    whatever the warning filters) unless ``strict``; in an evaluation split it is always a DataError, so
    that metrics cover the whole split.
    """

    def __init__(self, image_root, items, classes, transform, *, evaluation, strict=False):
        self.image_root = str(image_root)
        self.items = items
        self.classes = list(classes)
        self.transform = transform
        self.evaluation = evaluation
        self.strict = strict
        self.cache = None  # an ImageCache (DataLoader/image_cache.py): resized pixels of the images read before

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.items)

    def image_path(self, index):
        return os.path.join(self.image_root, self.items[index].path)

    def _open(self, index, header_only):
        """The RGB image (or only its (W, H) size); a Skipped when unreadable and skipping is allowed.
        A transform with ``gpu_decode`` gets the image opened but not decoded (header read: size, format,
        mode), and decodes on the device (DataLoader/gpu_decode.py)."""
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                if header_only:
                    return image.size
                return image if getattr(self.transform, "gpu_decode", False) else image.convert("RGB")
        except UNREADABLE as err:
            message = unreadable_message(path, err)
            if self.strict or self.evaluation:
                raise DataError(message) from None
            return Skipped(f"skipping {message}")

    def check_item(self, index):
        """Read the image header and check the item's boxes against its size; the Skipped of an
        unreadable image that may be skipped, else None."""
        size = self._open(index, header_only=True)
        if isinstance(size, Skipped):
            return size
        item = self.items[index]
        if item.boxes is not None:
            check_boxes(item.boxes, item.size or size, item.source)
        return None

    def _transformed(self, index):
        """(the transform's output, the original (W, H)) of image ``index``, through the cache if any; a
        Skipped for an unreadable image that may be skipped."""
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            pixels, size = cached
            return self.transform.from_resized(pixels), size
        image = self._open(index, header_only=False)
        if isinstance(image, Skipped):
            return image, None
        if self.cache is None:
            return self.transform(image), image.size
        pixels = self.transform.resized(image)
        self.cache.put(index, pixels, image.size)
        return self.transform.from_resized(pixels), image.size

    def __getitem__(self, index):
        transformed, file_size = self._transformed(index)
        if isinstance(transformed, Skipped):
            return transformed
        item = self.items[index]
        sample = {"image": transformed, "label": item.label, "index": index}
        if getattr(self.transform, "gpu_decode", False):  # a file that fails to decode there: skip or DataError
            sample["image"]["strict"] = self.strict or self.evaluation
        if self.evaluation:
            boxes = np.zeros((0, 4), np.float32) if item.boxes is None else item.boxes
            size = item.size or file_size
            check_boxes(boxes, size, item.source)
            sample.update(boxes=torch.tensor(boxes), size=size, file_size=file_size, image_id=item.image_id)
            if item.mask_paths is not None:
                sample.update(mask_paths=list(item.mask_paths), ignore_path=item.ignore_path)
        return sample
