"""FGVC-Aircraft 2013b release at the variant level: ``data/images/<id>.jpg``, ``data/variants.txt`` (class
order), ``data/images_variant_{trainval,test}.txt`` (``<id> <variant>``) and ``data/images_box.txt``
(``<id> xmin ymin xmax ymax``, one box per image).

Boxes are kept as written, as the official SAT code does. The release README calls them 1-based, but the
official SAT box list (the same numbers with each image's size) has xmin = 0 in 122 boxes and xmax = width
in none, so they already lie on the inclusive pixel grid of the other formats; a shift would move them off it.

The release README asks to cut the 20-pixel copyright banner off the bottom of each image; the official
SAT code reads the images whole, and so does this reader (the reported numbers assume it).
"""
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import Item, check_boxes, check_under_root, entries, lines_source, read_lines, read_table, rows_by_id

AIRCRAFT_LAYOUT = ("the FGVC-Aircraft 2013b release layout: data/images/, data/variants.txt, "
                   "data/images_variant_trainval.txt, data/images_variant_test.txt, data/images_box.txt")
# The official SAT code trains on train + val (trainval) and tests on test.
SPLIT_FILES = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}


def data_folder(root):
    """The release's ``data/`` folder: ``root/data`` or ``root`` itself."""
    root = Path(root)
    return root / "data" if (root / "data").is_dir() else root


def read_variants(path):
    names = [line.strip() for line in read_lines(path, "one variant name per line") if line.strip()]
    if not names:
        raise DataError(f"{path}: no variants listed (expected one variant name per line)")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise DataError(f"{path}: variant {duplicate!r} is listed twice")
    return names


def load_aircraft(root, split):
    """(image root, items, variant names) of the 'train' (= trainval) or 'test' split of FGVC-Aircraft; items
    carry their box (images_box.txt is required for the test split only)."""
    if split not in SPLIT_FILES:
        raise DataError(f"{root}: FGVC-Aircraft has no '{split}' split here (train = trainval, test)")
    data = data_folder(root)
    classes = read_variants(data / "variants.txt")
    index = {name: label for label, name in enumerate(classes)}
    split_path = data / SPLIT_FILES[split]
    rows = read_table(split_path, (str, str), "'image_id variant'")
    boxes_path, boxes = data / "images_box.txt", {}
    if split == "test" or boxes_path.exists():
        boxes = rows_by_id(boxes_path, (str, float, float, float, float), "'image_id xmin ymin xmax ymax'")
    items, listed = [], {}
    for lineno, (image_id, variant) in rows:
        where = f"{split_path} line {lineno}"
        if listed.setdefault(image_id, lineno) != lineno:
            raise DataError(f"{where}: image {image_id!r} is listed twice (line {listed[image_id]})")
        if variant not in index:
            raise DataError(f"{where}: variant {variant!r} is not listed in variants.txt (unknown class)")
        path = f"{image_id}.jpg"
        check_under_root(path, data / "images", where)
        if not (data / "images" / path).is_file():
            raise DataError(f"{where}: image {data / 'images' / path} not found")
        item = Item(path, index[variant])
        if split == "test" or image_id in boxes:
            [(box_line, box)] = entries(boxes, image_id, boxes_path, SPLIT_FILES[split])
            item.source = lines_source(boxes_path, [box_line])
            check_boxes(box, None, item.source)
            item.boxes = np.array([box], np.float32)
        items.append(item)
    if not items:
        raise DataError(f"{split_path}: no images listed (expected 'image_id variant' lines)")
    return data / "images", items, classes
