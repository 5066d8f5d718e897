"""The wsolevaluation protocol (``wsol``; Choe et al., wsolevaluation's ``evaluation.py``: ``BoxEvaluator``,
``MaskEvaluator``): MaxBoxAcc, MaxBoxAccV2 and PxAP.

Score map: float64 bicubic resize to 224x224, min-max normalise to [0, 1] (constant after the resize,
or NaN -> zeros).
Boxes at CAM threshold t: uint8 map ``(s * 255)`` > ``int(t * its max)``, OpenCV contours (RETR_TREE,
CHAIN_APPROX_SIMPLE), boundingRect -> [x, y, min(x + w, 223), min(y + h, 223)]; no contour -> [0, 0, 0, 0].
MaxBoxAcc: largest contour (cv2.contourArea), IoU >= 0.5, best threshold. MaxBoxAccV2: all contours,
IoU 30/50/70 each at its own best threshold, averaged. PxAP: area under the pixel PR curve.
"""
import numpy as np

from utils.box_ops import as_numpy, max_iou
from utils.cv import cv2
from utils.metrics import CounterState

CAM_THRESHOLDS = np.arange(0, 1, 0.01)
IOU_THRESHOLDS = (30, 50, 70)
SCORE_MAP_SIZE = 224


def normalize_map_wsol(cam_map, size=SCORE_MAP_SIZE):
    """Benchmark score map: float64 bicubic resize to size^2, then min-max to [0, 1] (constant -> 0)."""
    cam = cv2.resize(as_numpy(cam_map, np.float64), (size, size), interpolation=cv2.INTER_CUBIC)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


# The map to save as ``<image_id>.npy`` for the benchmark's evaluation.py; re-reading it gives the
# same numbers, since normalising an already normalised 224x224 map is the identity.
wsol_score_map = normalize_map_wsol


def _boxes_and_areas(contours, width, height):
    """cv2.boundingRect as [x, y, min(x + w, width - 1), min(y + h, height - 1)] and cv2.contourArea
    (shoelace over the closed polygon; twice the area, exact in int64), vectorised over contours."""
    if not contours:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    lengths = np.array([len(c) for c in contours])
    starts = np.cumsum(lengths) - lengths
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    x, y = points[:, 0], points[:, 1]
    boxes = np.stack([np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts),
                      np.minimum(np.maximum.reduceat(x, starts) + 1, width - 1),
                      np.minimum(np.maximum.reduceat(y, starts) + 1, height - 1)], axis=1)
    prev = np.arange(len(points)) - 1
    prev[starts] = starts + lengths - 1
    return boxes, np.abs(np.add.reduceat(x[prev] * y - x * y[prev], starts))


def flat_contour_boxes(score_map, thresholds=CAM_THRESHOLDS):
    """Benchmark boxes of a [0, 1] score map at each CAM threshold, in flat form.

    Returns (boxes (N, 4): every contour's box, threshold after threshold, with one [0, 0, 0, 0] for a
    threshold without contours; counts (T,): boxes per threshold; largest (T, 4): the box of the
    contour with the largest cv2.contourArea, the first one on ties, as ``max(contours, key=...)``).
    """
    height, width = score_map.shape
    score_u8 = (score_map * 255).astype(np.uint8)
    peak = int(score_u8.max())
    contours, counts = [], []
    for t in thresholds:
        binary = cv2.threshold(score_u8, int(t * peak), 255, cv2.THRESH_BINARY)[1]  # u8 > int(t * peak)
        contours_t = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        contours += contours_t
        counts.append(len(contours_t))
    boxes, areas = _boxes_and_areas(contours, width, height)
    counts = np.array(counts)
    starts = np.cumsum(counts) - counts
    found = counts > 0
    largest = np.zeros((len(counts), 4), np.int64)
    if found.any():
        group_max = np.repeat(np.maximum.reduceat(areas, starts[found]), counts[found])
        index = np.where(areas == group_max, np.arange(len(areas)), len(areas))
        largest[found] = boxes[np.minimum.reduceat(index, starts[found])]
    return np.insert(boxes, starts[~found], 0, axis=0), np.maximum(counts, 1), largest


