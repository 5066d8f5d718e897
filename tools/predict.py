"""Predict the class and the object box of single images with a SAT checkpoint (CPU is fine).

Each image goes through the protocol A view (Resize((256, 256)) -> CenterCrop(224), scaled to the model's
input size); the box found at the threshold in the crop is mapped back to the original image's pixels.
Writes ``<output-dir>/predictions.json`` and one overlay PNG per image, and prints one line per image.

    python tools/predict.py --checkpoint best.pth --output-dir preds photo.jpg more_photos/
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import DataError, run_cli  # noqa: E402


def image_paths(inputs):
    """The image files among ``inputs`` and, recursively and sorted, inside the folders among them."""
    from DataLoader.folder import is_image_file

    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name))
            if not found:
                raise DataError(f"{path}: no image files in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path}: not found (expected an image file or a folder of images)")
    return paths


def load_rgb(path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None


def crop_offset(resize_size, img_size):
    """Left/top of torchvision's CenterCrop(img_size) in the resize_size x resize_size image."""
    return int(round((resize_size - img_size) / 2.0))


def crop_box_to_original(box, size, resize_size, img_size):
    """An (exclusive-max) box in the centre crop -> original pixels (W, H = size), clipped to the image."""
    width, height = size
    offset = crop_offset(resize_size, img_size)
    scale = np.array([width, height, width, height]) / resize_size
    original = (np.asarray(box, np.float64) + offset) * scale
    return np.clip(original, 0, [width, height, width, height])


def full_image_map(score, resize_size, img_size):
    """A crop-frame [0, 1] map placed in the resized frame (zeros outside the crop), for overlays."""
    canvas = np.zeros((resize_size, resize_size), np.float32)
    offset = crop_offset(resize_size, img_size)
    canvas[offset:offset + img_size, offset:offset + img_size] = score
    return canvas


def _unique_png(output_dir, stem, used):
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return output_dir / f"{name}.png"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", help="architecture, for files that do not record it (official releases)")
    parser.add_argument("--num-classes", type=int, help="classes, for files that do not record them")
    parser.add_argument("--threshold", type=float,
                        help="localization threshold (default: the checkpoint's best_thr, else 0.4)")
    parser.add_argument("--resize-size", type=int,
                        help="resize before the centre crop (default: the checkpoint's training setting, "
                             "else 256/224 x the input size)")
    parser.add_argument("--output-dir", default="output/predict", help="default: output/predict")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    import torch

    from DataLoader.transforms import test_transform
    from utils.checkpoint import build_model_from_checkpoint
    from utils.distributed import select_device
    from utils.evaluation import default_resize_size
    from utils.metrics_sat import boxes_at_thresholds, normalize_map_sat
    from utils.visualize import render_overlay, save_rgb

    paths = image_paths(args.inputs)
    device = select_device(args.device)
    model, meta = build_model_from_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    model.to(device).eval()
    img_size = int(model.patch_embed.img_size[0])
    resize_size = (args.resize_size or (meta.get("config") or {}).get("resize_size")
                   or default_resize_size(img_size))
    threshold = args.threshold if args.threshold is not None else float(meta.get("best_thr") or 0.4)
    names = meta.get("class_names") or [str(k) for k in range(model.num_classes)]
    transform = test_transform(img_size, resize_size)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    predictions, used = [], set()
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        images = [load_rgb(path) for path in chunk]
        with torch.inference_mode():
            logits, maps = model(torch.stack([transform(image) for image in images]).to(device))
        probs = logits.float().softmax(dim=1).cpu()
        top = probs.topk(min(5, model.num_classes), dim=1)
        for k, (path, image) in enumerate(zip(chunk, images)):
            score = normalize_map_sat(maps[k].float().cpu(), img_size)
            crop_box = boxes_at_thresholds(score, [threshold])[0]
            box = crop_box_to_original(crop_box, image.size, resize_size, img_size)
            classes = top.indices[k].tolist()
            pred = {"image": str(path), "class": classes[0], "class_name": names[classes[0]],
                    "score": float(top.values[k, 0]),
                    "top5": [{"class": c, "class_name": names[c], "score": float(p)}
                             for c, p in zip(classes, top.values[k].tolist())],
                    "box": [round(float(v), 1) for v in box], "image_size": list(image.size)}
            overlay = render_overlay(np.asarray(image), full_image_map(score, resize_size, img_size), box,
                                     caption=f"{pred['class_name']} {pred['score']:.0%}")
            pred["overlay"] = str(save_rgb(_unique_png(output_dir, path.stem, used), overlay))
            predictions.append(pred)
            print(f"{path}: {pred['class_name']} ({pred['score']:.1%}) box {pred['box']}")
    record = {"checkpoint": str(args.checkpoint), "threshold": threshold, "img_size": img_size,
              "resize_size": resize_size, "predictions": predictions}
    (output_dir / "predictions.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{len(predictions)} predictions written to {output_dir / 'predictions.json'}")
    return record


if __name__ == "__main__":
    run_cli(main)
