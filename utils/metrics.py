"""The metrics of both protocols: counters summed over batches and processes, and their summaries.

``sat`` (official evaluator.py's ``val_loc_one_epoch``): Top-1 / Top-5 Cls, and at each map threshold Top-1 /
Top-5 / GT-known Loc and IoU30/50/70 (:class:`SATLocAccumulator`). ``wsol`` (wsolevaluation's ``BoxEvaluator`` /
``MaskEvaluator``): MaxBoxAcc, MaxBoxAccV2 (:class:`WSOLBoxAccumulator`), PxAP (:class:`PxAPAccumulator`).
``cls``: classification only. :class:`Counters` holds those of one evaluation; the boxes come from utils/boxes.py.
"""
import numpy as np
import torch

from utils.boxes import WSOL_THRESHOLDS, as_numpy, flat_contour_boxes, max_iou, sat_boxes_of_maps, wsol_map
from utils.errors import DataError

TRAIN_THRESHOLDS = (0.3, 0.35, 0.4, 0.45)  # official train.py's --threshold list, searched each evaluation
IOU_LEVELS = np.array([0.3, 0.5, 0.7])  # rows of the sat IoU hit counters; 0.5 is GT-known Loc
IOU_THRESHOLDS = (30, 50, 70)  # wsol MaxBoxAccV2's IoU thresholds (%)
LOC_KEYS = ("gt_known_loc", "top1_loc", "top5_loc", "iou30", "iou50", "iou70")


def on_grid(value, grid=WSOL_THRESHOLDS):
    """Whether the map threshold ``value`` is one of ``grid`` (the wsol protocol's 0, 0.01, ..., 0.99), up to
    the rounding of its decimal text."""
    return bool(np.abs(np.asarray(grid, np.float64) - float(value)).min() <= 1e-6)


class CounterState:
    """Accumulator base: integer counter arrays named in ``COUNTERS``, summable across processes.

    ``state()`` / ``merge(state)`` combine accumulators; ``reduce(fn)`` replaces every counter by
    ``fn(counter)``, e.g. a DDP all-reduce (sum) of the array.
    """

    COUNTERS = ()

    def state(self):
        return {name: getattr(self, name).copy() for name in self.COUNTERS}

    def merge(self, state):
        for name in self.COUNTERS:
            getattr(self, name)[...] += as_numpy(state[name], np.int64)
        return self

    def reduce(self, fn):
        for name in self.COUNTERS:
            counter = getattr(self, name)
            counter[...] = as_numpy(fn(counter), np.int64).reshape(counter.shape)
        return self

    def _check_nonempty(self):
        if int(self.num_images) == 0:
            raise ValueError(f"{type(self).__name__}.compute(): no images were accumulated")


def percent(count, num_images):
    """``count`` of ``num_images`` in %, as (100 * count) / num_images: to the last bit the average of the official
    AverageMeter over 100 or 0 per image (and wsolevaluation's ``count * 100. / cnt``). Thresholds and epochs are
    ranked by sums of these values, and equal counts can round to different sums, so the rounding is the
    official one."""
    return 100.0 * np.asarray(count, np.float64) / int(num_images)


