"""The check of built splits before training: every image opens and is complete, and in evaluation splits every
box lies inside its image and every mask opens and is complete.

A header alone does not show a truncated file (its header is intact), so the cheap check also reads the last
bytes of each file: a JPEG ends with its end marker FF D9 (after any zero padding), a PNG with its IEND chunk.
A file without one (or of another format) is decoded in full and is bad only if that fails, as it would in
training: a JPEG with bytes after its end marker is not rejected. ``decode=True`` decodes every file (about 20
times slower). Files are read by DataLoader worker processes, as the training loader reads them (a pool of a
fork server or of spawned processes would import torch again in each process: seconds before the first file).
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.errors import DataError, SATError
from utils.logger import progress_bar
from utils.preemption import leave_stops_to_the_parent, signals_deferred

from .formats.annotations import check_boxes
from .formats.wsol import alpha_problem, reader_problem
from .dataset import UNREADABLE, size_difference_warning, why_unreadable

_logger = logging.getLogger("sat")

# Bytes read from the end of a file for its end marker, and how each format's last bytes must look once
# trailing zero bytes are stripped (PNG: the IEND chunk's type and CRC).
TAIL_BYTES = 1024
END_MARKERS = {"JPEG": (b"\xff\xd9", "end marker"), "PNG": (b"IEND\xaeB`\x82", "IEND chunk")}
# Items per task of a worker process; a split of fewer than two tasks is checked in this process.
CHUNK = 256
# Bad files named in a one-line summary.
NAMED = 3
# What the check reads, without and with ``decode``.
METHODS = {False: "headers, end markers and boxes", True: "full decodes and boxes"}


def tail_has_end_marker(tail, fmt):
    """Whether ``tail``, a file's last bytes, ends with the end marker of ``fmt`` once trailing zero bytes
    are stripped."""
    return tail.rstrip(b"\0").endswith(END_MARKERS[fmt][0])


def ends_with_marker(path, fmt):
    """Whether the file ends with the end marker of ``fmt``; None for a format without one here."""
    if fmt not in END_MARKERS:
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        return tail_has_end_marker(f.read(), fmt)


def image_problem(path, decode=False):
    """((W, H), None) for a complete image, else (None, why it is unreadable)."""
    try:
        with Image.open(path) as image:
            size, fmt = image.size, image.format
            complete = ends_with_marker(path, fmt)
            if decode or not complete:
                try:
                    image.load()
                except UNREADABLE as err:
                    return None, (f"truncated {fmt}: no {END_MARKERS[fmt][1]}" if complete is False
                                  else why_unreadable(path, err))
    except UNREADABLE as err:
        return None, why_unreadable(path, err)
    return size, None


def item_problem(job):
    """(why item ``job`` = (path, boxes or None, the image size the annotation states or None, where the boxes
    come from, its mask files, decode) is bad or None, the file's (W, H) or None, its first mask of another aspect
    ratio as (mask, (W, H)) or None); boxes are checked against the stated size, else the file's; masks as images
    are."""
    path, boxes, stated_size, source, masks, decode = job
    size, reason = image_problem(path, decode)
    if reason is None and boxes is not None:
        try:
            check_boxes(boxes, stated_size or size, source)
        except DataError as err:
            reason = str(err)
    skewed = None
    for mask in masks if reason is None else ():
        mask_size, problem = image_problem(mask, decode)
        problem = problem or alpha_problem(mask) or reader_problem(mask)
        if problem is not None:
            return f"mask {mask}: {problem}", size, None
        if skewed is None and not same_aspect(mask_size, size):
            skewed = (mask, mask_size)
    return reason, size, skewed


def same_aspect(a, b, tolerance=0.01):
    """Whether sizes ``a`` and ``b`` (W, H) have one aspect ratio, within ``tolerance``: a mask resized to the
    224 x 224 map as its image is (wsolevaluation's rule) then lies over the same pixels."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= tolerance * a[0] * b[1]


class Chunks(Dataset):
    """:func:`item_problem` of ``jobs`` in runs of CHUNK: one run per task of a worker."""

    def __init__(self, jobs):
        self.jobs = jobs

    def __len__(self):
        return math.ceil(len(self.jobs) / CHUNK)

    def __getitem__(self, index):
        return [item_problem(job) for job in self.jobs[index * CHUNK:(index + 1) * CHUNK]]


@dataclass
class CheckReport:
    """What :func:`check_split` found in one split: the items checked, the bad ones as (path, reason) in
    dataset order, how long it took, and the images with boxes whose file is not the size their annotation
    states, as (path, stated (W, H), file (W, H), where the boxes come from)."""
    split: str
    checked: int
    bad: list
    seconds: float
    other_size: list = field(default_factory=list)
    positions: list = field(default_factory=list)  # the dataset index of each bad item (to merge shards' reports)
    skewed_masks: list = field(default_factory=list)  # (mask, its (W, H), the image's (W, H)), another aspect ratio

    @staticmethod
    def merged(reports):
        """One report of the shards' reports of a split (each process's, :func:`check_split` with ``shard``):
        the bad items in dataset order, the time of the slowest."""
        bad = sorted((position, item) for report in reports for position, item in zip(report.positions, report.bad))
        return CheckReport(reports[0].split, sum(report.checked for report in reports), [item for _, item in bad],
                           max(report.seconds for report in reports),
                           sorted(entry for report in reports for entry in report.other_size),
                           [position for position, _ in bad],
                           sorted(entry for report in reports for entry in report.skewed_masks))

    def summary(self):
        """One line: the split, how many bad images, and the first NAMED of them."""
        named = ", ".join(f"{path} ({reason})" for path, reason in self.bad[:NAMED])
        if len(self.bad) == 1:
            return f"{self.split} split: 1 bad image of {self.checked}: {named}"
        more = ", ... (tools/check_dataset.py lists them all)" if len(self.bad) > NAMED else ""
        return f"{self.split} split: {len(self.bad)} bad images of {self.checked}, first {named}{more}"

    def size_warning(self):
        """One line on the images whose file is not the size their annotation states (a box inside the stated
        size may lie outside the file), naming the first; None when there are none."""
        if not self.other_size:
            return None
        path, stated, size, source = self.other_size[0]
        first = f", first {path} ({source} states {stated[0]}x{stated[1]}, the file is {size[0]}x{size[1]})"
        return f"{self.split} split: {size_difference_warning(len(self.other_size), first)}"

    def mask_warning(self):
        """One line on the images with a mask of another aspect ratio than theirs, naming the first; None when
        there are none."""
        if not self.skewed_masks:
            return None
        mask, (mw, mh), (w, h) = self.skewed_masks[0]
        return (f"{self.split} split: {len(self.skewed_masks)} image(s) have a mask of another aspect ratio, first "
                f"{mask} ({mw}x{mh}, its image {w}x{h}): masks are resized to 224 x 224 as their images are "
                "(wsolevaluation's rule), so such a mask does not lie over its object")


def mask_files(item):
    """The mask files of an item (wsol masks and its ignore mask), if any."""
    return [*(item.mask_paths or []), *([item.ignore_path] if getattr(item, "ignore_path", None) else [])]


def check_split(dataset, split, workers=0, decode=False, progress=False, shard=(0, 1)):
    """A :class:`CheckReport` of every item of ``dataset`` (a WSOLDataset), read by ``workers`` processes
    (0: in this process). Boxes are checked in evaluation splits only: training does not use them.
    ``shard``: (k, n): only the items k, k + n, k + 2n, ... (the share of process k of n)."""
    indices = range(shard[0], len(dataset.items), shard[1])
    items = [dataset.items[index] for index in indices]
    jobs = [(dataset.image_path(index), item.boxes if dataset.evaluation else None, item.size, item.source,
             mask_files(item) if dataset.evaluation else [], decode) for index, item in zip(indices, items)]
    chunks = Chunks(jobs)
    processes = min(workers, len(chunks))
    start = time.perf_counter()
    if processes > 1:
        with signals_deferred():  # the workers start (utils/preemption.py)
            runs = iter(DataLoader(chunks, batch_size=None, num_workers=processes,
                                   worker_init_fn=leave_stops_to_the_parent))
    else:
        runs = map(chunks.__getitem__, range(len(chunks)))
    results = []
    # a bar only for checks that take a while
    with progress_bar(total=len(jobs), desc=f"check {split}", unit="image", disable=not progress, delay=2) as bar:
        for run in runs:
            results += run
            bar.update(len(run))
    found = [(index, (job[0], reason)) for index, job, (reason, *_) in zip(indices, jobs, results)
             if reason is not None]
    other_size = [(path, tuple(stated), tuple(size), item.size_source or source)
                  for (path, boxes, stated, source, *_), (_, size, _), item in zip(jobs, results, items)
                  if boxes is not None and stated and size and tuple(stated) != tuple(size)]
    skewed = [(str(skew[0]), tuple(skew[1]), tuple(size)) for _, size, skew in results if skew is not None]
    return CheckReport(split, len(jobs), [bad for _, bad in found], time.perf_counter() - start, other_size,
                       [index for index, _ in found], skewed)


def check_splits(train_set, eval_sets, workers=0, check_train=False, strict=False, decode=False, progress=False,
                 shard=(0, 1), gather=None):
    """Check the evaluation splits (``eval_sets``: {split name: WSOLDataset}) and, with ``check_train``, the
    training split before training starts; the reports.

    A bad evaluation image raises a one-line DataError (metrics must cover the whole split), as does a bad
    training image with ``strict``; otherwise bad training images are named in a warning and skipped in
    training, as they are when met there. Several processes share the work: each checks its ``shard`` and
    ``gather`` gives every one all the reports, so that each raises the same error (a string: this process's
    check broke, which gather raises on the others); the first shard's process says the rest.
    """
    splits = dict(eval_sets)
    if check_train:
        splits["train"] = train_set
    reports, says = [], shard[0] == 0
    for split, dataset in splits.items():
        try:
            report = check_split(dataset, split, workers, decode, progress and says, shard)
        except Exception as err:  # no other process may wait for this one's report in vain: they stop with a line
            if gather is not None:
                with contextlib.suppress(SATError):
                    gather(f"the data check failed on process {shard[0]}: {type(err).__name__}: {err}")
            raise
        if gather is not None:
            report = CheckReport.merged(gather(report))
        reports.append(report)
        if report.bad and (split != "train" or strict):
            raise DataError(report.summary())
        if report.bad and says:
            _logger.warning("%s (skipped in training; --strict-data makes them an error)", report.summary())
        if report.mask_warning() and says:
            _logger.warning(report.mask_warning())
    if not says:
        return reports
    _logger.info("checked the %s of %s in %.1fs", METHODS[decode],
                 " and ".join(f"the {r.split} split ({r.checked} images)" for r in reports),
                 sum(r.seconds for r in reports))
    return reports
