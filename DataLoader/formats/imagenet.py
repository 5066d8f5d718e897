"""ImageNet ILSVRC2012: ``train/<wnid>/`` folders (class index = sorted wnids), ``val/`` flat or in
``<wnid>/`` folders, and val labels + boxes from per-image PASCAL-VOC XML files, LOC_val_solution.csv
or the official SAT ``val_gt.txt`` list."""
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from utils.errors import DataError

from .annotations import Item, bad_line, check_boxes, lines_source, read_lines
from .folder import (check_class_has_images, class_folders, has_file, image_files, is_image_file, list_dir,
                     scan_class_folders)

_logger = logging.getLogger("sat")

# Looked for under the data root, in this order, when no explicit val-boxes path is given.
VAL_BOX_CANDIDATES = ("val_boxes", "bbox_val", "val_bbox", "bbox/val", "Annotations/CLS-LOC/val", "val",
                      "LOC_val_solution.csv", "val_gt.txt")
# Kaggle's download (ILSVRC/Data/CLS-LOC/{train,val}/ is the image root): its boxes, relative to that root.
WNID = re.compile(r"n\d{8}")  # an ImageNet class: its WordNet id, the name of its train/ folder
KAGGLE_ROOT = ("Data", "CLS-LOC")
KAGGLE_BOX_CANDIDATES = ("../../Annotations/CLS-LOC/val", "../../../LOC_val_solution.csv")
VAL_BOX_KINDS = "a folder of PASCAL-VOC XML files, LOC_val_solution.csv or val_gt.txt"
CSV_EXPECTED = "'ImageId,wnid xmin ymin xmax ymax [wnid xmin ymin xmax ymax ...]'"
VAL_GT_EXPECTED = "'<wnid>\\<file> W H ; x0 y0 x1 y1 [x0 y0 x1 y1 ...]'"


class ValRecord:
    """Annotation of one val image: file stem, wnid, boxes, (W, H) if stated, source."""

    __slots__ = ("stem", "wnid", "boxes", "size", "source")

    def __init__(self, stem, wnid, boxes, size, source):
        self.stem, self.wnid, self.size, self.source = stem, wnid, size, source
        self.boxes = np.array(boxes, np.float32).reshape(-1, 4)
        check_boxes(self.boxes, size, source)


def _has_xml(directory):
    """Whether ``directory`` holds an XML file (stops at the first: val/ holds 50,000 images)."""
    return has_file(directory, lambda name: name.lower().endswith(".xml"))


def find_val_boxes(root, explicit=None):
    """The val annotation source: ``explicit`` if given, else the first candidate that exists."""
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise DataError(f"{path}: val boxes not found (expected {VAL_BOX_KINDS})")
        return path
    kaggle = Path(root).resolve().parts[-2:] == KAGGLE_ROOT
    for candidate in VAL_BOX_CANDIDATES + (KAGGLE_BOX_CANDIDATES if kaggle else ()):
        path = Path(os.path.normpath(Path(root) / candidate))  # (the Kaggle candidates climb out of root)
        if path.is_file() or (path.is_dir() and _has_xml(path)):
            return path
    raise DataError(f"{root}: no ImageNet val boxes found (looked for {', '.join(VAL_BOX_CANDIDATES)}); "
                    f"pass --val-boxes PATH ({VAL_BOX_KINDS})")


def _xml_number(node, tag, path):
    """The number in element ``tag`` (a path such as 'size/width') of ``node``; DataError naming it otherwise."""
    text = node.findtext(tag)
    if text is None:
        raise DataError(f"{path}: no <{tag}> (expected a number there)")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}: expected a number in <{tag}>, got {text!r}") from None


def read_voc_xml(path):
    """ValRecord of one PASCAL-VOC XML file (size, objects with name and bndbox)."""
    try:
        annotation = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path} line {err.position[0]}: malformed XML ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    size = tuple(int(_xml_number(annotation, f"size/{tag}", path)) for tag in ("width", "height"))
    objects = annotation.findall("object")
    if not objects:
        raise DataError(f"{path}: no <object> (expected <object><name>wnid</name><bndbox>...)")
    boxes = [[_xml_number(obj, f"bndbox/{tag}", path) for tag in ("xmin", "ymin", "xmax", "ymax")]
             for obj in objects]
    return ValRecord(path.stem, (objects[0].findtext("name") or "").strip(), boxes, size, str(path))


def read_loc_csv(path):
    """ValRecords of LOC_val_solution.csv (``ImageId,PredictionString``)."""
    records = []
    for lineno, line in enumerate(read_lines(path, CSV_EXPECTED), 1):
        if not line.strip() or (lineno == 1 and line.startswith("ImageId")):
            continue
        stem, _, prediction = line.partition(",")
        tokens = prediction.split()
        if not stem.strip() or not tokens or len(tokens) % 5:
            raise bad_line(path, lineno, CSV_EXPECTED, line)
        try:
            boxes = [[float(v) for v in tokens[i + 1:i + 5]] for i in range(0, len(tokens), 5)]
        except ValueError:
            raise bad_line(path, lineno, CSV_EXPECTED, line) from None
        records.append(ValRecord(stem.strip(), tokens[0], boxes, None, lines_source(path, [lineno])))
    return records


