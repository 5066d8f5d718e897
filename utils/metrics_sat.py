"""The official SAT protocol (``sat``; the official evaluator.py's ``val_loc_one_epoch``, as TS-CAM's):
Top-1 / Top-5 / GT-known Loc and IoU30/50/70.

map (h, w) -> min-max normalise (official ``utils/func.py``'s ``normalize_map``) -> bilinear 224x224 ->
for each threshold t: pixels > t, largest 8-connected component (first in raster order on ties, as
skimage's ``measure.label`` + ``count_max``) -> box [min_x, min_y, max_x + 1, max_y + 1] (the
``regionprops`` bbox); no foreground -> the whole crop. IoU with the +1 convention, best over the
image's GT boxes.
"""
import numpy as np

from utils.box_ops import as_numpy, max_iou
from utils.cv import cv2
from utils.metrics import CounterState, topk_correct

TRAIN_THRESHOLDS = (0.3, 0.35, 0.4, 0.45)  # official train.py's --threshold list, searched each evaluation
# The official evaluators' single threshold: evaluator.py (CUB, ten-crop) and evaluator_ImageNet.py (centre crop).
OFFICIAL_THRESHOLD = {"cub": 0.4, "imagenet": 0.3}
IOU_LEVELS = np.array([0.3, 0.5, 0.7])  # rows of the IoU hit counters; 0.5 is GT-known Loc


def normalize_map_sat(cam_map, cam_size=224):
    """``(m - min) / (max - min + 1e-5)`` in float32, then OpenCV bilinear resize to cam_size^2."""
    m = as_numpy(cam_map, np.float32)
    norm = (m - m.min()) / (m.max() - m.min() + np.float32(1e-5))
    return cv2.resize(norm, (cam_size, cam_size), interpolation=cv2.INTER_LINEAR)


def _largest_component_box(foreground):
    """Box of the largest 8-connected component of a uint8 mask, or None when the mask is empty."""
    count, labels = cv2.connectedComponents(foreground, connectivity=8)
    if count == 1:
        return None
    if count > 2:
        areas = np.bincount(labels.ravel(), minlength=count)[1:]
        tied = np.flatnonzero(areas == areas.max()) + 1
        # OpenCV's block-based labelling does not number components in raster order: on a tie take
        # the component whose first pixel comes first in raster order, as the official code does.
        best = tied[0] if len(tied) == 1 else labels.flat[np.flatnonzero(np.isin(labels, tied))[0]]
        foreground = (labels == best).view(np.uint8)
    x, y, w, h = cv2.boundingRect(foreground)
    return [x, y, x + w, y + h]


def boxes_at_thresholds(norm_map, thresholds):
    """Official SAT box (int (T, 4), exclusive max) of a normalised map at each threshold."""
    height, width = norm_map.shape
    boxes = np.tile(np.array([0, 0, width, height], dtype=np.int64), (len(thresholds), 1))
    for i, t in enumerate(thresholds):
        box = _largest_component_box((norm_map > np.float32(t)).view(np.uint8))
        if box is not None:
            boxes[i] = box
    return boxes


def predict_box(cam_map, threshold, cam_size=224):
    """Official SAT box (4,) of a raw map at one threshold, e.g. the best one, for overlays."""
    return boxes_at_thresholds(normalize_map_sat(cam_map, cam_size), [threshold])[0]


class SATLocAccumulator(CounterState):
    """Counts per localization threshold for the official SAT protocol, batch by batch; ``compute()`` -> %."""

    COUNTERS = ("num_images", "top1_cls", "top5_cls", "iou_hits", "top1_loc", "top5_loc")

    def __init__(self, thresholds=TRAIN_THRESHOLDS, cam_size=224):
        self.thresholds = [float(t) for t in thresholds]
        self.cam_size = cam_size
        num = len(self.thresholds)
        self.num_images, self.top1_cls, self.top5_cls = (np.zeros((), np.int64) for _ in range(3))
        self.iou_hits = np.zeros((len(IOU_LEVELS), num), np.int64)  # rows: IoU >= 0.3 / 0.5 / 0.7
        self.top1_loc = np.zeros(num, np.int64)
        self.top5_loc = np.zeros(num, np.int64)

    def boxes(self, maps):
        """The official boxes (B, T, 4) of raw maps (B, h, w) at each threshold, in crop pixels."""
        return np.stack([boxes_at_thresholds(normalize_map_sat(m, self.cam_size), self.thresholds)
                         for m in as_numpy(maps, np.float32)]).reshape(-1, len(self.thresholds), 4)

    def update(self, maps, gt_boxes, scores, labels):
        """maps (B, h, w) raw; gt_boxes: B arrays (K, 4) in crop pixels; scores (B, C) logits or probs.

        Returns the best IoU per image and threshold, (B, T).
        """
        return self.update_boxes(self.boxes(maps), gt_boxes, scores, labels)

    def update_boxes(self, boxes, gt_boxes, scores, labels):
        """``update`` with the boxes (B, T, 4) already extracted by ``boxes``."""
        top1, top5 = topk_correct(scores, labels)
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
        pct = 100.0 / int(self.num_images)
        iou30, iou50, iou70 = (self.iou_hits[:, index] * pct).tolist()
        return {"gt_known_loc": iou50, "top1_loc": float(self.top1_loc[index] * pct),
                "top5_loc": float(self.top5_loc[index] * pct), "iou30": iou30, "iou50": iou50, "iou70": iou70}

    def _classification(self):
        pct = 100.0 / int(self.num_images)
        return {"num_images": int(self.num_images), "top1_cls": float(self.top1_cls * pct),
                "top5_cls": float(self.top5_cls * pct)}

    def compute_at(self, threshold):
        """Metrics (%) at one of the accumulated thresholds (the official evaluator with one threshold)."""
        self._check_nonempty()
        matches = [k for k, t in enumerate(self.thresholds) if t == float(threshold)]
        if not matches:
            raise ValueError(f"threshold {threshold} was not accumulated (thresholds: {self.thresholds})")
        return {**self._classification(), "threshold": self.thresholds[matches[0]], **self._rates(matches[0])}

    def compute(self, candidates=None):
        """Metrics (%) at the threshold maximising GT-known + Top-1 Loc among ``candidates`` (default: all
        accumulated thresholds; the first on ties), as the official ``val_loc_one_epoch`` with a list."""
        self._check_nonempty()
        candidates = self.thresholds if candidates is None else [float(t) for t in candidates]
        indices = [self.thresholds.index(t) for t in candidates]
        best = indices[int(np.argmax((self.iou_hits[1] + self.top1_loc)[indices]))]
        pct = 100.0 / int(self.num_images)
        return {
            **self._classification(),
            **self._rates(best),
            "best_threshold": self.thresholds[best],
            "gt_known_loc_per_threshold": (self.iou_hits[1] * pct).tolist(),
            "top1_loc_per_threshold": (self.top1_loc * pct).tolist(),
        }