def contour_boxes(score_map, thresholds=CAM_THRESHOLDS):
    """(list of T arrays (K_t, 4): all contour boxes per threshold, (T, 4): largest-contour boxes)."""
    boxes, counts, largest = flat_contour_boxes(score_map, thresholds)
    return np.split(boxes, np.cumsum(counts)[:-1]), largest


class WSOLBoxAccumulator(CounterState):
    """Per CAM threshold (and IoU threshold) hit counts for MaxBoxAcc and MaxBoxAccV2."""

    COUNTERS = ("num_images", "hits_largest", "hits_all")

    def __init__(self, iou_thresholds=IOU_THRESHOLDS, cam_thresholds=CAM_THRESHOLDS):
        self.iou_thresholds = [int(i) for i in iou_thresholds]
        self.cam_thresholds = np.asarray(cam_thresholds, dtype=np.float64)
        self.num_images = np.zeros((), np.int64)
        self.hits_largest = np.zeros(len(self.cam_thresholds), np.int64)  # largest contour, IoU >= 0.5
        self.hits_all = np.zeros((len(self.iou_thresholds), len(self.cam_thresholds)), np.int64)

    def update(self, maps, gt_boxes):
        """maps (B, h, w) raw or score maps; gt_boxes: B arrays (K, 4) in 224x224-resized pixels."""
        iou_levels = np.array(self.iou_thresholds)[:, None] / 100
        for cam_map, gt in zip(as_numpy(maps), gt_boxes):
            boxes, counts, largest = flat_contour_boxes(wsol_score_map(cam_map), self.cam_thresholds)
            best_all = np.maximum.reduceat(max_iou(boxes, gt), np.cumsum(counts) - counts)
            self.hits_largest += max_iou(largest, gt) >= 0.5
            self.hits_all += best_all[None] >= iou_levels
            self.num_images += 1

    def threshold_index(self, cam_threshold):
        """Index of a CAM threshold of the grid (e.g. a maxboxacc_threshold chosen on another split)."""
        index = int(np.abs(self.cam_thresholds - float(cam_threshold)).argmin())
        if abs(self.cam_thresholds[index] - float(cam_threshold)) > 1e-6:
            raise ValueError(f"CAM threshold {cam_threshold} is not on the wsolevaluation grid (0, 0.01, ..., 0.99)")
        return index

    def compute_at(self, cam_threshold):
        """Box accuracies (%) at one fixed CAM threshold: boxacc (largest contour, IoU >= 0.5) and
        boxaccv2 (all contours, mean over the IoU thresholds), for a threshold chosen on another split."""
        self._check_nonempty()
        index = self.threshold_index(cam_threshold)
        pct = 100.0 / int(self.num_images)
        per_iou = {i: float(self.hits_all[k, index] * pct) for k, i in enumerate(self.iou_thresholds)}
        return {"wsol_threshold": float(self.cam_thresholds[index]), "boxacc": float(self.hits_largest[index] * pct),
                "boxaccv2": float(np.mean(list(per_iou.values()))), "boxaccv2_per_iou": per_iou}

    def curves(self):
        """Box accuracy (%) against the CAM threshold: largest contour at IoU 0.5, and all contours per IoU."""
        self._check_nonempty()
        pct = 100.0 / int(self.num_images)
        return {"cam_thresholds": self.cam_thresholds.tolist(), "boxacc": (self.hits_largest * pct).tolist(),
                "boxaccv2_per_iou": {i: (self.hits_all[k] * pct).tolist() for k, i in enumerate(self.iou_thresholds)}}

    def compute(self):
        """maxboxacc, maxboxaccv2 (%), per-IoU V2 accuracies and the best CAM thresholds."""
        self._check_nonempty()
        acc_largest = self.hits_largest * 100.0 / int(self.num_images)
        acc_all = self.hits_all * 100.0 / int(self.num_images)
        best_all = acc_all.argmax(axis=1)
        return {
            "num_images": int(self.num_images),
            "maxboxacc": float(acc_largest.max()),
            "maxboxacc_threshold": float(self.cam_thresholds[acc_largest.argmax()]),
            "maxboxaccv2": float(acc_all.max(axis=1).mean()),
            "maxboxaccv2_per_iou": {i: float(acc_all[k, best_all[k]]) for k, i in enumerate(self.iou_thresholds)},
            "maxboxaccv2_threshold_per_iou": {
                i: float(self.cam_thresholds[best_all[k]]) for k, i in enumerate(self.iou_thresholds)},
        }


