"""Map -> box for both protocols, ground-truth boxes in each protocol's frame, IoU, and boxes as a COCO
detection file (:func:`coco_detections`).

``sat`` (the official SAT / TS-CAM protocol, official ``utils/func.py`` + evaluator.py): localization map ->
min-max normalise -> bilinear 224x224 (:func:`sat_map`) -> at each map threshold t: pixels > t, largest
8-connected component, box [min_x, min_y, max_x + 1, max_y + 1], the whole crop when nothing is foreground
(:func:`sat_boxes`). GT boxes: resized to 256x256 and shifted into the centre crop (:func:`gt_boxes_sat`).

``wsol`` (wsolevaluation's ``evaluation.py``): float64 bicubic 224x224, then min-max to [0, 1]
(:func:`wsol_map`) -> at map threshold t: uint8 map > int(t * its max), OpenCV contours, each contour's
boundingRect clipped to 223 (:func:`contour_boxes`; none -> [0, 0, 0, 0]). GT boxes: scaled to 224x224
(:func:`gt_boxes_wsol`). IoU of both protocols counts pixels inclusively (+1).
"""
import numpy as np
import torch

from utils.cv import cv2

WSOL_MAP_SIZE = 224  # the wsol protocol's map and box frame
WSOL_THRESHOLDS = np.arange(0, 1, 0.01)  # the wsol protocol's map thresholds