def topk_correct(scores, labels):
    """Per image, whether the label is among the top-1 and among the top-5 scores -> [bool (B,), bool (B,)]."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels).reshape(-1, 1)
    top = scores.topk(min(5, scores.shape[1]), dim=1, largest=True, sorted=True).indices
    hits = (top == labels).cpu().numpy()
    return [hits[:, :k].any(axis=1) for k in (1, 5)]


class ClassAccumulator(CounterState):
    """Top-1 / top-5 classification hits (the wsol protocol reports those of its own view; ``cls`` those of
    the sat view)."""

    COUNTERS = ("num_images", "top1", "top5")

    def __init__(self):
        self.num_images, self.top1, self.top5 = (np.zeros((), np.int64) for _ in range(3))

    def update(self, scores, labels):
        top1, top5 = topk_correct(scores, labels)
        self.num_images += len(top1)
        self.top1 += top1.sum()
        self.top5 += top5.sum()

    def compute(self):
        self._check_nonempty()
        return {"num_images": int(self.num_images), "top1_cls": float(percent(self.top1, self.num_images)),
                "top5_cls": float(percent(self.top5, self.num_images))}


class SATLocAccumulator(CounterState):
    """Counts per map threshold for the sat protocol, batch by batch; ``compute()`` -> %."""

    COUNTERS = ("num_images", "top1_cls", "top5_cls", "iou_hits", "top1_loc", "top5_loc")

    def __init__(self, thresholds=TRAIN_THRESHOLDS, map_size=224):
        self.thresholds = [float(t) for t in thresholds]
        self.map_size = map_size
        num = len(self.thresholds)
        self.num_images, self.top1_cls, self.top5_cls = (np.zeros((), np.int64) for _ in range(3))
        self.iou_hits = np.zeros((len(IOU_LEVELS), num), np.int64)  # rows: IoU >= 0.3 / 0.5 / 0.7
        self.top1_loc = np.zeros(num, np.int64)
        self.top5_loc = np.zeros(num, np.int64)

    def boxes(self, maps):
        """The sat boxes (B, T, 4) of raw localization maps (B, h, w), or a list of maps of any sizes, at each map
        threshold, in crop pixels."""
        return sat_boxes_of_maps(maps, self.thresholds, self.map_size)

    def update(self, maps, gt_boxes, scores, labels):
        """maps (B, h, w) raw; gt_boxes: B arrays (K, 4) in crop pixels; scores (B, C) logits or probs.

        Returns the best IoU per image and threshold, (B, T).
        """
        return self.update_boxes(self.boxes(maps), gt_boxes, scores, labels)

    def update_boxes(self, boxes, gt_boxes, scores, labels):
        """``update`` with the boxes (B, T, 4) already extracted by ``boxes``; ``scores`` None: no predicted
        classes (saved maps without predictions), so no image counts as correctly classified."""
        top1, top5 = topk_correct(scores, labels) if scores is not None else [np.zeros(len(boxes), bool)] * 2
        ious = np.stack([max_iou(b, gt) for b, gt in zip(boxes, gt_boxes)]).reshape(len(boxes), -1)
        hits = ious[None] >= IOU_LEVELS[:, None, None]  # (3, B, T)
        self.num_images += len(boxes)
        self.top1_cls += top1.sum()
        self.top5_cls += top5.sum()
        self.iou_hits += hits.sum(axis=1)
        self.top1_loc += (hits[1] & top1[:, None]).sum(axis=0)
        self.top5_loc += (hits[1] & top5[:, None]).sum(axis=0)
        return ious

    def _rates(self, index):
        """Localization metrics (%) at ``self.thresholds[index]``."""
        iou30, iou50, iou70 = percent(self.iou_hits[:, index], self.num_images).tolist()
        return {"gt_known_loc": iou50, "top1_loc": float(percent(self.top1_loc[index], self.num_images)),
                "top5_loc": float(percent(self.top5_loc[index], self.num_images)), "iou30": iou30, "iou50": iou50,
                "iou70": iou70}

    def _classification(self):
        return {"num_images": int(self.num_images), "top1_cls": float(percent(self.top1_cls, self.num_images)),
                "top5_cls": float(percent(self.top5_cls, self.num_images))}

    def compute_at(self, threshold):
        """Metrics (%) at one of the accumulated thresholds (the official evaluator with one threshold)."""
        self._check_nonempty()
        matches = [k for k, t in enumerate(self.thresholds) if t == float(threshold)]
        if not matches:
            raise ValueError(f"threshold {threshold} was not accumulated (thresholds: {self.thresholds})")
        return {**self._classification(), "threshold": self.thresholds[matches[0]], **self._rates(matches[0])}

    def compute(self, candidates=None):
        """Metrics (%) at the threshold maximising GT-known + Top-1 Loc among ``candidates`` (default: all
        accumulated thresholds), as the official ``val_loc_one_epoch`` with a list: the sum of the two
        percentages as the official code rounds them (:func:`percent`), the first of equal sums."""
        self._check_nonempty()
        candidates = self.thresholds if candidates is None else [float(t) for t in candidates]
        indices = [self.thresholds.index(t) for t in candidates]
        gt_known, top1_loc = percent(self.iou_hits[1], self.num_images), percent(self.top1_loc, self.num_images)
        best = indices[int(np.argmax((gt_known + top1_loc)[indices]))]
        return {
            **self._classification(),
            **self._rates(best),
            "best_threshold": self.thresholds[best],
            "gt_known_loc_per_threshold": gt_known.tolist(),
            "top1_loc_per_threshold": top1_loc.tolist(),
        }


class WSOLBoxAccumulator(CounterState):
    """Per map threshold (and IoU threshold) hit counts for MaxBoxAcc and MaxBoxAccV2."""

    COUNTERS = ("num_images", "hits_largest", "hits_all")

    def __init__(self, iou_thresholds=IOU_THRESHOLDS, cam_thresholds=WSOL_THRESHOLDS):
        self.iou_thresholds = [int(i) for i in iou_thresholds]
        self.cam_thresholds = np.asarray(cam_thresholds, dtype=np.float64)
        self.num_images = np.zeros((), np.int64)
        self.hits_largest = np.zeros(len(self.cam_thresholds), np.int64)  # largest contour, IoU >= 0.5
        self.hits_all = np.zeros((len(self.iou_thresholds), len(self.cam_thresholds)), np.int64)

    def update(self, maps, gt_boxes, normalised=False):
        """maps (B, h, w) raw or score maps; gt_boxes: B arrays (K, 4) in 224x224-resized pixels.
        ``normalised``: the maps are already the 224x224 maps to score (saved maps, scored as they are)."""
        iou_levels = np.array(self.iou_thresholds)[:, None] / 100
        for cam_map, gt in zip(as_numpy(maps), gt_boxes):
            boxes, counts, largest = flat_contour_boxes(cam_map if normalised else wsol_map(cam_map),
                                                        self.cam_thresholds)
            best_all = np.maximum.reduceat(max_iou(boxes, gt), np.cumsum(counts) - counts)
            self.hits_largest += max_iou(largest, gt) >= 0.5
            self.hits_all += best_all[None] >= iou_levels
            self.num_images += 1

    def threshold_index(self, cam_threshold):
        """Index of a map threshold of the grid (e.g. a maxboxacc_threshold chosen on another split)."""
        return grid_index(self.cam_thresholds, cam_threshold)

    def compute_at(self, cam_threshold):
        """Box accuracies (%) at one fixed map threshold: boxacc (largest contour, IoU >= 0.5) and
        boxaccv2 (all contours, mean over the IoU thresholds), for a threshold chosen on another split."""
        self._check_nonempty()
        index = self.threshold_index(cam_threshold)
        per_iou = {i: float(percent(self.hits_all[k, index], self.num_images))
                   for k, i in enumerate(self.iou_thresholds)}
        return {"wsol_threshold": reported_threshold(self.cam_thresholds[index]),
                "boxacc": float(percent(self.hits_largest[index], self.num_images)),
                "boxaccv2": float(np.mean(list(per_iou.values()))), "boxaccv2_per_iou": per_iou}

    def curves(self):
        """Box accuracy (%) against the map threshold: largest contour at IoU 0.5, and all contours per IoU."""
        self._check_nonempty()
        return {"cam_thresholds": self.cam_thresholds.tolist(),
                "boxacc": percent(self.hits_largest, self.num_images).tolist(),
                "boxaccv2_per_iou": {i: percent(self.hits_all[k], self.num_images).tolist()
                                     for k, i in enumerate(self.iou_thresholds)}}

    def compute(self):
        """maxboxacc, maxboxaccv2 (%), per-IoU V2 accuracies and the best map thresholds."""
        self._check_nonempty()
        acc_largest = percent(self.hits_largest, self.num_images)
        acc_all = percent(self.hits_all, self.num_images)
        best_all = acc_all.argmax(axis=1)
        return {
            "num_images": int(self.num_images),
            "maxboxacc": float(acc_largest.max()),
            "maxboxacc_threshold": reported_threshold(self.cam_thresholds[acc_largest.argmax()]),
            "maxboxaccv2": float(acc_all.max(axis=1).mean()),
            "maxboxaccv2_per_iou": {i: float(acc_all[k, best_all[k]]) for k, i in enumerate(self.iou_thresholds)},
            "maxboxaccv2_threshold_per_iou": {
                i: reported_threshold(self.cam_thresholds[best_all[k]]) for k, i in enumerate(self.iou_thresholds)},
        }


def chosen_wsol_threshold(metrics):
    """The map threshold a wsol evaluation chose on its split: MaxBoxAcc's with boxes, else PxAP's pIoU one (mask
    data); None without the wsol protocol."""
    return metrics.get("maxboxacc_threshold", metrics.get("piou_threshold"))


def reported_threshold(cam_threshold):
    """A map threshold of the grid as metrics.json reports it: 0.57, not np.arange's 0.5700000000000001 (the
    comparisons use the grid's own values, as wsolevaluation does)."""
    return round(float(cam_threshold), 10)


