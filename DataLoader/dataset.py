"""The map-style dataset every format builds: image loading, the skip policy and sample dicts."""
import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import DataError

from .formats.annotations import CompactItems, check_boxes

# What PIL raises for missing, truncated or corrupt files, and for an image of more than twice PIL's
# MAX_IMAGE_PIXELS (DecompressionBombError, not an OSError: a traceback in the loader workers and the data check).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# An image of 1 to 2 x MAX_IMAGE_PIXELS (a large photo or scan) loads as any other; PIL's note on it is a two-line
# Python warning that names no file, printed by each loader worker every epoch into the job's output
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)  # -W, PYTHONWARNINGS win


def unreadable_message(path, err):
    """How an unreadable image is named, in Skipped messages and DataErrors alike."""
    return f"unreadable image {path} ({why_unreadable(path, err)})"


EMPTY_FILE = "empty file (0 bytes)"  # what PIL calls a file it does not recognise, when the file has no byte


def is_empty_file(path):
    """Whether ``path`` is a file of 0 bytes (a failed copy or download), said as EMPTY_FILE by every reader."""
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def why_unreadable(path, err):
    """Why ``path`` does not open or decode, from the error ``err``, without the path (the caller names it once):
    'file not found', EMPTY_FILE, 'not an image file PIL recognises', else '<error class>: <reason>' (PIL's
    message names the file again, as Python's repr does: removed; an OSError of the file itself, '[Errno 13]
    Permission denied: <path>', says its strerror alone). The data check, training and predict all say it so."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, Image.UnidentifiedImageError):
        return EMPTY_FILE if is_empty_file(path) else "not an image file PIL recognises"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        reason = err.strerror
    else:
        reason = str(err).replace(f" {str(path)!r}", "")
    return f"{err.__class__.__name__}: {reason}"


def rgb(image):
    """``image`` as 8-bit RGB, as the official code reads images (PIL's convert), but for 16- and 32-bit grey
    images (modes I;16, I, F), whose convert clips every value above 255 (a 16-bit PNG became all white): their
    high byte is kept, as PIL itself reads 16-bit colour PNGs."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max() > 255:
            values = np.clip(values, 0, 65535) / 256
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")

class Skipped(NamedTuple):
    """What an unreadable train image gives instead of a sample: ``collate_samples`` drops it and
    lists ``message`` (naming the file) in ``batch['skipped']``, which the training loop logs."""
    message: str


def size_differences(batch):
    """Images of an evaluation batch whose file is not the size their annotation states (none in a batch
    without ``'file_size'``, e.g. one built by hand)."""
    sizes = batch.get("size", ())
    return sum(tuple(size) != tuple(file_size) for size, file_size in zip(sizes, batch.get("file_size", sizes)))


def size_difference_warning(count, first=""):
    """The one warning of an evaluation over ``count`` (> 0) images counted by :func:`size_differences`;
    ``first`` (', first <image> (...)') names one of them."""
    return (f"{count} image(s) are not the size their box annotation states{first}: their boxes are mapped into "
            "the crop with the stated size, as the official code does")


class WSOLDataset(Dataset):
    """Items of one split read from ``image_root``: samples ``{'image', 'label', 'index'}``, and in evaluation
    splits also ``'boxes'`` (original pixels, a float32 (N, 4) numpy array), ``'size'`` (the size the annotation
    states, else the file's: the official code maps boxes with its lists' sizes), ``'file_size'``, ``'image_id'``
    and mask paths.
    An unreadable training image gives a ``Skipped`` naming it (dropped and logged by the training loop)
    unless ``strict``; in an evaluation split it is a DataError, so that metrics cover the whole split.
    A training split keeps its items' paths and labels only, in buffers that forked loader workers share
    (CompactItems)."""

    def __init__(self, image_root, items, classes, transform, *, evaluation, strict=False):
        self.image_root = str(image_root)
        self.items = items if evaluation else CompactItems(items)
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

    def _open(self, index):
        """The RGB image; a Skipped when unreadable and skipping is allowed.
        A transform with ``gpu_decode`` gets the image opened but not decoded (header read: size, format,
        mode), and decodes on the device (DataLoader/gpu_decode.py)."""
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                return image if getattr(self.transform, "gpu_decode", False) else rgb(image)
        except UNREADABLE as err:
            message = unreadable_message(path, err)
            if self.strict or self.evaluation:
                raise DataError(message) from None
            return Skipped(f"skipping {message}")

    def _transformed(self, index):
        """(the transform's output, the original (W, H)) of image ``index``, through the cache if any; a
        Skipped for an unreadable image that may be skipped."""
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            pixels, size = cached
            return self.transform.from_resized(pixels), size
        image = self._open(index)
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
        sample = {"image": transformed, "label": self.items[index].label, "index": index}
        if getattr(self.transform, "gpu_decode", False):  # a file that fails to decode there: skip or DataError
            sample["image"]["strict"] = self.strict or self.evaluation
        if self.evaluation:
            sample.update(self.annotations(index, file_size))
        return sample

    def annotations(self, index, file_size):
        """What an evaluation sample of item ``index`` holds besides its pixels and label: ``'boxes'``, ``'size'``
        (the stated one, else ``file_size``), ``'file_size'``, ``'image_id'`` and the mask paths of a mask
        dataset; boxes outside the image are a DataError."""
        item = self.items[index]
        boxes = np.zeros((0, 4), np.float32) if item.boxes is None else item.boxes
        size = item.size or file_size
        check_boxes(boxes, size, item.source)
        # numpy, not a tensor: a batch's list of per-image tensors would cross from a worker with one file
        # descriptor each, and an evaluation batch of 256 ran out of a 1024 limit (ulimit -n)
        out = {"boxes": np.asarray(boxes, np.float32), "size": size, "file_size": file_size,
               "image_id": item.image_id}
        if item.mask_paths is not None:
            out.update(mask_paths=list(item.mask_paths), ignore_path=item.ignore_path)
        return out
