"""Annotation records and strict parsing helpers shared by the dataset formats."""
import csv
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from utils.errors import DataError

# Boxes may overshoot the image by this many pixels (CUB boxes are floats, VOC boxes 1-based).
BOX_TOLERANCE = 1.0


@dataclass(slots=True)
class Item:
    """One image: path relative to the image root, 0-based label, and (eval splits) annotations."""

    path: str
    label: int
    image_id: str = None
    boxes: np.ndarray = None  # (K, 4) float32 x0, y0, x1, y1 in original pixels
    size: tuple = None  # (W, H) when the annotation states it
    source: str = ""  # where the boxes come from, for error messages
    size_source: str = None  # where the size is stated, when elsewhere than the boxes (wsol's image_sizes.txt)
    mask_paths: list = None  # absolute paths of the foreground masks (mask datasets)
    ignore_path: str = None

    def __post_init__(self):
        if self.image_id is None:
            self.image_id = self.path


class CompactItems(Sequence):
    """The paths and labels of a training split's items (training reads nothing else), kept in two buffers
    instead of one Python object per image. Loader workers are forked from the main process and share its
    memory until they write to it; reading a list of Items writes reference counts, so every worker came to
    hold its own copy (about 270 MB per worker for ImageNet's 1.28 M images). Indexing gives an Item made on
    the fly, without annotations."""

    def __init__(self, items):
        paths = [item.path.encode("utf-8", "surrogateescape") for item in items]  # file names need not be UTF-8
        self._paths = b"".join(paths)
        self._ends = np.cumsum([len(path) for path in paths], dtype=np.int64)
        self._labels = np.fromiter((item.label for item in items), np.int64, len(paths))

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        given = index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item {given} of {len(self)}")
        start = int(self._ends[index - 1]) if index else 0
        path = self._paths[start:int(self._ends[index])].decode("utf-8", "surrogateescape")
        return Item(path, int(self._labels[index]))


def bad_line(path, lineno, expected, line):
    """The DataError for a malformed annotation line."""
    return DataError(f"{path} line {lineno}: expected {expected}, got '{line.strip()[:120]}'")


def lines_source(path, linenos):
    """'<path> line 3' or '<path> lines 3, 4': where an item's boxes come from."""
    plural = "s" if len(linenos) > 1 else ""
    return f"{path} line{plural} {', '.join(map(str, linenos))}"


def read_lines(path, expected):
    """Lines of a text annotation file; DataError naming it when missing or unreadable."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Excel, Notepad) is not part of the first line
            lines = f.read().split("\n")  # \r\n, \r read as \n; not splitlines(): U+0085, U+2028 ... may be in a name
        return lines[:-1] if lines[-1] == "" else lines
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (expected {expected})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err.__class__.__name__}; expected {expected})") from None


def read_table(path, types, expected, sep=None, header=None, quoted=False):
    """Rows ``(line number, converted fields)`` of a file with one record per non-blank line.

    ``types`` converts each column (int, float, str); the last column takes the rest of the line (with
    ``quoted``: a CSV line, "double-quoted" fields may hold commas, as spreadsheets and pandas write them).
    A line with fewer columns or a value that does not convert raises DataError naming the file,
    the line and ``expected``. A first line whose first field is ``header`` is skipped.
    """
    rows = []
    for lineno, line in enumerate(read_lines(path, expected), 1):
        text = line.strip()
        if not text:
            continue
        fields = next(csv.reader([text], skipinitialspace=True)) if quoted else text.split(sep, len(types) - 1)
        if not rows and header is not None and fields[0].strip() == header:
            continue
        if len(fields) != len(types):
            raise bad_line(path, lineno, expected, line)
        try:  # one pass over the fields: ImageNet's files have 1.28 M lines
            rows.append((lineno, [convert(field.strip()) for convert, field in zip(types, fields)]))
        except ValueError:
            raise bad_line(path, lineno, expected, line) from None
    return rows


def rows_by_id(path, types, expected, known_ids=None, listed_in="", sep=None, unique=True):
    """{image id: [(line number, other fields), ...]} of a file keyed by its first column.

    An id outside ``known_ids`` (when given; ``listed_in`` names their file) or, with ``unique``, a
    repeated id raises DataError naming the file and line.
    """
    table = {}
    for lineno, (image_id, *rest) in read_table(path, types, expected, sep=sep):
        if known_ids is not None and image_id not in known_ids:
            raise DataError(f"{path} line {lineno}: image {image_id!r} is not listed in {listed_in}")
        if unique and image_id in table:
            raise DataError(f"{path} line {lineno}: duplicate entry for image {image_id!r}")
        table.setdefault(image_id, []).append((lineno, rest))
    return table


def entries(table, image_id, path, listed_in):
    """The rows of ``image_id`` in a :func:`rows_by_id` table; DataError when the file has none."""
    if image_id not in table:
        raise DataError(f"{path}: no entry for image {image_id!r} (listed in {listed_in})")
    return table[image_id]


def check_under_root(relpath, root, where):
    """DataError unless the image path ``relpath`` (an annotation file's, relative to ``root``) stays under
    ``root``: an absolute path or one whose '..' climb out of it would be read from elsewhere, and its overlay
    and saved map (named after the image id) written outside the output folders."""
    if ".." not in relpath and not os.path.isabs(relpath):
        return  # nothing to climb out with: normpath (below) would take a second for ImageNet's 1.28 M paths
    normal = os.path.normpath(relpath)
    if os.path.isabs(relpath) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise DataError(f"{where}: image {relpath!r} is not under {root} (expected a path relative to it, without "
                        "'..' leading out of it)")


def check_boxes(boxes, size, where, size_from=None):
    """Raise DataError unless every box has x1 > x0, y1 > y0 and lies inside the (W, H) image.

    ``size`` may be None (not known yet): then only the lower bounds are checked. ``size_from`` names the
    line of another file that states ``size`` (wsolevaluation's image_sizes.txt): a box outside it then names
    that line as the likely culprit, since a box beyond a wrongly stated size looks like a wrong box.
    """
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        text = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise DataError(f"{where}: box {text} has a coordinate that is no finite number")
        if not (x1 > x0 and y1 > y0):
            raise DataError(f"{where}: box {text} has x1 <= x0 or y1 <= y0")
        if min(x0, y0) < -BOX_TOLERANCE:
            raise DataError(f"{where}: box {text} has a negative coordinate (expected pixels from the top-left "
                            "corner)")
        if size is not None and (x1 > size[0] + BOX_TOLERANCE or y1 > size[1] + BOX_TOLERANCE):
            stated = (f" that {size_from} states (likely a wrong size there: compare it with the image file)"
                      if size_from else "")
            raise DataError(f"{where}: box {text} lies outside the {size[0]}x{size[1]} image{stated}")


def check_label(label, valid, where):
    """Raise DataError unless ``label`` is in the range ``valid``."""
    if label not in valid:
        raise DataError(f"{where}: label {label} outside the class range {valid.start}..{valid.stop - 1}")