def grid_index(cam_thresholds, cam_threshold):
    """Index of a map threshold of the grid ``cam_thresholds`` (one chosen on another split)."""
    index = int(np.abs(cam_thresholds - float(cam_threshold)).argmin())
    if not on_grid(cam_threshold, cam_thresholds[index:index + 1]):
        raise ValueError(f"map threshold {cam_threshold} is not on the wsolevaluation grid (0, 0.01, ..., 0.99)")
    return index


class PxAPAccumulator(CounterState):
    """Score histograms of GT-foreground and GT-background pixels (ignore regions left out) for PxAP."""

    COUNTERS = ("num_images", "hist_fg", "hist_bg", "empty_masks", "skewed_masks")

    def __init__(self, cam_thresholds=WSOL_THRESHOLDS):
        self.cam_thresholds = np.asarray(cam_thresholds, dtype=np.float64)
        if self.cam_thresholds[0] != 0 or (np.diff(self.cam_thresholds) <= 0).any() or self.cam_thresholds[-1] >= 1:
            raise ValueError("PxAP cam_thresholds must rise from 0 to below 1, like np.arange(0, 1, 0.01)")
        # bins [0, t_1), ..., [t_last, 1), [1, 2), [2, 3] as the benchmark's MaskEvaluator
        self.bin_edges = np.append(self.cam_thresholds, [1.0, 2.0, 3.0])
        self.num_images = np.zeros((), np.int64)
        self.hist_fg = np.zeros(len(self.bin_edges) - 1, np.int64)
        self.hist_bg = np.zeros(len(self.bin_edges) - 1, np.int64)
        self.empty_masks = np.zeros((), np.int64)  # images whose mask holds no foreground pixel at 224 x 224
        self.skewed_masks = np.zeros((), np.int64)  # images with a mask of another aspect ratio than theirs

    def update(self, maps, masks, ignore_masks=None, normalised=False, skewed=0):
        """maps (B, h, w); masks (B, 224, 224) nonzero = foreground; ignore_masks likewise (optional).
        ``normalised``: the maps are already the 224x224 maps to score (saved maps, scored as they are);
        ``skewed``: how many of the images have a mask of another aspect ratio (counted, for the warning).

        Ignored pixels are those in an ignore mask and outside the foreground (as the benchmark).
        """
        masks = as_numpy(masks) != 0
        ignore = np.zeros_like(masks) if ignore_masks is None else as_numpy(ignore_masks) != 0
        for cam_map, fg, ign in zip(as_numpy(maps), masks, ignore):
            score = cam_map if normalised else wsol_map(cam_map)
            if fg.shape != score.shape or ign.shape != score.shape:
                raise ValueError(f"masks must be {score.shape}, got {fg.shape} and ignore {ign.shape}")
            self.hist_fg += np.histogram(score[fg], bins=self.bin_edges)[0]  # as MaskEvaluator
            self.hist_bg += np.histogram(score[~fg & ~ign], bins=self.bin_edges)[0]
            self.num_images += 1
            self.empty_masks += not fg.any()
        self.skewed_masks += skewed

    def _counts(self):
        """Pixel counts (tp, fp, fn) for scores >= 2, >= 1, >= t_last, ..., >= t_0 (descending)."""
        self._check_nonempty()
        if self.hist_fg.sum() == 0:  # the data's fault (every mask empty): a one-line error, not a traceback
            raise DataError(f"PxAP: the masks of the {int(self.num_images)} evaluated images hold no foreground "
                            "pixel (a mask's foreground: its pixels above 0.5 once resized to 224x224), nothing "
                            "to localize; check the mask files of the split's localization.txt")
        tp = self.hist_fg[::-1].cumsum()
        fp = self.hist_bg[::-1].cumsum()
        return tp, fp, self.hist_fg.sum() - tp

    def curves(self):
        """The pixel precision-recall curve PxAP integrates, by ascending map threshold (precision of a
        threshold without predicted pixels: null)."""
        tp, fp, fn = self._counts()
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
        order = np.arange(len(tp))[::-1][: len(self.cam_thresholds)]  # t_0, ..., t_last
        return {"cam_thresholds": self.cam_thresholds.tolist(),
                "precision": [None if np.isnan(p) else float(p) for p in precision[order]],
                "recall": (tp / (tp + fn))[order].tolist()}

    def compute_at(self, cam_threshold):
        """The pixel IoU (%) at one fixed map threshold of the grid, e.g. the piou_threshold chosen on another
        split (PxAP itself takes every map threshold)."""
        index = grid_index(self.cam_thresholds, cam_threshold)
        tp, fp, fn = self._counts()
        piou = (tp / (tp + fp + fn))[::-1][: len(self.cam_thresholds)] * 100  # ascending thresholds
        return {"wsol_threshold": reported_threshold(self.cam_thresholds[index]), "piou": float(piou[index])}

    def compute(self):
        """pxap (%), and the best pixel IoU (%) over map thresholds (piou) with its threshold."""
        tp, fp, fn = self._counts()
        predicted = (tp + fp) != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        pxap = (precision[1:] * np.diff(recall))[predicted[1:]].sum() * 100
        piou = (tp / (tp + fp + fn))[::-1][: len(self.cam_thresholds)] * 100  # ascending thresholds
        return {
            "num_images": int(self.num_images),
            "pxap": float(pxap),
            "piou": float(piou.max()),
            "piou_threshold": reported_threshold(self.cam_thresholds[piou.argmax()]),
            **({"empty_masks": int(self.empty_masks)} if self.empty_masks else {}),
            **({"skewed_masks": int(self.skewed_masks)} if self.skewed_masks else {}),
        }