class PxAPAccumulator(CounterState):
    """Score histograms of GT-foreground and GT-background pixels (ignore regions left out) for PxAP."""

    COUNTERS = ("num_images", "hist_fg", "hist_bg")

    def __init__(self, cam_thresholds=CAM_THRESHOLDS):
        self.cam_thresholds = np.asarray(cam_thresholds, dtype=np.float64)
        if self.cam_thresholds[0] != 0 or (np.diff(self.cam_thresholds) <= 0).any() or self.cam_thresholds[-1] >= 1:
            raise ValueError("PxAP cam_thresholds must rise from 0 to below 1, like np.arange(0, 1, 0.01)")
        # bins [0, t_1), ..., [t_last, 1), [1, 2), [2, 3] as the benchmark's MaskEvaluator
        self.bin_edges = np.append(self.cam_thresholds, [1.0, 2.0, 3.0])
        self.num_images = np.zeros((), np.int64)
        self.hist_fg = np.zeros(len(self.bin_edges) - 1, np.int64)
        self.hist_bg = np.zeros(len(self.bin_edges) - 1, np.int64)

    def update(self, maps, masks, ignore_masks=None):
        """maps (B, h, w); masks (B, 224, 224) nonzero = foreground; ignore_masks likewise (optional).

        Ignored pixels are those in an ignore mask and outside the foreground (as the benchmark).
        """
        masks = as_numpy(masks) != 0
        ignore = np.zeros_like(masks) if ignore_masks is None else as_numpy(ignore_masks) != 0
        for cam_map, fg, ign in zip(as_numpy(maps), masks, ignore):
            score = wsol_score_map(cam_map)
            if fg.shape != score.shape or ign.shape != score.shape:
                raise ValueError(f"masks must be {score.shape}, got {fg.shape} and ignore {ign.shape}")
            bins = np.searchsorted(self.bin_edges, score, side="right") - 1  # np.histogram's bins, faster
            self.hist_fg += np.bincount(bins[fg], minlength=len(self.hist_fg))
            self.hist_bg += np.bincount(bins[~fg & ~ign], minlength=len(self.hist_bg))
            self.num_images += 1

    def _counts(self):
        """Pixel counts (tp, fp, fn) for scores >= 2, >= 1, >= t_last, ..., >= t_0 (descending)."""
        self._check_nonempty()
        if self.hist_fg.sum() == 0:
            raise ValueError("PxAP: no foreground pixel in the ground truth")
        tp = self.hist_fg[::-1].cumsum()
        fp = self.hist_bg[::-1].cumsum()
        return tp, fp, self.hist_fg.sum() - tp

    def curves(self):
        """The pixel precision-recall curve PxAP integrates, by ascending CAM threshold (precision of a
        threshold without predicted pixels: null)."""
        tp, fp, fn = self._counts()
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
        order = np.arange(len(tp))[::-1][: len(self.cam_thresholds)]  # t_0, ..., t_last
        return {"cam_thresholds": self.cam_thresholds.tolist(),
                "precision": [None if np.isnan(p) else float(p) for p in precision[order]],
                "recall": (tp / (tp + fn))[order].tolist()}

    def compute(self):
        """pxap (%), and the best pixel IoU (%) over CAM thresholds (piou) with its threshold."""
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
            "piou_threshold": float(self.cam_thresholds[piou.argmax()]),
        }
