"""Stanford Cars release, either layout the dataset was distributed in:

- ``cars_train/``, ``cars_test/`` and the devkit files ``cars_meta.mat`` (``class_names``),
  ``cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (struct array ``annotations`` with
  bbox_x1, bbox_y1, bbox_x2, bbox_y2, class 1-based, fname), under the root or its ``devkit/`` folder; also as
  the Kaggle mirror has it (the devkit in ``car_devkit/devkit/``, the images one folder deeper in
  ``cars_train/cars_train/``, the test labels as ``cars_test_annos_withlabels (1).mat``);
- ``car_ims/`` with ``cars_annos.mat`` (``annotations`` with relative_im_path, the bbox fields, class and
  test 0/1; ``class_names``): the same images, split and boxes, numbered as the official SAT lists are.
"""
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import Item, check_boxes, check_label, check_under_root
from .matlab import entry_integer, entry_number, entry_text, read_mat, struct_fields

CARS_LAYOUT = ("the Stanford Cars release layout: cars_train/, cars_test/ and cars_meta.mat, cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat (in devkit/ or the root), or car_ims/ and cars_annos.mat")
SPLIT_FILES = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
ALL_IMAGES_FILE = "cars_annos.mat"
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


DEVKIT_FOLDERS = ("devkit", ".", "car_devkit/devkit")
# The test labels' file as Kaggle's mirror names it (a browser's second download of the same name).
KAGGLE_NAMES = {SPLIT_FILES["test"]: "cars_test_annos_withlabels (1).mat"}


def find_devkit_file(root, name):
    """``<name>`` in ``root/devkit/``, ``root`` or ``root/car_devkit/devkit/``, the first that exists (None if none)."""
    names = (name, KAGGLE_NAMES[name]) if name in KAGGLE_NAMES else (name,)
    return next((root / folder / file for file in names for folder in DEVKIT_FOLDERS
                 if (root / folder / file).is_file()), None)


def image_folder(root, split):
    """``cars_<split>``, or ``cars_<split>/cars_<split>`` where the images are one folder deeper (Kaggle)."""
    inner = f"cars_{split}/cars_{split}"
    return inner if (root / inner).is_dir() else f"cars_{split}"


def require_devkit_file(root, name):
    path = find_devkit_file(root, name)
    if path is None:
        hint = " (the test labels come separately from the devkit)" if name == SPLIT_FILES["test"] else ""
        raise DataError(f"{root / 'devkit' / name}: file not found{hint} (expected {CARS_LAYOUT})")
    return path


def read_class_names(path):
    names = read_mat(path, ("class_names",), "variable class_names")["class_names"]
    names = [entry_text(name, path, f"class_names entry {index}", "a class name")
             for index, name in enumerate(names, 1)]
    if not names:
        raise DataError(f"{path}: class_names is empty (expected {CARS_LAYOUT})")
    return names


def read_annotations(path, name_field, extra=()):
    """The columns of the ``annotations`` struct array of ``path``."""
    fields = (*BOX_FIELDS, "class", name_field, *extra)
    expected = f"a struct array 'annotations' with fields {', '.join(fields)}"
    annotations = read_mat(path, ("annotations",), expected)["annotations"]
    return struct_fields(annotations, fields, path, "annotations"), len(annotations)


def entry(index):
    return f"annotations entry {index + 1}"


def load_cars(root, split):
    """(image root, items, class names) of the 'train' or 'test' split of a Stanford Cars release.

    One box per image; items carry it in original pixels as the annotations give it (1-based
    inclusive, so x2 may equal the image width). The cars_train/ + devkit layout is used when its
    folder for ``split`` exists, else car_ims/ + cars_annos.mat.
    """
    if split not in ("train", "test"):
        raise DataError(f"{root}: Stanford Cars has no '{split}' split (train/test)")
    root = Path(root)
    all_images = find_devkit_file(root, ALL_IMAGES_FILE)
    rows = []  # (entry index, image path relative to the root)
    if (root / f"cars_{split}").is_dir() or all_images is None:
        classes = read_class_names(require_devkit_file(root, "cars_meta.mat"))
        path = require_devkit_file(root, SPLIT_FILES[split])
        columns, count = read_annotations(path, "fname")
        folder = image_folder(root, split)
        for index in range(count):
            fname = entry_text(columns["fname"][index], path, entry(index), "fname")
            rows.append((index, f"{folder}/{fname}"))
    else:
        path = all_images
        classes = read_class_names(path)
        columns, count = read_annotations(path, "relative_im_path", ("test",))
        for index in range(count):
            test = entry_integer(columns["test"][index], path, entry(index), "test (0 or 1)")
            if test not in (0, 1):
                raise DataError(f"{path} {entry(index)}: expected test 0 or 1, got {test}")
            if test == (split == "test"):
                rows.append((index, entry_text(columns["relative_im_path"][index], path, entry(index),
                                               "relative_im_path")))
    items = []
    for index, relpath in rows:
        where = f"{path} {entry(index)}"
        label = entry_integer(columns["class"][index], path, entry(index), "class (1-based)")
        check_label(label, range(1, len(classes) + 1), where)
        check_under_root(relpath, root, where)
        if not (root / relpath).is_file():
            raise DataError(f"{where}: image {root / relpath} not found")
        box = [entry_number(columns[field][index], path, entry(index), field) for field in BOX_FIELDS]
        check_boxes(box, None, where)
        items.append(Item(relpath, label - 1, boxes=np.array([box], np.float32), source=where))
    if not items:
        raise DataError(f"{path}: no {split} images annotated (expected {CARS_LAYOUT})")
    return root, items, classes