def sat_metrics(acc, threshold, thresholds):
    """sat metrics of an accumulator: the headline keys at ``threshold`` (when given), and
    the one of ``thresholds`` maximising GT-known + Top-1 Loc on the evaluated split as
    ``best_threshold`` with its metrics under ``at_best_threshold`` (when ``thresholds`` are given)."""
    out = acc.compute_at(threshold) if threshold is not None else {}
    if thresholds:
        best = acc.compute(thresholds)
        out.update({key: best[key] for key in ("num_images", "top1_cls", "top5_cls")})
        out.update(best_threshold=best["best_threshold"], at_best_threshold={key: best[key] for key in LOC_KEYS})
    if len(acc.thresholds) > 1:
        every = acc.compute()
        out.update(thresholds=acc.thresholds, gt_known_loc_per_threshold=every["gt_known_loc_per_threshold"],
                   top1_loc_per_threshold=every["top1_loc_per_threshold"])
    return out


class Counters:
    """The accumulators of one evaluation, or of one batch (merged into the evaluation's)."""

    def __init__(self, protocol, thresholds, map_size):
        self.parts = {}
        if protocol in ("sat", "both"):
            self.parts["sat"] = SATLocAccumulator(thresholds, map_size)
        if protocol == "cls":
            self.parts["cls"] = ClassAccumulator()
        if protocol in ("wsol", "both"):
            self.parts.update(wsol_cls=ClassAccumulator(), wsol_boxes=WSOLBoxAccumulator(), pxap=PxAPAccumulator())

    def merge(self, other):
        for name, acc in self.parts.items():
            acc.merge(other.parts[name].state())

    def reduce(self, fn):
        for acc in self.parts.values():
            acc.reduce(fn)

    def metrics(self, protocol, threshold, thresholds, wsol_threshold=None):
        out = sat_metrics(self.parts["sat"], threshold, thresholds) if "sat" in self.parts else {}
        if "cls" in self.parts:
            out.update(self.parts["cls"].compute())
        if "wsol_cls" in self.parts:
            if int(self.parts["wsol_cls"].num_images):  # none: no class predictions for the wsol view (saved maps)
                classification = self.parts["wsol_cls"].compute()
                if protocol == "wsol":
                    out.update(classification)
                else:  # 'both': the sat view's classification keeps the plain keys
                    out.update(wsol_top1_cls=classification["top1_cls"], wsol_top5_cls=classification["top5_cls"])
            boxes, pxap = self.parts["wsol_boxes"], self.parts["pxap"]
            if int(boxes.num_images):  # box metrics need boxes, PxAP masks: report what the data has
                out.update({k: v for k, v in boxes.compute().items() if k != "num_images"})
                if wsol_threshold is not None:
                    out["at_wsol_threshold"] = boxes.compute_at(wsol_threshold)
            if int(pxap.num_images):
                out.update({k: v for k, v in pxap.compute().items() if k != "num_images"})
                if wsol_threshold is not None:
                    out.setdefault("at_wsol_threshold", {}).update(pxap.compute_at(wsol_threshold))
            out.setdefault("num_images", int(max(boxes.num_images, pxap.num_images)))
        return out

    def curves(self):
        """wsol curves: box accuracy against the map threshold, the PxAP precision-recall curve."""
        out = {}
        if "wsol_boxes" in self.parts and int(self.parts["wsol_boxes"].num_images):
            out["box_accuracy"] = self.parts["wsol_boxes"].curves()
        if "pxap" in self.parts and int(self.parts["pxap"].num_images):
            out["pxap"] = self.parts["pxap"].curves()
        return out


