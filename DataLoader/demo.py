"""Synthetic demo dataset in the CUB-200-2011 release format, so that everything runs without downloads.

Each class is one large object with its own shape and two-colour pattern, covering 10-40% of the image
(box area) at a random position and aspect ratio. Objects are saturated and patterned; the background is
cluttered but muted, the same for every class: smooth grey-ish noise, pixel noise and small solid shapes of
every class's shape in low-saturation colours. So the clutter tells nothing about the class, a model has to
find the object, and what sets objects apart from clutter (saturated colour, pattern, size) is shared by all
classes -- SAT's one class-agnostic localization map can learn it. The box is the object's exact pixel extent.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import ConfigError
from utils.outputs import write_text_atomic

DEFAULT_DEMO_ROOT = Path(__file__).resolve().parents[1] / "data" / "demo_cub"
MANIFEST = "demo_manifest.json"
GENERATOR = "SAT synthetic demo v3"

# Masks in the object's frame: u, v in [-1, 1] across its box.
SHAPES = {
    "disc": lambda u, v: u ** 2 + v ** 2 <= 1,
    "square": lambda u, v: np.ones_like(u, bool),
    "triangle": lambda u, v: np.abs(u) <= (v + 1) / 2,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "cross": lambda u, v: (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34),
    "ring": lambda u, v: (u ** 2 + v ** 2 <= 1) & (u ** 2 + v ** 2 >= 0.2),
}
# Where the second colour goes.
PATTERNS = {
    "rings": lambda u, v: np.floor(np.hypot(u, v) * 4) % 2 == 1,
    "checker": lambda u, v: (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 1,
    "hstripes": lambda u, v: np.floor((v + 1) * 3) % 2 == 1,
    "vstripes": lambda u, v: np.floor((u + 1) * 3) % 2 == 1,
    "dots": lambda u, v: ((u * 2.5) % 1 - 0.5) ** 2 + ((v * 2.5) % 1 - 0.5) ** 2 < 0.09,
    "sectors": lambda u, v: np.floor((np.arctan2(v, u) + np.pi) / (np.pi / 4)) % 2 == 1,
}
# name, shape, pattern, first colour, second colour
CLASS_TEMPLATES = (
    ("Ringed_Disc", "disc", "rings", (220, 50, 40), (250, 210, 50)),
    ("Checkered_Square", "square", "checker", (40, 80, 220), (250, 220, 40)),
    ("Striped_Triangle", "triangle", "hstripes", (30, 160, 60), (20, 20, 20)),
    ("Dotted_Diamond", "diamond", "dots", (230, 40, 150), (250, 240, 60)),
    ("Barred_Cross", "cross", "vstripes", (250, 140, 20), (100, 40, 160)),
    ("Sectored_Ring", "ring", "sectors", (30, 190, 200), (220, 50, 40)),
)


def _frame(size, x0, y0, width, height):
    """u, v coordinates of every pixel centre in the frame of the box (x0, y0, width, height)."""
    grid = np.arange(size) + 0.5
    u = (grid[None, :] - x0 - width / 2) / (width / 2)
    v = (grid[:, None] - y0 - height / 2) / (height / 2)
    return np.broadcast_to(u, (size, size)), np.broadcast_to(v, (size, size))


def _inside(u, v):
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)


def _background(rng, size):
    """Muted clutter, independent of the class: smooth grey-ish noise with a faint tint, pixel noise and
    small solid distractor shapes in low-saturation colours near the background's brightness."""
    grey = rng.uniform(70, 190, (5, 5, 1))
    coarse = np.clip(grey + rng.uniform(-12, 12, (5, 5, 3)), 0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
    image += rng.normal(0, 8, image.shape)
    shapes = list(SHAPES.values())
    for _ in range(rng.integers(10, 19)):
        side = rng.uniform(0.05, 0.12) * size
        u, v = _frame(size, *rng.uniform(-side / 2, size - side / 2, 2), side, side)
        mask = _inside(u, v) & shapes[rng.integers(len(shapes))](u, v)
        if mask.any():
            level = image[mask].mean() + rng.choice([-1, 1]) * rng.uniform(20, 45)
            image[mask] = level + rng.uniform(-12, 12, 3)
    return image


def render_image(rng, template, size):
    """(uint8 HxWx3 image, box [x0, y0, x1, y1]) of one object of ``template`` on a cluttered background."""
    _, shape, pattern, first, second = template
    image = _background(rng, size)
    area, aspect = rng.uniform(0.10, 0.40), np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    width = min(size * np.sqrt(area * aspect), 0.95 * size)
    height = min(size * np.sqrt(area / aspect), 0.95 * size)
    x0, y0 = rng.uniform(0, size - width), rng.uniform(0, size - height)
    u, v = _frame(size, x0, y0, width, height)
    mask = _inside(u, v) & SHAPES[shape](u, v)
    shade = rng.uniform(0.85, 1.15)
    colours = np.where(PATTERNS[pattern](u, v)[..., None], second, first) * shade
    image[mask] = colours[mask] + rng.normal(0, 6, (mask.sum(), 3))
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return np.clip(image, 0, 255).astype(np.uint8), box


def _write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _complete(root):
    """Whether every file the demo's images.txt lists, and the annotation files, are there (a file deleted since
    it was made: the demo is written again rather than refused as a broken dataset)."""
    names = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")
    if not all((root / name).is_file() for name in names):
        return False
    lines = (root / "images.txt").read_text(encoding="utf-8").splitlines()
    return all((root / "images" / line.split(maxsplit=1)[1]).is_file() for line in lines if line.strip())


def make_demo_dataset(root=DEFAULT_DEMO_ROOT, num_classes=5, train_per_class=50, test_per_class=20,
                      image_size=144, seed=0):
    """Write the demo dataset as a CUB-200-2011 release under ``root`` and return ``root``.

    Deterministic for the same arguments; a no-op when ``root`` already holds a complete dataset made
    with them (the manifest is written last, so an interrupted run is regenerated).
    """
    if not 2 <= num_classes <= len(CLASS_TEMPLATES):
        raise ConfigError(f"demo classes must be 2..{len(CLASS_TEMPLATES)}, got {num_classes}")
    if min(train_per_class, test_per_class) < 1 or image_size < 32:
        raise ConfigError(f"demo needs at least 1 train and 1 test image per class and images of 32 px or more, "
                          f"got {train_per_class}, {test_per_class}, {image_size}")
    root = Path(root)
    params = {"generator": GENERATOR, "num_classes": num_classes, "train_per_class": train_per_class,
              "test_per_class": test_per_class, "image_size": image_size, "seed": seed}
    manifest = root / MANIFEST
    if manifest.is_file() and _read_manifest(manifest) == params and _complete(root):
        return root
    _check_not_a_dataset(root)
    manifest.unlink(missing_ok=True)

    templates = CLASS_TEMPLATES[:num_classes]
    images, labels, splits, boxes = [], [], [], []
    for label, template in enumerate(templates):
        folder = _class_folder(label)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for k in range(train_per_class + test_per_class):
            rng = np.random.default_rng([seed, label, k])
            pixels, (x0, y0, x1, y1) = render_image(rng, template, image_size)
            relpath = f"{folder}/{template[0]}_{k + 1:04d}.jpg"
            Image.fromarray(pixels).save(root / "images" / relpath, quality=92)
            image_id = len(images) + 1
            images.append(f"{image_id} {relpath}")
            labels.append(f"{image_id} {label + 1}")
            splits.append(f"{image_id} {int(k < train_per_class)}")
            boxes.append(f"{image_id} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
    _write_lines(root / "classes.txt", [f"{label + 1} {_class_folder(label)}" for label in range(num_classes)])
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", splits), ("bounding_boxes.txt", boxes)):
        _write_lines(root / name, lines)
    write_text_atomic(manifest, json.dumps(params, indent=1))
    return root


def _class_folder(label):
    """The folder (and class name) of class ``label`` (0-based): '001.Ringed_Disc', as CUB names its classes."""
    return f"{label + 1:03d}.{CLASS_TEMPLATES[label][0]}"


def _read_manifest(path):
    """The manifest's parameters, or None for one that is not JSON (an earlier version's, written in place, cut
    short by a kill): the folder is generated again."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _check_not_a_dataset(root):
    """A ConfigError for a folder whose images.txt lists no demo image (e.g. tools/make_demo_data.py
    --output-dir data/CUB_200_2011): the demo writes its own annotation files over the ones there."""
    try:
        lines = [line.split() for line in (root / "images.txt").read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError):
        lines = [["?", "?"]]
    demo = {_class_folder(label) for label in range(len(CLASS_TEMPLATES))}
    listed = [fields[1] for fields in lines if len(fields) > 1]
    if listed and not any(path.split("/")[0] in demo for path in listed):
        raise ConfigError(f"{root / 'images.txt'}: lists images of another dataset ({listed[0]}, ...), not the "
                          "demo's: the demo is written into a folder of its own (an empty or new one)")
