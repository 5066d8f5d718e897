"""Saved localization maps: written by ``--save-maps DIR`` (:func:`write_maps`, :func:`write_saved_view`), and
any method's, scored in place of a model's outputs (``evaluator.py --maps DIR``).

``SavedMaps`` gives each batch's ``{'sat' | 'wsol': (scores, loc_maps)}`` from files, as ``forward_views`` gives
a model's, so that ``evaluate`` (utils/engine.py) scores them as it scores a checkpoint; the classes come from an
optional predictions file. ``MapSamples`` are the split's samples without pixels (only the overlays' are read).

A map file is named as wsolevaluation names it: the image id with ``.npy`` (or ``.png``) appended, in the id's
subfolders. DIR holds either the folders ``--save-maps`` writes, ``sat/`` (the raw map of the sat protocol's
centre view) and ``wsol/`` (the wsol protocol's 224x224 map), or one whole-image map per image, of any size,
which each protocol takes through its own view (:func:`centre_view_map`, :func:`wsol_score_map`).
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from DataLoader.dataset import UNREADABLE, rgb, unreadable_message, why_unreadable
from DataLoader.eval_loader import ShardSampler
from DataLoader.eval_views import includes_wsol
from DataLoader.loader import BatchLoader
from utils.boxes import WSOL_MAP_SIZE, centre_offset, wsol_map
from utils.errors import ConfigError, DataError, writing_outputs
from utils.outputs import partial_name

MAP_SUFFIXES = (".npy", ".png")
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every np.save file
# a PNG map's mode -> its full scale: 8-bit grey, 16-bit grey ("I": as Pillow up to 10.1 opens 16-bit grey PNGs)
PNG_SCALES = {"L": 255, "I;16": 65535, "I": 65535}
VIEW_FILE = "views.json"  # the centre view (img_size, resize_size) of the sat protocol on these maps
# metrics.json keys that need each image's predicted classes
CLASS_KEYS = ("top1_cls", "top5_cls", "top1_loc", "top5_loc", "top1_loc_per_threshold")
TOP5_KEYS = ("top5_cls", "top5_loc")  # not reported from top-1 predictions


def map_folders(root, protocol):
    """{protocol key: (folder, whole-image maps?)} of a maps folder: ``sat/`` and ``wsol/`` as ``--save-maps``
    writes them, or the folder itself holding whole-image maps for both."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"maps {root}: {'a file' if root.exists() else 'not found'} (expected a folder of maps "
                        "named <image_id>.npy)")
    keys = {"sat": ("sat",), "wsol": ("wsol",), "both": ("sat", "wsol")}[protocol]
    if not (root / "sat").is_dir() and not (root / "wsol").is_dir():
        return {key: (root, True) for key in keys}
    missing = [key for key in keys if not (root / key).is_dir()]
    if missing:
        raise DataError(f"maps {root}: no {missing[0]}/ folder, which the {missing[0]} protocol reads (saved with "
                        f"another --eval-protocol?)")
    return {key: (root / key, False) for key in keys}


def saved_view(root, resize_size=None):
    """(img_size, resize_size) of the sat protocol's centre view on the maps of ``root``: ``DIR/views.json``
    (written by --save-maps: the view the sat/ maps are of; beside whole-image maps: the view to take them
    through), else 224 and ``resize_size`` or 256 (the official Resize((256, 256)) -> CenterCrop(224))."""
    path = Path(root) / VIEW_FILE
    if not path.is_file():
        if resize_size is not None and resize_size < WSOL_MAP_SIZE:
            raise ConfigError(f"--resize-size {resize_size}: the centre view crops 224 pixels, resize to at least 224")
        return WSOL_MAP_SIZE, resize_size or 256
    saved = read_view_file(path)
    if resize_size is not None and resize_size != saved["resize_size"]:
        raise ConfigError(f"--resize-size {resize_size}: the maps in {root} are of the centre crop of a "
                          f"{saved['resize_size']}x{saved['resize_size']} image ({path})")
    return saved["img_size"], saved["resize_size"]