def per_class_metrics(rows, class_names):
    """Top-1 Cls / Top-1 Loc / GT-known Loc (%) per class, from the per-image rows (those the rows hold: no
    classes predicted, as saved maps without predictions, leave Top-1 Cls and Loc out)."""
    by_label = {}  # one pass over the rows (not one per class: 1,000 classes x 50,000 ImageNet images)
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    out = {}
    for label, mine in sorted(by_label.items()):
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        out[name] = {"num_images": len(mine), **{key: float(percent(sum(row[flag] for row in mine), len(mine)))
                     for key, flag in (("top1_cls", "cls_correct"), ("top1_loc", "top1_loc"),
                                       ("gt_known_loc", "gt_known"))
                     if all(row[flag] is not None for row in mine)}}
    return out


def _table(title, columns):
    """A titled two-line table of (name, value) columns; floats with two decimals, None as n/a (not reported).
    Each column is as wide as its name or its value, whichever is wider (at least 9)."""
    cells = [(name, f"{value:.2f}" if isinstance(value, float) else "n/a" if value is None else str(value))
             for name, value in columns]
    widths = [max(9, len(name), len(cell)) for name, cell in cells]
    return "\n".join([title] + [" | ".join(f"{text:>{width}}" for text, width in zip(row, widths))
                                for row in ([name for name, _ in cells], [cell for _, cell in cells])])


