"""Write a synthetic CUB-200-2011 release of photo-sized JPEGs for measuring the input pipeline
(``tools/benchmark.py --data-root``, ``evaluator.py --data-root``) where the real data is not at hand.

    python tools/make_benchmark_data.py --output-dir /tmp/bench_cub --train 2000 --test 2000

Images are 300-500 px a side (CUB's are about 500 x 375) with smooth colour fields, an ellipse (its box in
bounding_boxes.txt) and sensor-like noise, saved at JPEG quality 90: their decoding cost is close to real
photos', which is what the benchmark measures. Written by ``--processes`` processes; deterministic.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import run_cli  # noqa: E402


def render(index, seed, min_size, max_size):
    """Image ``index``: uint8 (H, W, 3) pixels and its ellipse's box (x, y, width, height)."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    w, h = rng.uniform(0.2, 0.7) * width, rng.uniform(0.2, 0.7) * height
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    ImageDraw.Draw(field).ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(field, np.int16) + rng.integers(-6, 7, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), (x, y, w, h)


def write_image(job):
    index, root, relpath, seed, min_size, max_size = job
    pixels, box = render(index, seed, min_size, max_size)
    Image.fromarray(pixels).save(Path(root) / "images" / relpath, quality=90)
    return box


def make_benchmark_data(root, train, test, num_classes=200, min_size=300, max_size=500, seed=0, processes=None):
    root = Path(root)
    classes = [f"{c + 1:03d}.class_{c + 1:03d}" for c in range(num_classes)]
    for name in classes:
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
    total = train + test
    labels = [i % num_classes for i in range(total)]
    paths = [f"{classes[label]}/image_{i + 1:06d}.jpg" for i, label in enumerate(labels)]
    jobs = [(i, str(root), path, seed, min_size, max_size) for i, path in enumerate(paths)]
    with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        boxes = list(pool.map(write_image, jobs, chunksize=32))
    rows = range(1, total + 1)
    files = {
        "classes.txt": [f"{c + 1} {name}" for c, name in enumerate(classes)],
        "images.txt": [f"{i} {path}" for i, path in zip(rows, paths)],
        "image_class_labels.txt": [f"{i} {label + 1}" for i, label in zip(rows, labels)],
        # the first ``train`` images train, the rest test (1 = training image, as CUB)
        "train_test_split.txt": [f"{i} {int(i <= train)}" for i in rows],
        "bounding_boxes.txt": [f"{i} {x:.1f} {y:.1f} {w:.1f} {h:.1f}" for i, (x, y, w, h) in zip(rows, boxes)],
    }
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=2000, help="test images")
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--min-size", type=int, default=300)
    parser.add_argument("--max-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=None, help="default: one per core")
    args = parser.parse_args(argv)
    root = make_benchmark_data(args.output_dir, args.train, args.test, args.num_classes, args.min_size, args.max_size,
                               args.seed, args.processes)
    print(f"{args.train} train + {args.test} test images at {root}")


if __name__ == "__main__":
    run_cli(main)
