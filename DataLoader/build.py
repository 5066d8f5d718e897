"""Dataset factory and the quick data-root check the command-line scripts run first."""
import contextlib
import gc
import itertools
import os
import re
from pathlib import Path

from utils.errors import DataError

from .dataset import WSOLDataset
from .formats.aircraft import AIRCRAFT_LAYOUT, load_aircraft
from .formats.cars import CARS_LAYOUT, load_cars
from .formats.cub import CUB_FILES, CUB_LAYOUT, load_cub
from .formats.dogs import DOGS_LAYOUT, load_dogs
from .formats.folder import FOLDER_LAYOUT, load_folder
from .formats.imagenet import WNID, load_imagenet
from .formats.wsol import load_wsol
from .subsets import few_shot
from .transforms import test_transform, train_transform

FORMATS = ("cub", "imagenet", "wsol", "folder", "dogs", "cars", "aircraft")
SPLITS = ("train", "val", "test")
LAYOUTS = {
    "cub": CUB_LAYOUT,
    "imagenet": "the ILSVRC2012 layout: train/<wnid>/ and/or val/",
    "wsol": "the image root that wsolevaluation image ids are relative to",
    "folder": f"the folder layout: {FOLDER_LAYOUT}",
    "dogs": DOGS_LAYOUT,
    "cars": CARS_LAYOUT,
    "aircraft": AIRCRAFT_LAYOUT,
}
# Entries (folders end in /) of which each (EACH_REQUIRED) or at least one (ANY_REQUIRED) must exist under the
# root. Aircraft: the release root or its data/ folder, told by variants.txt (its images/ a CUB root has too).
EACH_REQUIRED = {"cub": ("images/", *CUB_FILES), "dogs": ("Images/", "Annotation/")}
ANY_REQUIRED = {"imagenet": ("train/", "val/"), "folder": ("train/", "val/", "test/"),
                "cars": ("cars_train/", "cars_test/", "car_ims/"), "aircraft": ("data/variants.txt", "variants.txt")}
LOADERS = {"cub": load_cub, "dogs": load_dogs, "cars": load_cars, "aircraft": load_aircraft}