def format_tables(metrics, protocol, classification):
    """Readable tables of a metrics dict: sat protocol, wsol protocol, classification. ``classification``: where
    the classes come from (ten-crop, centre-crop, a predictions file). A metric the dict lacks (no classes
    predicted) reads n/a."""
    tables = []
    if protocol == "cls":
        tables.append(_table(f"Classification ({classification}): {metrics['num_images']} images",
                             [("Top-1 Cls", metrics["top1_cls"]), ("Top-5 Cls", metrics["top5_cls"])]))
    if protocol in ("sat", "both"):
        tables.append(_table(
            f"sat protocol (official SAT): {metrics['num_images']} images, {classification} classification, "
            f"threshold {metrics['threshold']:g}",
            [("Top-1 Cls", metrics.get("top1_cls")), ("Top-5 Cls", metrics.get("top5_cls")),
             ("Top-1 Loc", metrics.get("top1_loc")), ("Top-5 Loc", metrics.get("top5_loc")),
             ("GT-known Loc", metrics["gt_known_loc"]), ("IoU30", metrics["iou30"]),
             ("IoU50", metrics["iou50"]), ("IoU70", metrics["iou70"])]))
        if "best_threshold" in metrics:
            best = metrics["at_best_threshold"]
            tables.append(_table(
                f"sat protocol at best_threshold {metrics['best_threshold']:g}, chosen on the evaluated "
                f"split ({metrics.get('split', 'this split')}) among {metrics['search_thresholds']}: not the "
                "reported result",
                [("Top-1 Loc", best.get("top1_loc")), ("Top-5 Loc", best.get("top5_loc")),
                 ("GT-known Loc", best["gt_known_loc"]), ("IoU30", best["iou30"]), ("IoU50", best["iou50"]),
                 ("IoU70", best["iou70"])]))
        if len(metrics.get("thresholds", [])) > 1:
            top1 = metrics.get("top1_loc_per_threshold") or [None] * len(metrics["thresholds"])
            tables.append(_table("sat protocol per map threshold (GT-known Loc / Top-1 Loc)", [
                (f"{t:g}", f"{gt:.2f} / " + ("n/a" if loc is None else f"{loc:.2f}")) for t, gt, loc in zip(
                    metrics["thresholds"], metrics["gt_known_loc_per_threshold"], top1)]))
    if protocol in ("wsol", "both"):
        prefix = "wsol_" if protocol == "both" else ""
        columns = []  # with both protocols, saved maps' classes are reported once, in the sat table
        if protocol == "wsol" or prefix + "top1_cls" in metrics:
            columns += [(f"Top-{k} Cls", metrics.get(f"{prefix}top{k}_cls")) for k in (1, 5)]
        if "maxboxacc" in metrics:
            columns += [("MaxBoxAcc", metrics["maxboxacc"]), ("MaxBoxAccV2", metrics["maxboxaccv2"])]
            columns += [(f"V2 IoU{iou}", acc) for iou, acc in metrics["maxboxaccv2_per_iou"].items()]
        if "pxap" in metrics:
            columns += [("PxAP", metrics["pxap"]), ("pIoU", metrics["piou"])]
        tables.append(_table(f"wsol protocol (wsolevaluation, 224x224 maps): {metrics['num_images']} images",
                             columns))
        if "at_wsol_threshold" in metrics:
            fixed = metrics["at_wsol_threshold"]
            columns = []
            if "boxacc" in fixed:
                columns += [("BoxAcc", fixed["boxacc"]), ("BoxAccV2", fixed["boxaccv2"])]
                columns += [(f"V2 IoU{iou}", acc) for iou, acc in fixed["boxaccv2_per_iou"].items()]
            if "piou" in fixed:
                columns += [("pIoU", fixed["piou"])]
            tables.append(_table(f"wsol protocol at the given map threshold {fixed['wsol_threshold']:g}", columns))
    return "\n\n".join(tables)


def format_per_class(per_class):
    """The per-class table of log.txt: Top-1 Cls / Top-1 Loc / GT-known Loc (%) per class."""
    width = max([5] + [len(name) for name in per_class])
    lines = [f"{'class':<{width}}  images  Top-1 Cls  Top-1 Loc  GT-known Loc"]
    lines += [f"{name:<{width}}  {m['num_images']:6d}  {_percent(m, 'top1_cls', 9)}  {_percent(m, 'top1_loc', 9)}  "
              f"{_percent(m, 'gt_known_loc', 12)}" for name, m in per_class.items()]
    return "\n".join(lines)


def _percent(metrics, key, width):
    return f"{metrics[key]:{width}.2f}" if key in metrics else f"{'n/a':>{width}}"
