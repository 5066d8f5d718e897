"""Micro-benchmark of map -> box extraction: ms/image, vectorised utils vs naive references.

Protocol A: 4 thresholds, official SAT rule; protocol B: 100 thresholds, wsolevaluation contours.
The naive references follow the original code's structure (per threshold: binarise, label or find
contours, then per-component / per-contour work) and double as test oracles. Prints one JSON line.

    python tools/bench_boxes.py [--num-maps 64] [--repeat 3]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.metrics_sat import TRAIN_THRESHOLDS, boxes_at_thresholds, normalize_map_sat  # noqa: E402
from utils.metrics_wsol import CAM_THRESHOLDS, contour_boxes, wsol_score_map  # noqa: E402


def naive_sat_boxes(cam_map, thresholds, cam_size=224):
    """Official-style protocol A: per threshold, label, count pixels per label, keep the largest."""
    m = np.asarray(cam_map, dtype=np.float32)
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


def naive_wsol_boxes(score_map, thresholds):
    """wsolevaluation-style protocol B: per threshold cv2.threshold + findContours + per-contour loops."""
    height, width = score_map.shape
    score_u8 = np.expand_dims((score_map * 255).astype(np.uint8), 2)
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


def ms_per_image(fn, maps, repeat):
    """Best of `repeat` passes over the maps, in milliseconds per map."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for m in maps:
            fn(m)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(maps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-maps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    maps = random_maps(args.num_maps)
    cv2.setNumThreads(1)

    def sat_fast(m):
        return boxes_at_thresholds(normalize_map_sat(m), TRAIN_THRESHOLDS)

    def wsol_fast(m):
        return contour_boxes(wsol_score_map(m), CAM_THRESHOLDS)

    def wsol_naive(m):
        return naive_wsol_boxes(wsol_score_map(m), CAM_THRESHOLDS)

    same = all(np.array_equal(sat_fast(m), naive_sat_boxes(m, TRAIN_THRESHOLDS)) for m in maps) and all(
        np.array_equal(np.concatenate(f[0]), np.concatenate(n[0])) and np.array_equal(f[1], n[1])
        for f, n in ((wsol_fast(m), wsol_naive(m)) for m in maps))
    result = {
        "num_maps": len(maps),
        "sat_thresholds": len(TRAIN_THRESHOLDS),
        "sat_ms_per_image": ms_per_image(sat_fast, maps, args.repeat),
        "sat_naive_ms_per_image": ms_per_image(lambda m: naive_sat_boxes(m, TRAIN_THRESHOLDS), maps, args.repeat),
        "wsol_thresholds": len(CAM_THRESHOLDS),
        "wsol_ms_per_image": ms_per_image(wsol_fast, maps, args.repeat),
        "wsol_naive_ms_per_image": ms_per_image(wsol_naive, maps, args.repeat),
        "identical_boxes": bool(same),
        "opencv_threads": 1,
    }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
