"""Draw the README figures: the architecture diagram and a grid of demo overlays (OpenCV).

    python tools/make_figures.py [--demo-run output/demo] [--output-dir img]

writes img/architecture.png and, when the demo run's overlays exist (``python train.py --config
config/demo.yaml``), img/demo_overlays.png with the first images of each class; one line says what was drawn
and what was skipped (why). img/ holds the README's figures: to look at your own run's grid, give another
--output-dir.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import OneLineParser, at_least  # noqa: E402
from utils.errors import ConfigError, DataError, run_cli, writing_outputs  # noqa: E402
from utils.visualize import fit_scale, write_image  # noqa: E402

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (40, 40, 40)
BLUE = (222, 160, 80)      # BGR
ORANGE = (60, 150, 245)
GREEN = (110, 190, 90)
GREY = (215, 215, 215)
PURPLE = (200, 120, 170)


def box(img, x0, y0, x1, y1, fill, text="", scale=0.5, text_color=INK):
    cv2.rectangle(img, (x0, y0), (x1, y1), fill, -1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), INK, 1, cv2.LINE_AA)
    lines = text.split("\n")
    scale = fit_scale(lines, x1 - x0 - 16, scale, font=FONT)  # a margin of 8 px whatever OpenCV's font metrics
    for i, line in enumerate(lines):
        (w, h), _ = cv2.getTextSize(line, FONT, scale, 1)
        n = len(lines)
        y = (y0 + y1) // 2 + h // 2 + int((i - (n - 1) / 2) * (h + 6))
        cv2.putText(img, line, ((x0 + x1 - w) // 2, y), FONT, scale, text_color, 1, cv2.LINE_AA)


def arrow(img, p, q, color=INK):
    length = max(1, int(np.hypot(q[0] - p[0], q[1] - p[1])))
    cv2.arrowedLine(img, p, q, color, 2, cv2.LINE_AA, tipLength=12 / length)  # 12 px heads


def label(img, text, x, y, scale=0.5, color=INK):
    cv2.putText(img, text, (x, y), FONT, scale, color, 1, cv2.LINE_AA)


def draw() -> np.ndarray:
    img = np.full((520, 1180, 3), 255, np.uint8)
    label(img, "SAT: Spatial-Aware Token for weakly supervised object localization", 20, 28, 0.7)

    # token sequence
    label(img, "tokens", 20, 78)
    box(img, 90, 60, 130, 92, GREY, "cls", 0.45)
    for i in range(6):
        box(img, 135 + 38 * i, 60, 170 + 38 * i, 92, BLUE, "p" if i < 5 else "...", 0.45)
    box(img, 370, 60, 440, 92, ORANGE, "spatial", 0.45)
    label(img, "DeiT patch tokens + pos_embed", 135, 54, 0.42)
    label(img, "+ loc_embed (own)", 360, 54, 0.42)

    # backbone blocks
    box(img, 90, 140, 440, 190, GREY, "blocks 1 .. L-3: standard self-attention")
    for j, y in enumerate((215, 285, 355)):
        box(img, 90, y, 440, y + 50, BLUE, f"spatial-aware block {j + 1}: softmax(QK^T/sqrt(d)) @ (P * V)", 0.45)
        arrow(img, (440, y + 25), (560, y + 25), ORANGE)
        box(img, 560, y + 5, 760, y + 45, ORANGE, f"P{j + 1} = sigmoid(mean_h A[spatial, :])", 0.42)
    for y0, y1 in ((92, 140), (190, 215), (265, 285), (335, 355)):
        arrow(img, (265, y0), (265, y1))

    # localization branch
    box(img, 820, 280, 1000, 330, ORANGE, "map M = mean(P1..P3)\npatch positions, 14x14", 0.42)
    for y in (240, 310, 380):
        arrow(img, (760, y), (820, 305), ORANGE)
    box(img, 1030, 220, 1160, 270, PURPLE, "area loss\n|mean(M) - lambda|", 0.42)
    box(img, 1030, 340, 1160, 390, PURPLE, "norm loss\nmean((1-M')M')", 0.42)
    arrow(img, (1000, 295), (1030, 250), PURPLE)
    arrow(img, (1000, 315), (1030, 365), PURPLE)

    # classification branch
    arrow(img, (265, 405), (265, 430))
    box(img, 90, 430, 440, 470, GREEN, "LayerNorm -> patch grid -> conv 3x3 -> GAP -> logits", 0.45)
    arrow(img, (440, 450), (560, 450), GREEN)
    box(img, 560, 430, 760, 470, PURPLE, "cross-entropy", 0.45)
    label(img, "P gates every query's attention to key k by P[k] (foreground probability).", 20, 505, 0.45)
    return img


def read_tile(path: Path, tile: int) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise DataError(f"{path}: not a readable PNG")
    return cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)


def overlay_grid(image_dir: Path, per_class: int = 4, tile: int = 160) -> np.ndarray:
    """Rows of classes, ``per_class`` overlays each (sorted file names), every tile ``tile`` px. A row is each
    folder holding PNGs, at any depth (CUB: overlays/<class>/; folder datasets: overlays/test/<class>/)."""
    folders = sorted({p.parent for p in image_dir.rglob("*.png") if p.is_file() and p.parent != image_dir})
    rows = []
    for class_dir in folders:
        tiles = [read_tile(f, tile) for f in sorted(f for f in class_dir.glob("*.png") if f.is_file())[:per_class]]
        tiles += [np.full((tile, tile, 3), 255, np.uint8)] * (per_class - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise DataError(f"{image_dir}: no overlays (class folders of PNGs) in it")
    return np.concatenate(rows, axis=0)


def main(argv=None):
    repo = Path(__file__).resolve().parents[1]
    default_run = repo / "output" / "demo"
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--output-dir", default=str(repo / "img"),
                        help="folder the PNGs are written to (default: the README's own figures, %(default)s)")
    parser.add_argument("--demo-run", help=f"output folder of a demo run (default: {default_run}, when it exists)")
    parser.add_argument("--per-class", type=at_least(1), default=4,
                        help="overlays per class in the demo grid (default %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: not a folder")
    images = Path(args.demo_run or default_run) / "overlays"
    if args.demo_run and not images.is_dir():
        raise DataError(f"--demo-run {args.demo_run}: no overlays/ folder (expected the output folder of a demo run)")
    with writing_outputs(out):  # a full disk, a folder that cannot be written: one line naming the file
        out.mkdir(parents=True, exist_ok=True)
        write_image(out / "architecture.png", draw())
        if images.is_dir():
            write_image(out / "demo_overlays.png", overlay_grid(images, args.per_class))
    if images.is_dir():
        print(f"drew {out / 'architecture.png'} and {out / 'demo_overlays.png'} (from {images})")
    else:
        print(f"drew {out / 'architecture.png'}; skipped demo_overlays.png: no demo run at {images.parent} "
              "(python train.py --config config/demo.yaml writes one; or give --demo-run)")


if __name__ == "__main__":
    run_cli(main)