def read_val_gt(path):
    """ValRecords of the official SAT list: ``<wnid>\\<file> W H ; x0 y0 x1 y1 ...`` per line."""
    records = []
    for lineno, line in enumerate(read_lines(path, VAL_GT_EXPECTED), 1):
        if not line.strip():
            continue
        head, _, tail = line.partition(";")
        fields, numbers = head.split(), tail.split()
        parts = [part for part in re.split(r"[\\/]+", fields[0]) if part] if fields else []
        if len(fields) != 3 or len(parts) < 2 or not numbers or len(numbers) % 4:
            raise bad_line(path, lineno, VAL_GT_EXPECTED, line)
        try:
            size = (int(fields[1]), int(fields[2]))
            boxes = [float(v) for v in numbers]
        except ValueError:
            raise bad_line(path, lineno, VAL_GT_EXPECTED, line) from None
        records.append(ValRecord(Path(parts[-1]).stem, parts[-2], boxes, size, lines_source(path, [lineno])))
    return records


def read_val_records(source):
    """ValRecords from an XML folder, a .csv file or a val_gt.txt-style list."""
    if source.is_dir():
        return [read_voc_xml(path) for path in sorted(source.iterdir()) if path.suffix.lower() == ".xml"]
    records = read_loc_csv(source) if source.suffix.lower() == ".csv" else read_val_gt(source)
    first = {}
    for record in records:  # an image listed twice would be evaluated twice
        if record.stem in first:
            raise DataError(f"{record.source}: image {record.stem} again (first at {first[record.stem]})")
        first[record.stem] = record.source
    return records


def _val_images(val_dir):
    """{file stem: path relative to the data root} of val/, flat or sorted into <wnid>/ folders."""
    if not val_dir.is_dir():
        raise DataError(f"{val_dir}: not found (expected the ILSVRC2012 val images, flat or in <wnid>/ folders)")
    entries = list_dir(val_dir)
    found = {Path(name).stem: f"val/{name}" for name, is_dir in entries if not is_dir and is_image_file(name)}
    for wnid in (name for name, is_dir in entries if is_dir):
        found.update((Path(name).stem, f"val/{wnid}/{name}") for name in image_files(val_dir / wnid))
    return found


def train_classes(train_dir, val_wnids=()):
    """Sorted wnids of ``train/``; DataError for a folder without images (a class of its own, shifting the labels
    of the wnids sorted after it) unless the val boxes name its wnid (``val_wnids``: a class, its train images
    missing, whose label is right)."""
    classes = class_folders(train_dir)
    for wnid in classes:
        if wnid not in val_wnids:
            check_class_has_images(train_dir / wnid)
    return classes


def load_imagenet(root, split, val_boxes=None):
    """(image root, items, class names) of 'train' or 'test' (= the ILSVRC2012 val set)."""
    if split not in ("train", "test"):
        raise DataError(f"{root}: ILSVRC2012 has no '{split}' split of its own (its validation set is the 'test' "
                        "split, which the ImageNet scripts evaluate); a held-out 'val' split (--val-split) needs "
                        "wsolevaluation metadata: --metadata-root DIR with val/image_ids.txt ...")
    root = Path(root)
    train_dir = root / "train"
    if split == "train":
        if not train_dir.is_dir():
            raise DataError(f"{train_dir}: not found (expected train/<wnid>/ image folders)")
        classes = train_classes(train_dir)
        return root, scan_class_folders(root, "train", classes), classes

    box_source = find_val_boxes(root, val_boxes)
    records = sorted(read_val_records(box_source), key=lambda r: r.stem)
    if not records:
        raise DataError(f"{root}: the val boxes list no images (expected {VAL_BOX_KINDS})")
    _logger.info("val boxes: %s (%d images)%s", box_source, len(records),
                 "" if val_boxes is not None else " (the first found; --val-boxes PATH names another)")
    val_wnids = {record.wnid for record in records}
    classes = train_classes(train_dir, val_wnids) if train_dir.is_dir() else sorted(val_wnids)
    index = {wnid: label for label, wnid in enumerate(classes)}
    images = _val_images(root / "val")
    items = []
    for record in records:
        if record.wnid not in index:
            raise DataError(f"{record.source}: label {record.wnid!r} is not one of the {len(classes)} "
                            f"classes of {train_dir} (label outside the class range)")
        if record.stem not in images:
            raise DataError(f"{record.source}: image {root / 'val' / record.stem}.* not found "
                            f"(expected it in val/ or val/<wnid>/)")
        path = images[record.stem]
        items.append(Item(path, index[record.wnid], image_id="val/" + path.rsplit("/", 1)[-1],
                          boxes=record.boxes, size=record.size, source=record.source))
    if len(images) > len(items):  # the split is the images the box list names
        _logger.warning("%s holds %d images, the val boxes (%s) name %d: the other %d are not evaluated",
                        root / "val", len(images), box_source, len(items),
                        len(images) - len(items))
    return root, items, classes
