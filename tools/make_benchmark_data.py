"""Write a synthetic CUB-200-2011 release of photo-sized JPEGs for measuring the input pipeline
(``tools/benchmark.py --data-root``, ``evaluator.py --data-root``) where the real data is not at hand.

    python tools/make_benchmark_data.py --output-dir /tmp/bench_cub --train 2000 --test 2000

Images are 300-500 px a side (CUB's are about 500 x 375) with smooth colour fields, an ellipse (its box in
bounding_boxes.txt) and sensor-like noise, saved at JPEG quality 90: their decoding cost is close to real
photos', which is what the benchmark measures. The labels say nothing about the pixels. ``--learnable``
draws instead each class's own object (DataLoader/demo.py's generator: a shape, a pattern and two colours
per class, on a cluttered background shared by all classes; square images of 300-500 px) with its exact box,
so that classification and localization can be learned (accuracy checks). Written by ``--processes``
processes; deterministic.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader.demo import CLASS_TEMPLATES, PATTERNS, SHAPES, render_image  # noqa: E402
from utils.config import OneLineParser, at_least  # noqa: E402
from utils.errors import ConfigError, run_cli  # noqa: E402


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


def learnable_template(label):
    """Class ``label``'s object for DataLoader.demo.render_image: every combination of the demo's shapes,
    patterns and colour pairs (the shape changes fastest), so that classes below 36 differ in shape or pattern."""
    shapes, patterns = list(SHAPES), list(PATTERNS)
    first, second = CLASS_TEMPLATES[label // (len(shapes) * len(patterns))][3:]
    return (f"class_{label + 1:03d}", shapes[label % len(shapes)],
            patterns[label // len(shapes) % len(patterns)], first, second)


# classes --learnable can tell apart
LEARNABLE_CLASSES = len(SHAPES) * len(PATTERNS) * len(CLASS_TEMPLATES)


def render_learnable(index, label, seed, min_size, max_size):
    """Image ``index`` of class ``label`` drawn by the demo generator: pixels and box (x, y, width, height)."""
    rng = np.random.default_rng([seed, index])
    pixels, (x0, y0, x1, y1) = render_image(rng, learnable_template(label), int(rng.integers(min_size, max_size + 1)))
    return pixels, (x0, y0, x1 - x0, y1 - y0)


def draw_photo(job):
    """One image of the dataset (a pool job): rendered, saved as a JPEG under images/; returns its box."""
    index, label, root, relpath, seed, min_size, max_size, learnable = job
    pixels, box = render_learnable(index, label, seed, min_size, max_size) if learnable \
        else render(index, seed, min_size, max_size)
    Image.fromarray(pixels).save(Path(root) / "images" / relpath, quality=90)
    return box


def make_benchmark_data(root, train, test, num_classes=200, min_size=300, max_size=500, seed=0, processes=None,
                        learnable=False):
    if learnable and num_classes > LEARNABLE_CLASSES:
        raise ConfigError(f"--learnable draws at most {LEARNABLE_CLASSES} distinct classes, got --num-classes "
                          f"{num_classes}")
    root = Path(root)
    classes = [f"{c + 1:03d}.class_{c + 1:03d}" for c in range(num_classes)]
    for name in classes:
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
    total = train + test
    labels = [i % num_classes for i in range(total)]
    paths = [f"{classes[label]}/image_{i + 1:06d}.jpg" for i, label in enumerate(labels)]
    jobs = [(i, label, str(root), path, seed, min_size, max_size, learnable)
            for i, (label, path) in enumerate(zip(labels, paths))]
    with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        boxes = list(pool.map(draw_photo, jobs, chunksize=32))
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
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--output-dir", required=True, help="a new or empty folder")
    parser.add_argument("--train", type=at_least(1), default=2000, help="training images (default %(default)s)")
    parser.add_argument("--test", type=at_least(1), default=2000, help="test images (default %(default)s)")
    parser.add_argument("--num-classes", type=at_least(1), default=200, help="default %(default)s")
    parser.add_argument("--min-size", type=at_least(32), default=300,
                        help="smallest image side in pixels (default %(default)s)")
    parser.add_argument("--max-size", type=at_least(32), default=500,
                        help="largest image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--processes", type=at_least(1), default=None, help="default: one per core")
    parser.add_argument("--learnable", action="store_true",
                        help=f"each class its own object (at most {LEARNABLE_CLASSES} classes), exact boxes")
    args = parser.parse_args(argv)
    if args.max_size < args.min_size:
        raise ConfigError(f"--max-size {args.max_size} is below --min-size {args.min_size}")
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output-dir {output}: {'not a folder' if not output.is_dir() else 'not empty'}; "
                          "expected a new or empty folder (images of another set would stay in it)")
    root = make_benchmark_data(args.output_dir, args.train, args.test, args.num_classes, args.min_size, args.max_size,
                               args.seed, args.processes, args.learnable)
    print(f"{args.train} train + {args.test} test images at {root}")


if __name__ == "__main__":
    run_cli(main)