def read_view_file(path):
    """{'img_size', 'resize_size'} of a ``views.json``: integers, resize_size at least img_size (one-line
    DataError naming the file otherwise)."""
    expected = 'expected {"img_size": N, "resize_size": M} with M >= N >= 16'
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        sizes = {key: saved[key] for key in ("img_size", "resize_size")}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a maps view file ({err.__class__.__name__}: {err}); {expected}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()) or \
            not 16 <= sizes["img_size"] <= sizes["resize_size"]:
        raise DataError(f"{path}: {json.dumps(sizes)}; {expected}")
    return sizes


def write_saved_view(root, img_size, resize_size):
    """``DIR/views.json``: the sat protocol's centre view on the maps of DIR (see :func:`saved_view`); one-line
    OutputError where it cannot be written (a full disk)."""
    path = Path(root) / VIEW_FILE
    with writing_outputs(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"img_size": img_size, "resize_size": resize_size}) + "\n", encoding="utf-8")


def write_maps(root, image_ids, out):
    """A batch's maps of ``out`` (``{'sat' | 'wsol': (scores, loc_maps)}``, numpy): ``<root>/sat/<id>.npy``, the
    raw localization map of the sat view (before any normalisation); ``<root>/wsol/<id>.npy``, the wsol protocol's
    224x224 map in [0, 1], as wsolevaluation reads it. One-line OutputError where a file cannot be written."""
    for key, save in (("sat", lambda m: m), ("wsol", wsol_map)):
        if key in out:
            for image_id, loc_map in zip(image_ids, out[key][1]):
                path = Path(root) / key / f"{image_id}.npy"
                with writing_outputs(path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, save(loc_map))


