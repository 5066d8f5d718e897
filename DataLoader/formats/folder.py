"""Custom data as image folders per class, ``<root>/<split>/<class>/<image>``, with optional boxes
in ``<root>/boxes.csv`` (``image,x0,y0,x1,y1`` per box, image relative to root, header optional)."""
import logging
import os
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import Item, check_boxes, lines_source, read_table

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Photo types the folder format does not read (torchvision's ImageFolder neither): warned, not skipped silently
OTHER_PHOTO_EXTENSIONS = (".gif", ".heic", ".heif", ".jfif", ".avif", ".jxl", ".jp2")
CONVERT_HINT = f"convert them to one of {', '.join(IMAGE_EXTENSIONS)}"  # what to do with such photos
FOLDER_LAYOUT = "<split>/<class>/<image> folders"
_logger = logging.getLogger("sat")


def list_dir(directory):
    """Sorted (name, is a folder) of the entries of ``directory``, hidden ones left out."""
    try:
        return sorted((entry.name, entry.is_dir()) for entry in os.scandir(directory)
                      if not entry.name.startswith("."))
    except OSError as err:
        raise DataError(f"{directory}: cannot list the folder ({err.strerror})") from None


def has_file(directory, fits):
    """Whether ``directory`` holds a file (hidden ones left out, as list_dir does) whose name ``fits``; stops at
    the first, without listing a large folder whole."""
    try:
        with os.scandir(directory) as scan:
            return any(not entry.name.startswith(".") and fits(entry.name) and not entry.is_dir() for entry in scan)
    except OSError as err:
        raise DataError(f"{directory}: cannot list the folder ({err.strerror})") from None


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_other_photo(name):
    """Whether ``name`` is a photo of a type the folder format does not read (OTHER_PHOTO_EXTENSIONS)."""
    return name.lower().endswith(OTHER_PHOTO_EXTENSIONS)


def class_folders(directory, layout=FOLDER_LAYOUT):
    """Sorted names of the class sub-folders of ``directory`` (``layout``: the expected one, for the error)."""
    names = [name for name, is_dir in list_dir(directory) if is_dir]
    if not names:
        raise DataError(f"{directory}: no class folders (expected {layout})")
    return names


def image_files(directory):
    """Sorted image file names directly inside ``directory``."""
    return [name for name, is_dir in list_dir(directory) if not is_dir and is_image_file(name)]


def check_class_has_images(directory):
    """DataError when the class folder ``directory`` holds no image file: it would be a class no image has,
    shifting the labels of the classes sorted after it."""
    if has_file(directory, is_image_file):  # as image_files lists them (hidden ones, macOS's ._ files, left out)
        return
    if has_file(directory, is_other_photo):  # (iPhone's .heic): not a folder to remove
        raise DataError(f"{directory}: a class folder with photos of a type the folder format does not read only: "
                        f"{CONVERT_HINT}")
    raise DataError(f"{directory}: a class folder with no image ({', '.join(IMAGE_EXTENSIONS)}): remove it, or it "
                    "would be a class of its own")


def scan_class_folders(root, split, classes):
    """Items of ``<root>/<split>/<class>/<image>`` labelled by the class's index in ``classes``."""
    split_dir = Path(root) / split
    index = {name: label for label, name in enumerate(classes)}
    items, nested, other = [], [], []
    for name in class_folders(split_dir):
        if name not in index:
            raise DataError(f"{split_dir / name}: class folder is not one of the {len(classes)} "
                            f"train classes (label outside the class range)")
        entries = list_dir(split_dir / name)
        items += [Item(f"{split}/{name}/{file}", index[name]) for file, is_dir in entries
                  if not is_dir and is_image_file(file)]
        nested += [split_dir / name / file for file, is_dir in entries if is_dir]
        other += [split_dir / name / file for file, is_dir in entries if not is_dir and is_other_photo(file)]
    if other:  # (before the error of a split of such photos alone: it says why)
        _logger.warning("%s: %d image(s) of a type the folder format does not read (first: %s): not read; %s",
                        split_dir, len(other), other[0], CONVERT_HINT)
    if not items:
        raise DataError(f"{split_dir}: no images found (expected {FOLDER_LAYOUT})")
    if nested:  # torchvision's ImageFolder reads them: say that these are not
        _logger.warning("%s: %d folder(s) inside class folders (first: %s): the images in them are not read (only "
                        "the files directly in a class folder are)", split_dir, len(nested), nested[0])
    return items


def read_boxes_csv(path, root):
    """{image path relative to root: (boxes, source)} from a boxes CSV (its paths relative to root, as
    ``test/cat/1.jpg`` or ``./test/cat/1.jpg``, or absolute under root)."""
    rows = {}
    resolved = {}  # each image as written -> its path relative to root: looked up once, not once per box line
    for lineno, (image, *box) in read_table(path, (str, float, float, float, float),
                                            "'image,x0,y0,x1,y1'", header="image", quoted=True):
        where = f"{path} line {lineno}"
        if image not in resolved:
            if not os.path.exists(Path(root) / image):
                raise DataError(f"{where}: image {Path(root) / image} not found")
            relative = os.path.relpath(Path(root) / image, root).replace(os.sep, "/")
            if relative.startswith("../"):
                raise DataError(f"{where}: image {image} is not under the data root {root}")
            resolved[image] = relative
        image = resolved[image]
        check_boxes(box, None, where)
        rows.setdefault(image, []).append((box, lineno))
    return {image: (np.array([box for box, _ in entries], np.float32),
                    lines_source(path, [lineno for _, lineno in entries]))
            for image, entries in rows.items()}


def load_folder(root, split, boxes_csv=None):
    """(image root, items, class names) of ``<root>/<split>``; classes are the sorted train folders."""
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: not found (expected {FOLDER_LAYOUT})")
    classes_dir = root / "train" if (root / "train").is_dir() else split_dir
    classes = class_folders(classes_dir)
    for name in classes:
        check_class_has_images(classes_dir / name)
    items = scan_class_folders(root, split, classes)
    csv_path = Path(boxes_csv) if boxes_csv else root / "boxes.csv"
    if split != "train" and (boxes_csv or csv_path.exists()):
        boxes = read_boxes_csv(csv_path, root)
        for item in items:  # an image the file misses has no box (not None: the split is annotated, by the file)
            item.boxes, item.source = boxes.get(item.path, (np.zeros((0, 4), np.float32), str(csv_path)))
    return root, items, classes
