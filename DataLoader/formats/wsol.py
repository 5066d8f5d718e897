"""wsolevaluation metadata folders ``<metadata_root>/<split>/`` (CUB, ILSVRC, OpenImages30k):
image_ids.txt, class_labels.txt (``id,class``), optional image_sizes.txt (``id,w,h``) and, for val/test,
localization.txt (``id,x0,y0,x1,y1`` per box, or ``id,mask_path,ignore_path`` per mask)."""
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from utils.cv import cv2
from utils.errors import DataError

from ..dataset import UNREADABLE
from .annotations import (Item, check_boxes, check_label, check_under_root, entries, lines_source, read_lines,
                          read_table, rows_by_id)

WSOL_LAYOUT = "wsolevaluation metadata: image_ids.txt, class_labels.txt, image_sizes.txt, localization.txt"
LABELS_EXPECTED = "'image_id,class'"
IDS_FILE = "image_ids.txt"
_logger = logging.getLogger("sat")


def _num_classes(metadata_root, split, labels):
    """1 + the largest label of the train split (this split's ``labels`` when there is no train metadata, and when
    it is the train split: its class_labels.txt, read once, 1.28 M lines for ILSVRC)."""
    train_labels = Path(metadata_root) / "train" / "class_labels.txt"
    if split != "train" and train_labels.is_file():
        return _largest_label(train_labels) + 1
    return max((rows[0][1][0] for rows in labels.values()), default=-1) + 1


def _largest_label(path):
    """The largest label of a class_labels.txt from its label column alone: an evaluation split reads the train
    split's (ILSVRC: 1.28 M lines, 0.45 s; 4.3 s through read_table). A blank or malformed line hands it to
    read_table, which skips the one and names the other as it does everywhere."""
    try:
        return max((int(line.split(",", 1)[1]) for line in read_lines(path, LABELS_EXPECTED)), default=-1)
    except (IndexError, ValueError):
        return max((label for _, (_, label) in read_table(path, (str, int), LABELS_EXPECTED, sep=",")), default=-1)


def _existing(root, relpath, where):
    """str(Path(root) / relpath); DataError naming ``where`` unless that file exists."""
    path = Path(root) / relpath
    if not os.path.exists(path):
        raise DataError(f"{where}: file {path} not found")
    return str(path)


def _check_exists(root, relpath, where):
    """:func:`_existing`'s check without its Path object for a file that exists (1.28 M ids: seconds)."""
    if not os.path.exists(os.path.join(root, relpath)):
        _existing(root, relpath, where)  # its error, and its verdict where Path differs (a trailing '/')


def _read_localization(path, ids):
    """({image id: rows}, True for mask lines / False for box lines) of localization.txt."""
    first = next((line for line in read_lines(path, "localization lines") if line.strip()), "").split(",")
    if len(first) == 3 and not _is_number(first[1]):  # a box line short of a column is said as such below
        expected = "'image_id,mask_path,ignore_path'"
        return rows_by_id(path, (str, str, str), expected, ids, IDS_FILE, sep=",", unique=False), True
    expected = "'image_id,x0,y0,x1,y1' (one line per box)"
    return rows_by_id(path, (str, float, float, float, float), expected, ids, IDS_FILE, sep=",", unique=False), False


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_wsol(image_root, metadata_root, split):
    """(image root, items, class names) of one wsolevaluation split; masks resolve against image_root."""
    meta = Path(metadata_root) / split
    if not meta.is_dir():
        raise DataError(f"{meta}: metadata folder not found (expected {WSOL_LAYOUT})")
    ids_path, labels_path = meta / "image_ids.txt", meta / "class_labels.txt"
    ids = {}
    for lineno, (image_id,) in read_table(ids_path, (str,), "'image_id' (a path under the image root)"):
        if image_id in ids:  # it would be trained on, or scored, twice
            raise DataError(f"{ids_path} line {lineno}: image {image_id!r} is listed twice (line {ids[image_id]})")
        where = f"{ids_path} line {lineno}"
        check_under_root(image_id, image_root, where)
        _check_exists(image_root, image_id, where)
        ids[image_id] = lineno
    if not ids:
        raise DataError(f"{ids_path}: lists no images (expected {WSOL_LAYOUT})")
    labels = rows_by_id(labels_path, (str, int), LABELS_EXPECTED, ids, IDS_FILE, sep=",")
    num_classes = _num_classes(metadata_root, split, labels)
    if split == "train":  # a class number no image has is a class of its own, never trained on
        seen = {rows[0][1][0] for rows in labels.values()}
        empty = [label for label in range(num_classes) if label not in seen]
        if empty:
            _logger.warning("%s: no image of class %s (the classes are 0 to the largest label, %d)", labels_path,
                            ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else ""), num_classes - 1)
    sizes_path = meta / "image_sizes.txt"
    sizes = (rows_by_id(sizes_path, (str, int, int), "'image_id,width,height'", ids, IDS_FILE, sep=",")
             if sizes_path.exists() else {})
    loc_path = meta / "localization.txt"
    localization, masks = _read_localization(loc_path, ids) if split != "train" else ({}, False)

    items = []
    for image_id in ids:
        [(lineno, (label,))] = entries(labels, image_id, labels_path, IDS_FILE)
        check_label(label, range(num_classes), f"{labels_path} line {lineno}")
        [(size_line, size)] = sizes.get(image_id, [(None, None)])
        item = Item(image_id, label, size=tuple(size) if size else None,
                    size_source=f"{sizes_path} line {size_line}" if size_line else None)
        if split != "train":
            rows = entries(localization, image_id, loc_path, IDS_FILE)
            item.source = lines_source(loc_path, [lineno for lineno, _ in rows])
            if masks:
                item.mask_paths = [_existing(image_root, mask, item.source) for _, (mask, _) in rows]
                ignores = {}  # each ignore path: its first line
                for lineno, (_, ignore) in rows:
                    if ignore:
                        ignores.setdefault(ignore, lineno)
                if len(ignores) > 1:  # one ignore mask per image (wsolevaluation asserts it); one would be dropped
                    (first, line), (second, other) = list(ignores.items())[:2]
                    raise DataError(f"{loc_path} lines {line}, {other}: image {image_id!r} has two ignore masks, "
                                    f"{first} and {second} (expected one per image, on one of its lines; the "
                                    "others' ignore_path empty)")
                item.ignore_path = _existing(image_root, next(iter(ignores)), item.source) if ignores else None
            else:
                item.boxes = np.array([box for _, box in rows], np.float32)
                check_boxes(item.boxes, item.size, item.source, size_from=item.size_source)
        items.append(item)
    return Path(image_root), items, [str(label) for label in range(num_classes)]


ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")  # PIL modes with an alpha channel (LAB's A is a colour)


