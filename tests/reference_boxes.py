"""Straightforward reference implementations of the box extraction, used as test oracles.

They follow the structure of the original code (per threshold: binarise, label or find contours, then
per-component / per-contour work) rather than the vectorised paths of utils/boxes.py they check.
"""
import cv2
import numpy as np


def naive_sat_boxes(loc_map, thresholds, cam_size=224):
    """Official-style sat protocol: per threshold, label, count pixels per label, keep the largest."""
    m = np.asarray(loc_map, dtype=np.float32)
    norm = cv2.resize((m - m.min()) / (m.max() - m.min() + np.float32(1e-5)), (cam_size, cam_size))
    boxes = []
    for t in thresholds:
        _, labels = cv2.connectedComponents((norm > np.float32(t)).astype(np.uint8), connectivity=8)
        fg_labels = labels.ravel()[labels.ravel() > 0]
        if fg_labels.size == 0:
            boxes.append([0, 0, cam_size, cam_size])
            continue
        ids, first_seen, counts = np.unique(fg_labels, return_index=True, return_counts=True)
        best = ids[np.lexsort((first_seen, -counts))[0]]  # most pixels, then first in raster order
        ys, xs = np.nonzero(labels == best)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, dtype=np.int64)


def naive_wsol_boxes(normalised, thresholds):
    """wsolevaluation-style wsol protocol: per threshold cv2.threshold + findContours + per-contour loops."""
    height, width = normalised.shape
    score_u8 = np.expand_dims((normalised * 255).astype(np.uint8), 2)
    all_boxes, largest = [], []
    for t in thresholds:
        _, binary = cv2.threshold(score_u8, int(t * np.max(score_u8)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            all_boxes.append(np.zeros((1, 4), np.int64))
            largest.append([0, 0, 0, 0])
            continue
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        all_boxes.append(np.array(boxes, dtype=np.int64))
        largest.append(boxes[max(range(len(contours)), key=lambda i: cv2.contourArea(contours[i]))])
    return all_boxes, np.array(largest, dtype=np.int64)


def random_maps(num, size=14, seed=0):
    """Smooth multi-blob maps with noise, roughly like SAT's 14x14 sigmoid maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = []
    for _ in range(num):
        m = 0.05 * rng.random((size, size))
        for _ in range(rng.integers(1, 4)):
            cy, cx, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 4)
            m += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        maps.append(m.astype(np.float32))
    return maps