def as_numpy(x, dtype=None):
    """Tensor (detached, moved to the CPU; half precision widened exactly) or array-like -> numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------ IoU
def iou_plus1(boxes_a, boxes_b):
    """IoU matrix (N, M) of x0y0x1y1 boxes, areas counted as (x1 - x0 + 1) * (y1 - y0 + 1) (the official
    ``IoU`` and wsolevaluation's ``calculate_multiple_iou``); a non-positive union gives 0."""
    a = as_numpy(boxes_a, np.float64).reshape(-1, 4)[:, None, :]
    b = as_numpy(boxes_b, np.float64).reshape(-1, 4)[None, :, :]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def max_iou(pred_boxes, gt_boxes):
    """For each predicted box (N, 4), its best IoU over the image's GT boxes (K, 4) -> (N,)."""
    return iou_plus1(pred_boxes, gt_boxes).max(axis=1)


# ---------------------------------------------------------------------------------- ground-truth frames
def centre_offset(size, crop_size):
    """torchvision's CenterCrop offset (``round`` of half the gap, ties to even)."""
    return int(round((size - crop_size) / 2.0))


def _as_boxes(boxes):
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def gt_boxes_sat(boxes, size, resize_size=256, crop_size=224):
    """Original-pixel boxes of an image of ``size`` (W, H) -> the sat frame: x / W * 256 in the official order
    (divide first), shift by the centre crop's offset, clip to [0, 223], truncate."""
    boxes = _as_boxes(boxes)
    width, height = size
    mapped = boxes / np.array([width, height] * 2) * resize_size - centre_offset(resize_size, crop_size)
    mapped[:, :2] = np.maximum(mapped[:, :2], 0)
    mapped[:, 2:] = np.minimum(mapped[:, 2:], crop_size - 1)
    return np.trunc(mapped).astype(np.int64)


def gt_boxes_wsol(boxes, size):
    """Original-pixel boxes -> the wsol 224x224 frame: int(x * 224 / W), int(y * 224 / H)."""
    boxes = _as_boxes(boxes)
    width, height = size
    return np.trunc(boxes * WSOL_MAP_SIZE / np.array([width, height] * 2)).astype(np.int64)


def crop_box_to_original(box, size, resize_size, img_size):
    """A (exclusive-max) box of the ``centre`` view -> original pixels of an image of ``size``, clipped to it."""
    width, height = size
    scale = np.array([width, height, width, height], np.float64) / resize_size
    original = (np.asarray(box, np.float64) + centre_offset(resize_size, img_size)) * scale
    return np.clip(original, 0, [width, height, width, height])


# ------------------------------------------------------------------------------------------ sat protocol
def one_map(loc_map, dtype):
    """One localization map (h, w) as a numpy array of ``dtype``; another shape (a batch (B, h, w): one map per
    call, or sat_boxes_of_maps) is a one-line ValueError, not OpenCV resizing it as an image of channels."""
    m = as_numpy(loc_map, dtype)
    if m.ndim != 2:
        raise ValueError(f"a localization map is 2-D (h, w), got shape {tuple(m.shape)}: pass one map (e.g. "
                         "loc_maps[0]); for a batch (B, h, w), sat_boxes_of_maps(loc_maps, thresholds)")
    return m


def sat_map(loc_map, size=224):
    """``(m - min) / (max - min + 1e-5)`` in float32, then OpenCV bilinear resize to size x size."""
    m = one_map(loc_map, np.float32)
    norm = (m - m.min()) / (m.max() - m.min() + np.float32(1e-5))
    return cv2.resize(norm, (size, size), interpolation=cv2.INTER_LINEAR)


def _largest_component_box(foreground):
    """Box of the largest 8-connected component of a uint8 mask, or None when the mask is empty."""
    count, labels = cv2.connectedComponents(foreground, connectivity=8)
    if count == 1:
        return None
    if count > 2:
        areas = np.bincount(labels.ravel(), minlength=count)[1:]
        tied = np.flatnonzero(areas == areas.max()) + 1
        # OpenCV's block-based labelling does not number components in raster order: on a tie take
        # the component whose first pixel comes first in raster order, as the official code (skimage) does.
        best = tied[0] if len(tied) == 1 else labels.flat[np.flatnonzero(np.isin(labels, tied))[0]]
        foreground = (labels == best).view(np.uint8)
    x, y, w, h = cv2.boundingRect(foreground)
    return [x, y, x + w, y + h]


def sat_boxes(normalised, thresholds):
    """The sat box (int (T, 4), exclusive max) of a :func:`sat_map` at each map threshold."""
    height, width = normalised.shape
    boxes = np.tile(np.array([0, 0, width, height], dtype=np.int64), (len(thresholds), 1))
    for i, t in enumerate(thresholds):
        box = _largest_component_box((normalised > np.float32(t)).view(np.uint8))
        if box is not None:
            boxes[i] = box
    return boxes


def sat_boxes_of_maps(loc_maps, thresholds, size=224):
    """The sat boxes (int (B, T, 4)) of raw localization maps (B, h, w), or a list of maps of any sizes, at each
    map threshold, in crop pixels."""
    return np.stack([sat_boxes(sat_map(m, size), thresholds) for m in loc_maps]).reshape(-1, len(thresholds), 4)


def sat_box(loc_map, threshold, size=224):
    """The sat box (4,) of a raw localization map at one map threshold (overlays, predictions)."""
    return sat_boxes(sat_map(loc_map, size), [threshold])[0]


# ----------------------------------------------------------------------------------------- wsol protocol
def wsol_map(loc_map):
    """float64 bicubic resize to WSOL_MAP_SIZE x WSOL_MAP_SIZE, then min-max to [0, 1] (constant or NaN -> zeros).
    Also the map saved for wsolevaluation: normalising it again is the identity."""
    m = cv2.resize(one_map(loc_map, np.float64), (WSOL_MAP_SIZE, WSOL_MAP_SIZE), interpolation=cv2.INTER_CUBIC)
    if np.isnan(m).any() or m.min() == m.max():
        return np.zeros_like(m)
    m -= m.min()
    m /= m.max()
    return m


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


def flat_contour_boxes(normalised, thresholds=WSOL_THRESHOLDS):
    """The wsol boxes of a :func:`wsol_map` at each map threshold, flat: (boxes (N, 4): every contour's box,
    threshold after threshold, one [0, 0, 0, 0] for a threshold without contours; counts (T,); largest
    (T, 4): the box of the contour with the largest cv2.contourArea, the first on ties)."""
    height, width = normalised.shape
    score_u8 = (normalised * 255).astype(np.uint8)
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


def contour_boxes(normalised, thresholds=WSOL_THRESHOLDS):
    """(list of T arrays (K_t, 4): all contour boxes per map threshold, (T, 4): largest-contour boxes)."""
    boxes, counts, largest = flat_contour_boxes(normalised, thresholds)
    return np.split(boxes, np.cumsum(counts)[:-1]), largest


def coco_detections(entries, class_names):
    """COCO detection format of one box per image: images (id, file_name, width, height), annotations
    (bbox [x, y, w, h] in original pixels, category_id = class + 1, score, area, iscrowd 0) and the
    categories named ``class_names``. ``entries``: dicts with file_name, size (W, H), class, score, box."""
    images, annotations = [], []
    for k, entry in enumerate(entries, start=1):
        (width, height), (x0, y0, x1, y1) = entry["size"], entry["box"]
        images.append({"id": k, "file_name": entry["file_name"], "width": int(width), "height": int(height)})
        annotations.append({"id": k, "image_id": k, "category_id": int(entry["class"]) + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                            "score": float(entry["score"])})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]}
