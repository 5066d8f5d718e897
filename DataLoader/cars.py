"""Stanford Cars release: ``cars_train/``, ``cars_test/`` and the devkit files ``cars_meta.mat`` (``class_names``),
``cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (struct array ``annotations`` with bbox_x1,
bbox_y1, bbox_x2, bbox_y2, class 1-based, fname), under the root or its ``devkit/`` folder."""
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import Item, check_boxes, check_label
from .matlab import entry_number, entry_text, read_mat, struct_fields

CARS_LAYOUT = ("the Stanford Cars release layout: cars_train/, cars_test/ and cars_meta.mat, cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat (in devkit/ or the root)")
ANNOTATION_FILES = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
FIELDS = (*BOX_FIELDS, "class", "fname")


def find_devkit_file(root, name):
    """``root/devkit/<name>`` or ``root/<name>``, whichever exists."""
    for path in (root / "devkit" / name, root / name):
        if path.is_file():
            return path
    hint = " (the test labels come separately from the devkit)" if name == ANNOTATION_FILES["test"] else ""
    raise DataError(f"{root / 'devkit' / name}: file not found{hint} (expected {CARS_LAYOUT})")


def read_class_names(path):
    names = [entry_text(name, path, f"class_names entry {index}", "a class name")
             for index, name in enumerate(read_mat(path, ("class_names",), "variable class_names")["class_names"], 1)]
    if not names:
        raise DataError(f"{path}: class_names is empty (expected {CARS_LAYOUT})")
    return names


def load_cars(root, split):
    """(image root, items, class names) of the 'train' or 'test' split of a Stanford Cars release.

    One box per image; test items carry it in original pixels as the devkit gives it (1-based
    inclusive, so x2 may equal the image width).
    """
    if split not in ("train", "test"):
        raise DataError(f"{root}: Stanford Cars has no '{split}' split (train/test)")
    root = Path(root)
    classes = read_class_names(find_devkit_file(root, "cars_meta.mat"))
    path = find_devkit_file(root, ANNOTATION_FILES[split])
    expected = f"a struct array 'annotations' with fields {', '.join(FIELDS)}"
    annotations = read_mat(path, ("annotations",), expected)["annotations"]
    columns = struct_fields(annotations, FIELDS, path, "annotations")
    folder = f"cars_{split}"
    items = []
    for index in range(len(annotations)):
        where = f"annotations entry {index + 1}"
        fname = entry_text(columns["fname"][index], path, where, "fname")
        label = entry_number(columns["class"][index], path, where, "class (1-based)")
        if label != int(label):
            raise DataError(f"{path} {where}: expected an integer class, got {label:g}")
        check_label(int(label), range(1, len(classes) + 1), f"{path} {where}")
        if not (root / folder / fname).is_file():
            raise DataError(f"{path} {where}: image {root / folder / fname} not found")
        item = Item(f"{folder}/{fname}", int(label) - 1)
        if split == "test":
            box = [entry_number(columns[field][index], path, where, field) for field in BOX_FIELDS]
            item.source = f"{path} {where}"
            check_boxes(box, None, item.source)
            item.boxes = np.array([box], np.float32)
        items.append(item)
    if not items:
        raise DataError(f"{path}: no annotations (expected {CARS_LAYOUT})")
    return root, items, classes
