"""CUB-200-2011 official release: images/<class>/<file>, images.txt, image_class_labels.txt,
train_test_split.txt, bounding_boxes.txt (x y width height) and classes.txt."""
import os
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import (Item, bad_line, check_boxes, check_label, check_under_root, entries, lines_source, read_table,
                          rows_by_id)

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")
CUB_LAYOUT = "the CUB-200-2011 release layout"


def _read_boxes(path, known_ids):
    """{image id: ([x0, y0, x1, y1], ...), line numbers}; x1 = x + width, y1 = y + height."""
    boxes = {}
    for lineno, (image_id, x, y, width, height) in read_table(
            path, (int, float, float, float, float), "'image_id x y width height'"):
        if image_id not in known_ids:
            raise DataError(f"{path} line {lineno}: image id {image_id} is not listed in images.txt")
        box = [x, y, x + width, y + height]
        check_boxes(box, None, f"{path} line {lineno}")
        entry = boxes.setdefault(image_id, ([], []))
        entry[0].append(box)
        entry[1].append(lineno)
    return boxes


def read_classes(path):
    """Class names of classes.txt (ids must run 1..N in order)."""
    names, lines = [], {}
    for lineno, (class_id, name) in read_table(path, (int, str), "'class_id class_name'"):
        if class_id != len(names) + 1:
            raise DataError(f"{path} line {lineno}: expected class id {len(names) + 1} (ids 1..N in order), "
                            f"got {class_id}")
        if name in lines:  # the per-class table and metrics.json, keyed by name, would keep one of the two
            raise DataError(f"{path} line {lineno}: class name {name!r} again (first on line {lines[name]})")
        names.append(name)
        lines[name] = lineno
    if not names:
        raise DataError(f"{path}: no classes listed")
    return names


def load_cub(root, split):
    """(image root, items, class names) of the 'train' or 'test' split of a CUB release at ``root``; items
    carry their boxes (every test image must have one, a train image may have none)."""
    if split not in ("train", "test"):
        raise DataError(f"{root}: CUB-200-2011 has no '{split}' split (train/test); "
                        "pass --metadata-root for the wsolevaluation val split")
    root = Path(root)
    classes = read_classes(root / "classes.txt")
    images_path = root / "images.txt"
    images = rows_by_id(images_path, (int, str), "'image_id relative_path'")
    labels_path, split_path, boxes_path = (root / name for name in CUB_FILES[1:4])
    labels = rows_by_id(labels_path, (int, int), "'image_id class_id'", images, "images.txt")
    is_train = rows_by_id(split_path, (int, int), "'image_id is_training_image'", images, "images.txt")
    boxes = _read_boxes(boxes_path, images)

    items = []
    for image_id, [(lineno, (relpath,))] in images.items():
        [(label_line, (label,))] = entries(labels, image_id, labels_path, "images.txt")
        check_label(label, range(1, len(classes) + 1), f"{labels_path} line {label_line}")
        [(flag_line, (flag,))] = entries(is_train, image_id, split_path, "images.txt")
        if flag not in (0, 1):
            raise bad_line(split_path, flag_line, "'image_id is_training_image' with is_training_image 0 or 1",
                           f"{image_id} {flag}")
        if flag != (split == "train"):
            continue
        check_under_root(relpath, root / "images", f"{images_path} line {lineno}")
        if not os.path.exists(root / "images" / relpath):
            raise DataError(f"{images_path} line {lineno}: image {root / 'images' / relpath} not found")
        item = Item(relpath, label - 1)
        if split == "test" or image_id in boxes:
            image_boxes, box_lines = entries(boxes, image_id, boxes_path, "images.txt")
            item.boxes = np.array(image_boxes, np.float32)
            item.source = lines_source(boxes_path, box_lines)
        items.append(item)
    return root / "images", items, classes