def check_data_root(fmt, root):
    """Raise a one-line DataError when ``root`` is missing or lacks the files of format ``fmt``, with a hint when
    its entries fit another format or one of its subfolders fits ``fmt`` (a release extracted into ``root``)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if root is None or not Path(root).is_dir():
        found = "a file, not a folder" if root is not None and Path(root).exists() else "not found"
        raise DataError(f"data root {root}: {found} (expected {LAYOUTS[fmt]})")
    problem = _layout_problem(fmt, root)
    if problem:
        raise DataError(f"data root {root}: {problem} (expected {LAYOUTS[fmt]}){_root_hint(fmt, root)}")


def _root_hint(fmt, root):
    """What to try for a ``root`` that lacks format ``fmt``'s entries: the formats its entries fit, else the
    one subfolder that fits ``fmt``, else the parent or grandparent that does (a folder inside the release, such
    as Images/ or devkit/, given as the root); '' when none. An ILSVRC2012 root (which the folder format's entries fit
    too) is sent to the ImageNet scripts."""
    if fmt != "imagenet" and _looks_like_imagenet(root):
        return "; it looks like ILSVRC2012 (wnid folders / ILSVRC2012_val_ files): train_ImageNet.py and " \
               "evaluator_ImageNet.py read it (the tools, such as tools/check_dataset.py: --data-format imagenet)"
    others = [other for other in LOOKS_LIKE if other != fmt and not _layout_problem(other, root)]
    if others:
        # The ImageNet scripts read the ILSVRC2012 layout whatever --data-format says, so the flag is named with
        # the scripts that take it (train.py also takes --data-format imagenet: the wording holds for both).
        scripts = " (a flag of train.py / evaluator.py; the ImageNet scripts read only the ILSVRC2012 layout)"
        return f"; its entries fit --data-format {' or '.join(others)}{scripts if fmt == 'imagenet' else ''}"
    inner = _subfolder_fitting(fmt, root)
    if inner is None and fmt == "imagenet":  # Kaggle's download: the images two or three levels down
        inner = next((str(Path(root) / sub) for sub in KAGGLE_IMAGE_ROOTS
                      if not _layout_problem(fmt, Path(root) / sub)), None)
    if inner is None:
        inner = next((str(above) for above in Path(root).resolve().parents[:2] if not _layout_problem(fmt, above)),
                     None)
    return f"; did you mean --data-root {inner}?" if inner else ""


KAGGLE_IMAGE_ROOTS = ("ILSVRC/Data/CLS-LOC", "Data/CLS-LOC")


# Formats whose entries tell a root apart, for the hint of a wrong --data-format (not: the wsol image root, which
# has no fixed entries).
LOOKS_LIKE = ("cub", "folder", "dogs", "cars", "aircraft")
# A root with more entries than this is not searched for a subfolder that fits (the hint must stay cheap).
SUBFOLDER_SEARCH_LIMIT = 100


IMAGENET_NAME = re.compile(rf"{WNID.pattern}|ILSVRC2012_val_\d{{8}}\.JPEG")


def _looks_like_imagenet(root):
    """Whether the first entries of ``root``'s train/ or val/ are ImageNet's (wnid folders, val file names)."""
    for split in ("train", "val"):
        try:
            with os.scandir(Path(root) / split) as scan:
                if any(IMAGENET_NAME.fullmatch(entry.name) for entry in itertools.islice(scan, 20)):
                    return True
        except OSError:  # absent or unreadable: no hint from it
            continue
    return False


def _subfolder_fitting(fmt, root):
    """The one immediate subfolder of ``root`` that has format ``fmt``'s entries (e.g. the CUB_200_2011/ of a
    folder the release was extracted into), or None: none, several, or ``root`` too large to look."""
    try:
        with os.scandir(root) as scan:
            entries = list(itertools.islice(scan, SUBFOLDER_SEARCH_LIMIT + 1))
        if len(entries) > SUBFOLDER_SEARCH_LIMIT:
            return None
        fitting = [entry.path for entry in entries if entry.is_dir() and not _layout_problem(fmt, entry.path)]
    except OSError:  # an unreadable root or subfolder: no hint
        return None
    return fitting[0] if len(fitting) == 1 else None


def _layout_problem(fmt, root):
    """What ``root`` lacks of format ``fmt``'s entries, or None."""
    missing = [name for name in EACH_REQUIRED.get(fmt, ()) if not (Path(root) / name).exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    names = ANY_REQUIRED.get(fmt, ())
    if names and not any((Path(root) / name).exists() for name in names):
        return f"has none of {', '.join(names)}"
    return None


def check_class_names_once(classes, fmt, root):
    """DataError naming a class name the data gives two classes (the per-class results and the matching of a
    checkpoint's classes are by name; CUB's classes.txt is refused with its line where it is read)."""
    first = {}
    for index, name in enumerate(classes):
        if first.setdefault(name, index) != index:
            raise DataError(f"data root {root}: the {fmt} data names classes {first[name]} and {index} (counted from "
                            f"0) alike, {name!r}: class names must differ (results per class are keyed by name)")


def check_listed_once(items, image_root, split):
    """DataError naming the first image that a split lists twice (under two ids, as a repeated id is said where
    the annotation file is read): it would be trained on, or scored, twice."""
    seen = {}
    for item in items:  # the path as the file system takes it: a/./b.jpg and a/b.jpg are one image
        first = seen.setdefault(os.path.normpath(item.path), item)
        if first is not item:
            where = f" ({first.source}; {item.source})" if first.source and item.source else \
                f" (as {first.image_id!r} and {item.image_id!r})" if first.image_id != item.image_id else ""
            raise DataError(f"image {Path(image_root) / item.path} is listed twice in the {split} split{where}: it "
                            "would count twice")


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off inside (and on again after, if it was on): the millions of lists,
    tuples and Items that listing ImageNet's 1.28 M images makes (none in a reference cycle) set it off again and
    again, each time going over the objects made so far: 40 % of the wsol format's listing time."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _read_split(fmt, root, split, metadata_root, val_boxes):
    """(image root, items, class names) of ``split`` as :func:`build_dataset`'s format reads it."""
    if fmt == "wsol" or metadata_root is not None:
        if metadata_root is None:
            raise DataError(f"data root {root}: the wsol format needs --metadata-root (wsolevaluation metadata)")
        cub_images = Path(root) / "images"
        image_root = cub_images if fmt == "cub" and cub_images.is_dir() else root
        return load_wsol(image_root, metadata_root, split)
    if fmt in LOADERS:
        return LOADERS[fmt](root, split)
    if fmt == "imagenet":
        return load_imagenet(root, split, val_boxes)
    if fmt == "folder":
        return load_folder(root, split, val_boxes)
    raise DataError(f"dataset format {fmt!r} has no reader in DataLoader/build.py (LOADERS)")


def build_dataset(fmt, root, split, transform=None, *, images_per_class=None, seed=0, metadata_root=None,
                  val_boxes=None, strict=False):
    """A WSOLDataset of ``split`` ('train', 'val' or 'test'; ImageNet's 'test' is its val set) of the data at
    ``root`` in format ``fmt`` (FORMATS, each as distributed; 'wsol' or any format with ``metadata_root``:
    wsolevaluation metadata). ``val_boxes``: ImageNet's box source or the folder format's CSV; ``transform``:
    the official one by default; ``images_per_class``: a seeded few-shot subset; ``strict``: unreadable
    training images are errors."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    check_data_root("wsol" if metadata_root is not None and fmt in FORMATS else fmt, root)
    if val_boxes is not None and (fmt not in ("imagenet", "folder") or metadata_root is not None):
        raise DataError(f"--val-boxes {val_boxes}: only the imagenet and folder formats read it (here: "
                        f"{'wsolevaluation metadata, whose boxes are in --metadata-root' if metadata_root else fmt})")
    with collector_paused():
        image_root, items, classes = _read_split(fmt, root, split, metadata_root, val_boxes)
    check_listed_once(items, image_root, split)
    check_class_names_once(classes, fmt, root)
    if images_per_class is not None:
        items = few_shot(items, images_per_class, seed)
    evaluation = split != "train"
    if transform is None:
        transform = test_transform() if evaluation else train_transform()
    return WSOLDataset(image_root, items, classes, transform, evaluation=evaluation, strict=strict)