def alpha_problem(path):
    """Why the mask ``path`` cannot be read as the user meant, or None: a mask with transparent pixels (a cut-out:
    an alpha channel, or a palette with a transparent colour) is read as its grey level alone, which says nothing
    of its transparency (a black cut-out: an empty mask). An alpha opaque everywhere (matplotlib's imsave, image
    editors) hides nothing: such a mask is read, as wsolevaluation reads it. A file PIL does not read (a cv2 format
    such as .hdr, a truncated PNG the header-only data check passed) is not this check's to refuse: None (the data
    check names it unreadable; the evaluation reads it with cv2, as wsolevaluation does)."""
    try:
        with Image.open(path) as image:  # the header alone, but for a mask that holds transparency data
            if image.mode not in ALPHA_MODES and "transparency" not in image.info:  # (Pillow's has_transparency_data,
                return None                                                  # which Pillow < 10.1 lacks)
            mode = image.mode
            if image.convert("RGBA").getchannel("A").getextrema()[0] == 255:
                return None
    except UNREADABLE:
        return None
    return f"has transparent pixels (mode {mode}), which are not read: expected a grayscale mask, its non-zero " \
           "pixels the foreground (save the alpha channel as the mask)"


def reader_problem(path):
    """Why the evaluation cannot read the mask ``path``, or None: it reads masks with OpenCV, as wsolevaluation
    does, and the data check reads them with PIL, which reads files OpenCV has no reader for (.tga, .pcx, .ico;
    .gif with OpenCV 4.8): without this, the data check passed them and the evaluation stopped on them. Reads
    the file's signature alone."""
    if cv2.haveImageReader(str(path)):
        return None
    return f"unreadable by OpenCV {cv2.__version__}, which the evaluation reads masks with (expected a grayscale PNG)"


def _read_mask(path, size):
    """(the mask resized to size x size as booleans, its (W, H) as stored)."""
    # at the file's bit depth: IMREAD_GRAYSCALE alone turns a 16-bit mask into its high byte, so a 16-bit
    # label mask (values 1, 2, ...) read as empty; any non-zero pixel is foreground. As stored, as its image is
    # read (PIL, no EXIF turn): cv2.imread turns a file with an EXIF orientation tag, a mask over other pixels
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION)
    if mask is None:
        raise DataError(f"{path}: unreadable mask (expected a grayscale PNG)")
    problem = alpha_problem(path)
    if problem:
        raise DataError(f"mask {path}: {problem}")
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST) > 0.5, mask.shape[::-1]


def read_masks(mask_paths, ignore_path=None, size=224):
    """:func:`load_mask`'s (foreground, ignore) and the instance masks' (W, H) as stored (a mask of another aspect
    ratio than its image is stretched over other pixels: evaluations count them)."""
    read = [_read_mask(path, size) for path in mask_paths]
    foreground = np.any([mask for mask, _ in read], axis=0)
    ignore = np.zeros_like(foreground) if ignore_path is None else _read_mask(ignore_path, size)[0] & ~foreground
    return foreground, ignore, [shape for _, shape in read]


def load_mask(mask_paths, ignore_path=None, size=224):
    """(foreground, ignore) boolean (size, size) arrays as wsolevaluation builds them for PxAP.

    Foreground is the union of the instance masks; ignore is the ignore mask minus the foreground.
    """
    return read_masks(mask_paths, ignore_path, size)[:2]
