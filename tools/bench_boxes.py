"""Micro-benchmark of map -> box extraction: ms/image, vectorised utils vs naive references.

Protocol A: 4 thresholds, official SAT rule; protocol B: 100 thresholds, wsolevaluation contours.
The naive references (tests/reference_boxes.py, the test oracles) follow the original code's structure:
per threshold, binarise, label or find contours, then per-component / per-contour work. Prints one JSON line.

    python tools/bench_boxes.py [--num-maps 64] [--repeat 3]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from reference_boxes import naive_sat_boxes, naive_wsol_boxes, random_maps  # noqa: E402
from utils.metrics_sat import TRAIN_THRESHOLDS, boxes_at_thresholds, normalize_map_sat  # noqa: E402
from utils.metrics_wsol import CAM_THRESHOLDS, contour_boxes, wsol_score_map  # noqa: E402


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