def saved_maps_bytes(num_images, protocol, grid, block=4096):
    """The disk room ``write_maps`` takes for ``num_images``: per image a float32 sat map of ``grid`` x ``grid``
    (protocols other than wsol) and a float64 224 x 224 wsol map (wsol, both; 401,536 bytes: 20 GB for the
    50,000 ImageNet val images), each .npy file (128-byte header) in whole ``block``-byte blocks of the disk."""
    payloads = ([4 * grid * grid] if protocol != "wsol" else []) + \
        ([8 * WSOL_MAP_SIZE * WSOL_MAP_SIZE] if includes_wsol(protocol) else [])
    return num_images * sum(-(-(128 + payload) // block) * block for payload in payloads)


def check_room_for_maps(folder, num_images, protocol, grid):
    """Before the evaluation: a one-line ConfigError when the disk of ``folder`` (the --save-maps folder) has
    less room than the maps need (found out only at the end of a long evaluation otherwise); the size, else. The
    disk is the one they are written to: beside ``folder`` (:func:`utils.outputs.partial_name`), the disk of its
    parent, which is not the folder's own where ``folder`` is a mount point or a link to another disk."""
    needed = saved_maps_bytes(num_images, protocol, grid)
    written = Path(partial_name(Path(folder).absolute()))
    existing = next(path for path in (written, *written.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ConfigError(f"--save-maps {folder}: the maps of {num_images} images need {needed / 1e6:,.1f} MB, "
                          f"{existing} has {free / 1e6:,.1f} MB free (free some space or save them on a larger disk)")
    return needed


def read_map(folder, image_id, allow_constant=False):
    """The map of ``image_id`` in ``folder`` as a 2-D float array: ``<id>.npy`` (floats as stored, other
    numbers as float64) or ``<id>.png`` (grayscale, scaled to [0, 1]). One-line DataError for a missing or
    unreadable file, a map that is not 2-D, holds NaN / Inf, or is constant (unless ``allow_constant``)."""
    path = next((p for p in (Path(folder) / f"{image_id}{suffix}" for suffix in MAP_SUFFIXES) if p.is_file()), None)
    if path is None:
        raise DataError(f"no map for image {image_id}: {Path(folder) / image_id}.npy (or .png) not found"
                        f"{misnamed_hint(folder, image_id)}")
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(6) != NPY_MAGIC:  # np.load would call text "pickled data" and return an .npz's archive
                    raise DataError(f"map {path}: not a NumPy .npy file (no NPY header), expected an array "
                                    "written by np.save")
            loc_map = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                if image.mode not in PNG_SCALES:
                    raise DataError(f"map {path}: a {image.mode} PNG, expected grayscale (8 or 16 bit)")
                loc_map = np.asarray(image, np.float32) / PNG_SCALES[image.mode]
    except (OSError, ValueError) as err:  # (said as the dataset says an unreadable image: the path once)
        raise DataError(f"map {path}: unreadable ({why_unreadable(path, err)})") from None
    if loc_map.ndim != 2 or 0 in loc_map.shape:
        raise DataError(f"map {path}: shape {loc_map.shape}, expected a non-empty 2-D map (height, width)")
    if loc_map.dtype.kind not in "fiub":
        raise DataError(f"map {path}: dtype {loc_map.dtype}, expected numbers")
    if loc_map.dtype.kind != "f":
        loc_map = loc_map.astype(np.float64)
    if not np.isfinite(loc_map).all():
        raise DataError(f"map {path}: holds NaN or Inf")
    if not allow_constant and loc_map.min() == loc_map.max():
        raise DataError(f"map {path}: constant ({loc_map.flat[0]:g}), it localizes nothing; "
                        "--allow-constant-maps scores it (all zeros once normalised, as wsolevaluation does)")
    return loc_map


def misnamed_hint(folder, image_id):
    """For a map not found: '; found FILE, ...' when the map is there under another name maps are often given
    (the image's extension replaced, not kept; or without the id's subfolders), else ''."""
    image = Path(image_id)
    names = [image.with_suffix(""), Path(image.name), Path(image.stem)] if image.suffix else [Path(image.name)]
    for name in dict.fromkeys(names):
        if name == image:
            continue
        found = next((Path(folder) / f"{name}{suffix}" for suffix in MAP_SUFFIXES
                      if (Path(folder) / f"{name}{suffix}").is_file()), None)
        if found is not None:
            return (f"; found {found}: name each map <image_id>.npy (or .png), the image id with its extension and "
                    f"subfolders, e.g. {image_id}{found.suffix}")
    return ""


def centre_view_map(whole, resize_size, img_size):
    """A whole-image map -> the map of the sat protocol's centre view: resized to resize_size x resize_size as
    the image is (Resize((256, 256)): PIL bilinear, here on the float32 map), then CenterCrop(img_size)."""
    resized = np.asarray(Image.fromarray(np.asarray(whole, np.float32)).resize((resize_size, resize_size),
                                                                               Image.BILINEAR))
    top = centre_offset(resize_size, img_size)
    return resized[top:top + img_size, top:top + img_size]


def unit_range(loc_map):
    """A whole-image map min-max normalised to [0, 1] in float64 (a constant one: zeros): its scale and offset
    do not change its score (the sat normalisation's 1e-5 is made for probabilities, its resize is float32)."""
    m = np.asarray(loc_map, np.float64) - np.min(loc_map)
    return m / m.max() if m.max() > 0 else m


def wsol_score_map(loc_map):
    """A map read from a file -> the wsol protocol's 224x224 map (float64): a 224x224 map in [0, 1] as it is
    (wsolevaluation's evaluation.py scores its score maps unchanged), any other through ``wsol_map`` (bicubic
    resize to 224, then min-max: as its inference.py makes them)."""
    loc_map = np.asarray(loc_map, np.float64)
    if loc_map.shape == (WSOL_MAP_SIZE, WSOL_MAP_SIZE) and loc_map.min() >= 0 and loc_map.max() <= 1:
        return loc_map
    return wsol_map(loc_map)


def read_predictions(path, image_ids, num_classes):
    """{image id: classes, best first} of a predictions CSV: a header naming ``image_id`` and ``top5`` (the
    top min(5, num_classes) class indices, space-separated; other columns ignored, so an evaluator's
    per_image.csv is one) or, without ``top5``, ``top1`` (one class index: Top-1 metrics only), one row per
    image of the split. One-line DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions {path}: {'a folder, not a file' if path.is_dir() else 'file not found'}")
    try:
        return _read_predictions(path, image_ids, num_classes)
    except UnicodeDecodeError:
        raise DataError(f"predictions {path}: not UTF-8 text (expected a CSV with image_id and top5 columns)") \
            from None


def _read_predictions(path, image_ids, num_classes):
    rows, lines, known = [], {}, set(image_ids)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = "top1" if "top5" not in fields and "top1" in fields else "top5"
        missing = [c for c in ("image_id", column) if c not in fields]
        if missing:
            raise DataError(f"predictions {path}: no column {missing[0]} (expected a header naming image_id and "
                            f"top5 or top1, found {', '.join(fields) or 'an empty file'})")
        for lineno, row in enumerate(reader, start=2):
            image_id, cells = row["image_id"], (row[column] or "").split()
            if image_id in lines:
                raise DataError(f"predictions {path} line {lineno}: image {image_id} again (first on line "
                                f"{lines[image_id]})")
            try:
                classes = [int(c) for c in cells]
            except ValueError:
                raise DataError(f"predictions {path} line {lineno}: {column} {row[column]!r}, expected class "
                                f"{'index' if column == 'top1' else 'indices separated by spaces'}") from None
            rows.append((lineno, image_id, row[column], classes))
            lines[image_id] = lineno
    # one class in every top5 cell: the per_image.csv of an evaluation of top-1 predictions
    top1 = column == "top1" or (bool(rows) and all(len(classes) == 1 for *_, classes in rows))
    want = 1 if top1 else min(5, num_classes)
    predictions = {}
    for lineno, image_id, cell, classes in rows:
        if len(classes) != want or len(set(classes)) != want:
            expected = "one class index" if want == 1 else f"{want} distinct class indices, best first"
            hint = " (a method's top-1 classes alone: a column top1 instead)" if len(classes) == 1 else ""
            raise DataError(f"predictions {path} line {lineno}: {column} {cell!r}, expected {expected}{hint}")
        wrong = next((c for c in classes if not 0 <= c < num_classes), None)
        if wrong is not None:
            raise DataError(f"predictions {path} line {lineno}: class {wrong} out of range (the data has "
                            f"{num_classes} classes: 0 to {num_classes - 1})")
        predictions[image_id] = classes
    unknown = [image_id for image_id in predictions if image_id not in known]
    if unknown:
        raise DataError(f"predictions {path}: {len(unknown)} image id(s) not in the evaluated split, first "
                        f"{unknown[0]} (line {lines[unknown[0]]})")
    absent = [image_id for image_id in image_ids if image_id not in predictions]
    if absent:
        raise DataError(f"predictions {path}: no prediction for {len(absent)} image(s) of the split, first "
                        f"{absent[0]}")
    return predictions


class SavedMaps:
    """A batch -> ``{'sat' | 'wsol': (scores, loc_maps)}`` read from ``root`` for the protocols of ``views``:
    the sat view's raw maps (those of whole-image maps: :func:`centre_view_map`), the wsol protocol's 224x224
    maps ready to score (:func:`wsol_score_map`), and scores that rank each image's predicted classes first
    (``topk`` gives them in order; None without predictions; the classes are reported once: with both
    protocols, under the sat view)."""

    def __init__(self, root, views, predictions=None, num_classes=None, allow_constant=False):
        self.views, self.predictions, self.num_classes = views, predictions, num_classes
        self.folders = map_folders(root, views.protocol)
        self.allow_constant = allow_constant
        self._listed = {}

    def _files(self, folder):
        """{image id: map file} of the maps in ``folder`` and its subfolders (listed once)."""
        if folder not in self._listed:
            self._listed[folder] = {path.relative_to(folder).as_posix()[:-len(path.suffix)]: path
                                    for path in Path(folder).rglob("*")
                                    if path.suffix in MAP_SUFFIXES and path.is_file()}
        return self._listed[folder]

    def strangers(self, image_ids):
        """The map files of images not in ``image_ids`` (ignored by the evaluation; many of them hint at maps
        of another split or dataset version), sorted."""
        known = set(image_ids)
        return sorted({str(path) for folder, _ in self.folders.values()
                       for image_id, path in self._files(folder).items() if image_id not in known})

    def check_complete(self, image_ids, split):
        """A DataError, before any is scored, when images of ``image_ids`` have no map: the count and the first
        few (one missing: :func:`read_map`'s line, which says where it may lie under another name)."""
        for folder in dict.fromkeys(folder for folder, _ in self.folders.values()):
            files = self._files(folder)
            missing = [image_id for image_id in image_ids if image_id not in files]
            if len(missing) == 1:
                read_map(folder, missing[0])
            if missing:
                first = ", ".join(missing[:3])
                raise DataError(f"maps {folder}: no map for {len(missing)} of the {len(image_ids)} images of the "
                                f"{split} split, first {first} (expected <image_id>.npy or .png)"
                                f"{misnamed_hint(folder, missing[0])}")

    def scores(self, image_ids):
        """(B, classes): 5, 4, ... 1 at each image's predicted classes, 0 elsewhere; None without predictions."""
        if self.predictions is None:
            return None
        scores = np.zeros((len(image_ids), self.num_classes), np.float32)
        for k, image_id in enumerate(image_ids):
            classes = self.predictions[image_id]
            scores[k, classes] = np.arange(len(classes), 0, -1)
        return scores

    def sat_map(self, image_id):
        folder, whole_image = self.folders["sat"]
        loc_map = read_map(folder, image_id, self.allow_constant)
        if not whole_image:  # a sat/ map of --save-maps: SAT's raw map, as the checkpoint's evaluation has it
            return loc_map
        return centre_view_map(unit_range(loc_map), self.views.resize_size, self.views.img_size)

    def wsol_map(self, image_id):
        return wsol_score_map(read_map(self.folders["wsol"][0], image_id, self.allow_constant))

    def __call__(self, batch):
        ids = batch["image_id"]
        scores, out = self.scores(ids), {}
        if "sat" in self.folders:
            maps = [self.sat_map(image_id) for image_id in ids]  # maps of several sizes stay a list
            out["sat"] = (scores, np.stack(maps) if len({m.shape for m in maps}) == 1 else maps)
        if "wsol" in self.folders:
            out["wsol"] = (None if "sat" in out else scores, np.stack([self.wsol_map(image_id) for image_id in ids]))
        return out


class MapSamples(Dataset):
    """The evaluation samples of ``dataset`` without pixels, for scoring saved maps: label, index and
    annotations, the image's size read from its header only where the annotation states none, and ``'crop'``:
    for an image that gets an overlay (dataset index below ``overlays``; None: all) the uint8 pixels of the view
    it is drawn on (the centre view, or without a sat view the image resized to 224x224), else None."""

    def __init__(self, dataset, views, overlays=0):
        self.dataset, self.transform, self.overlays = dataset, views, overlays
        self.items, self.classes = dataset.items, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def _crop(self, image):
        views = self.transform
        if "wsol" in views.slices and len(views.slices) == 1:
            return np.asarray(rgb(image).resize((WSOL_MAP_SIZE, WSOL_MAP_SIZE), Image.BILINEAR))
        resized = np.asarray(rgb(image).resize((views.resize_size, views.resize_size), Image.BILINEAR))
        top = centre_offset(views.resize_size, views.img_size)
        return resized[top:top + views.img_size, top:top + views.img_size]

    def __getitem__(self, index):
        item = self.dataset.items[index]
        crop, file_size = None, item.size
        drawn = self.overlays is None or index < self.overlays
        if drawn or item.size is None:
            path = self.dataset.image_path(index)
            try:
                with Image.open(path) as image:
                    file_size = image.size
                    crop = self._crop(image) if drawn else None
            except UNREADABLE as err:
                raise DataError(unreadable_message(path, err)) from None
        return {"crop": crop, "label": item.label, "index": index, **self.dataset.annotations(index, file_size)}


def map_loader(dataset, views, overlays, batch_size, workers, distributed=False):
    """The loader of ``MapSamples``: batches in dataset order (this process's shard when ``distributed``),
    on the CPU (the maps are scored there: nothing is pinned)."""
    return BatchLoader(MapSamples(dataset, views, overlays), batch_size,
                       ShardSampler(len(dataset)) if distributed else None, workers=workers, pin_memory=False)


def drop_class_metrics(metrics, keys):
    """Leave ``keys`` out of ``metrics`` (and its at_best_threshold), in place: CLASS_KEYS without predictions, the
    metrics that need each image's classes (not reported as zeros); TOP5_KEYS with top-1 predictions alone, those
    that need five."""
    for part in (metrics, metrics.get("at_best_threshold", {})):
        for key in keys:
            part.pop(key, None)


def top1_only(predictions, num_classes):
    """Whether ``predictions`` (:func:`read_predictions`) hold each image's top-1 class alone (a top1 column)."""
    return predictions is not None and num_classes > 1 and all(len(classes) == 1 for classes in predictions.values())
