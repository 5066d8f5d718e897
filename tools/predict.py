"""Predict the class and the object box of single images with a SAT checkpoint (CPU is fine).

Each image goes through the ``centre`` view (Resize((256, 256)) -> CenterCrop(224), scaled to the model's
input size); the box found at the threshold in the crop is mapped back to the original image's pixels.
Writes ``<output-dir>/predictions.json`` and one overlay PNG per image, prints one line per image and,
with ``--save-boxes FILE``, writes the boxes as COCO-format pseudo-labels (bbox = [x, y, w, h] in original pixels,
category_id = class index + 1, categories named from the checkpoint). ``--overlay-blocks`` also draws the map of
each spatial-aware block beside the fused map. An image given twice is predicted once; an unreadable one
is named and skipped. An --output-dir holding earlier predictions is refused unless --overwrite; overlay
names never replace a file already there. A run that fails leaves no new folder behind.

    python tools/predict.py --checkpoint best.pth --output-dir preds photo.jpg more_photos/
    python tools/predict.py --checkpoint best.pth --save-boxes pseudo_labels.json images/
    python tools/predict.py --checkpoint best.pth --overlay-blocks photo.jpg
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader.dataset import rgb, why_unreadable  # noqa: E402
from DataLoader.eval_views import EvalViews  # noqa: E402
from DataLoader.formats.folder import is_image_file  # noqa: E402
from utils.boxes import centre_offset, coco_detections, crop_box_to_original, sat_boxes, sat_map  # noqa: E402
from Model import build_model_from_checkpoint  # noqa: E402
from Model.build import square_img_size  # noqa: E402
from utils.config import EVALUATOR_BATCH, FIELDS, SCRIPTS, OneLineParser, at_least, script_defaults  # noqa: E402
from utils.distributed import select_device  # noqa: E402
from utils.engine import NonFiniteOutputError, check_finite  # noqa: E402
from utils.errors import ConfigError, DataError, run_cli, writing_outputs  # noqa: E402
from utils.outputs import (PARTIAL, FolderLock, Staged, check_output_file, partial_name,  # noqa: E402
                           previous_outputs, removed_if_failed)
from utils.preemption import ignore_stop_signals, stopped_as_said, work_complete  # noqa: E402
from utils.visualize import render_overlay, save_rgb  # noqa: E402


def image_paths(inputs, outputs=()):
    """The image files among ``inputs`` and, recursively and sorted, inside the folders among them but not
    among ``outputs`` (the overlays of earlier predictions: resolved paths); a file reached twice (also through
    a link) is kept once, where it first comes."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p.name)
                           and p.resolve() not in outputs)
            if not found:
                raise DataError(f"{path}: no image files in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path}: not found (expected an image file or a folder of images)")
    unique = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_rgb(path):
    """The image as RGB, turned as its EXIF orientation says (as viewers show photos; the datasets' images are
    read as stored, as the official code reads them); any failure to decode it is a DataError."""
    try:
        with Image.open(path) as image:
            return rgb(ImageOps.exif_transpose(image))
    except Exception as err:
        raise DataError(f"{path}: not a readable image ({why_unreadable(path, err)})") from None


def full_image_map(score, resize_size, img_size):
    """A crop-frame [0, 1] map placed in the resized frame (zeros outside the crop), for overlays."""
    canvas = np.zeros((resize_size, resize_size), np.float32)
    offset = centre_offset(resize_size, img_size)
    canvas[offset:offset + img_size, offset:offset + img_size] = score
    return canvas


def map_overlay(image, loc_map, threshold, resize_size, img_size, caption):
    """(box in original pixels, overlay) of one localization map of the centre crop: normalised as the sat
    protocol does, boxed at ``threshold``."""
    score = sat_map(loc_map.float().cpu(), img_size)
    crop_box = sat_boxes(score, [threshold])[0]
    box = [float(v) for v in crop_box_to_original(crop_box, image.size, resize_size, img_size)]
    return box, render_overlay(np.asarray(image), full_image_map(score, resize_size, img_size), box, caption=caption)


def previous_predictions(output_dir, overwrite):
    """The files of the predictions ``output_dir`` holds, which this run replaces with --overwrite (refused
    without): predictions.json and the PNGs it names, those no newer than it (a file saved there since under
    such a name is not this tool's)."""
    record = Path(output_dir) / "predictions.json"
    found = previous_outputs(output_dir, ["predictions.json"], overwrite, "prediction run")
    if not found:
        return []
    try:
        old = json.loads(record.read_text(encoding="utf-8"))["predictions"]
        pngs = [Path(p[key]).name for p in old for key in ("overlay", "blocks_overlay") if key in p]
    except (ValueError, KeyError, TypeError):
        pngs = []  # not written by this tool: only the json is replaced
    written = record.stat().st_mtime
    return found + [png for png in pngs if (Path(output_dir) / png).is_file()
                    and (Path(output_dir) / png).stat().st_mtime <= written + 1]


def discard_leftovers(output_dir, inputs):
    """Delete the partial files a killed run left in ``output_dir`` (never an input image)."""
    for path in Path(output_dir).glob(f"*{PARTIAL}.*"):
        if path.is_file() and path.resolve() not in inputs:
            path.unlink()


def recorded_threshold(path, meta, num_classes):
    """The map threshold the checkpoint records (best_thr, selected in training), else the evaluators' default
    for a model of ``num_classes`` (ImageNet's for 1000 classes, official ImageNet files recording best_thr 0, and
    for a model this project trained on ImageNet data, a class subset included), said in a line."""
    if meta.get("best_thr"):
        return float(meta["best_thr"])
    imagenet = num_classes == 1000 or (meta.get("config") or {}).get("data_format") == "imagenet"
    script = "evaluate_imagenet" if imagenet else "evaluate"
    threshold = script_defaults(script)["threshold"]
    print(f"{path} records no map threshold (best_thr {meta.get('best_thr')}): using {threshold}, "
          f"{SCRIPTS[script].file}'s default", file=sys.stderr)
    return threshold


# The most bytes of an input's file name an overlay's name keeps: with "_blocks", a "_<k>" and ".partial.png" (its
# name until the run is complete) it stays within the 255 bytes file systems allow.
OVERLAY_STEM_BYTES = 200


def overlay_stem(stem):
    """``stem`` cut to OVERLAY_STEM_BYTES bytes of UTF-8 (at a character's boundary)."""
    encoded = stem.encode("utf-8", "surrogateescape")
    return stem if len(encoded) <= OVERLAY_STEM_BYTES else \
        encoded[:OVERLAY_STEM_BYTES].decode("utf-8", "ignore")


def _unique_png(output_dir, stem, used, free):
    """A new PNG path in ``output_dir``: never a file already there (an input image may live in it) unless
    it is in ``free`` (an earlier run's overlay, replaced), nor a name in ``used`` (this run's overlays and its
    --save-boxes file)."""
    name, k = stem, 1
    while name in used or (f"{name}.png" not in free and (output_dir / f"{name}.png").exists()):
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return output_dir / f"{name}.png"


# Flags of earlier versions, named as the evaluators name them now.
RENAMED = {"--coco": "--save-boxes", "--blocks": "--overlay-blocks", "--batch-size": "--eval-batch-size"}


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files, or folders of them")
    parser.add_argument("--checkpoint", required=True,
                        help="this project's checkpoint or an official release file")
    parser.add_argument("--arch", help="architecture (default: recorded in the file, or read off its weights' shapes)")
    parser.add_argument("--num-classes", type=int, help="classes (default: read off the head's shape)")
    parser.add_argument("--threshold", type=FIELDS["threshold"].parse,
                        help="map threshold (default: the checkpoint's best_thr, else the evaluators' "
                             "default: evaluator_ImageNet.py's for a 1000-class model or one trained on ImageNet "
                             "data, evaluator.py's for others)")
    parser.add_argument("--resize-size", type=at_least(1),
                        help="resize before the centre crop (default: the checkpoint's training setting, "
                             "else 256/224 x the input size)")
    parser.add_argument("--output-dir", default="output/predict", help="default: output/predict")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the predictions --output-dir holds (predictions.json and its overlays) and "
                             "an earlier --save-boxes file; without it they are refused")
    parser.add_argument("--eval-batch-size", type=at_least(1), default=EVALUATOR_BATCH,
                        help="images per batch, as the evaluators' (default %(default)s)")
    parser.add_argument("--device", default="auto", type=FIELDS["device"].parse, help=FIELDS["device"].help,
                        metavar="{" + ",".join(FIELDS["device"].choices) + "}")
    parser.add_argument("--save-boxes", metavar="FILE", help="also write the boxes as a COCO-format detection file")
    parser.add_argument("--overlay-blocks", action="store_true",
                        help="also write <image>_blocks.png: the map of each spatial-aware block and the fused map "
                             "side by side, each boxed at the threshold")
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    renamed = next((arg.split("=")[0] for arg in argv if arg.split("=")[0] in RENAMED), None)
    if renamed:
        raise ConfigError(f"{renamed} was renamed: use {RENAMED[renamed]} (as the evaluators call it)")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    if args.save_boxes:
        check_output_file(args.save_boxes, args.overwrite,
                          outputs=[output_dir / "predictions.json", output_dir / partial_name("predictions.json")])
    previous = previous_predictions(output_dir, args.overwrite)
    paths = image_paths(args.inputs, outputs={(output_dir / name).resolve() for name in previous})
    inputs = {path.resolve() for path in paths}
    previous = [name for name in previous if (output_dir / name).resolve() not in inputs]  # never an input
    device = select_device(args.device)
    model, meta = build_model_from_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    model.to(device).eval()
    img_size = square_img_size(model, args.checkpoint)
    view = EvalViews("sat", tencrop=False, img_size=img_size,
                     resize_size=args.resize_size or (meta.get("config") or {}).get("resize_size"))
    threshold = args.threshold if args.threshold is not None else recorded_threshold(args.checkpoint, meta,
                                                                                      model.num_classes)
    names = meta.get("class_names") or [str(k) for k in range(model.num_classes)]
    staged = Staged()  # the new files, moved in place of the previous ones once every image is predicted
    stopped = f"stopped: no predictions written (the outputs in {output_dir} are as they were)"
    new_folders = removed_if_failed(output_dir, *([Path(args.save_boxes).parent] if args.save_boxes else []))
    with stopped_as_said(stopped), new_folders, FolderLock(output_dir, "tools/predict.py"), writing_outputs(output_dir):
        discard_leftovers(output_dir, inputs)
        try:
            record = predict(args, model, paths, view, threshold, names, output_dir, staged, set(previous))
            work_complete()  # a stop signal from now on lets the predictions be kept
            staged.commit(output_dir, previous)
        except BaseException:
            staged.discard()
            raise
    print(f"{len(record['predictions'])} predictions written to {output_dir / 'predictions.json'}")
    if args.save_boxes:
        print(f"COCO-format boxes written to {args.save_boxes}")
    return record


def predict(args, model, paths, view, threshold, names, output_dir, staged, free):
    """Predict ``paths`` in batches: the record of predictions.json, written with the overlays and the COCO
    file under their ``staged`` names; ``free``: the earlier run's overlay names, which new overlays may take."""
    img_size, resize_size = view.img_size, view.resize_size
    device = next(model.parameters()).device
    predictions, skipped, used = [], [], set()
    boxes_file = Path(args.save_boxes).resolve() if args.save_boxes else None
    if boxes_file and boxes_file.parent == output_dir.resolve() and boxes_file.suffix == ".png":
        used.add(boxes_file.stem)  # an overlay under the --save-boxes name would be overwritten by the COCO file
    for start in range(0, len(paths), args.eval_batch_size):
        chunk = []
        for path in paths[start:start + args.eval_batch_size]:
            try:
                chunk.append((path, load_rgb(path)))
            except DataError as err:
                print(f"warning: {err}; skipped", file=sys.stderr)
                skipped.append({"image": str(path), "error": str(err)})
        if not chunk:
            continue
        views = torch.stack([view(image)[0] for _, image in chunk]).to(device)
        with torch.inference_mode():
            outputs = model(views, return_block_maps=args.overlay_blocks)
        logits, maps = outputs[:2]
        try:  # as the evaluators: NaN scores would be written as NaN, which strict JSON readers refuse
            check_finite({"centre": (logits.float().cpu().numpy(), maps.float().cpu().numpy())},
                         [str(path) for path, _ in chunk])
        except NonFiniteOutputError as err:
            raise DataError(f"checkpoint {args.checkpoint}: {err}") from None
        probs = logits.float().softmax(dim=1).cpu()
        top = probs.topk(min(5, model.num_classes), dim=1)
        for k, (path, image) in enumerate(chunk):
            classes = top.indices[k].tolist()
            pred = {"image": str(path), "class": classes[0], "class_name": names[classes[0]],
                    "score": float(top.values[k, 0]),
                    "top5": [{"class": c, "class_name": names[c], "score": float(p)}
                             for c, p in zip(classes, top.values[k].tolist())]}
            box, overlay = map_overlay(image, maps[k], threshold, resize_size, img_size,
                                       f"{pred['class_name']} {pred['score']:.0%}")
            pred.update(box=box, image_size=list(image.size))
            png = _unique_png(output_dir, overlay_stem(path.stem), used, free)
            save_rgb(staged.path(png), overlay)
            pred["overlay"] = str(png)
            if args.overlay_blocks:
                panels, pred["block_boxes"] = [], {}
                for block, loc_map in zip(model.spatial_layers, outputs[2][k]):
                    pred["block_boxes"][str(block)], panel = map_overlay(image, loc_map, threshold, resize_size,
                                                                         img_size, f"block {block}")
                    panels.append(panel)
                fused = map_overlay(image, maps[k], threshold, resize_size, img_size,
                                    f"fused: {pred['class_name']} {pred['score']:.0%}")[1]
                blocks_png = _unique_png(output_dir, f"{png.stem}_blocks", used, free)
                save_rgb(staged.path(blocks_png), np.concatenate(panels + [fused], axis=1))
                pred["blocks_overlay"] = str(blocks_png)
            predictions.append(pred)
            print(f"{path}: {pred['class_name']} ({pred['score']:.1%}) box {[round(v, 1) for v in pred['box']]}")
    if skipped:
        print(f"{len(skipped)} of {len(paths)} images skipped: unreadable (named above)", file=sys.stderr)
    if not predictions:
        raise DataError(f"none of the {len(paths)} images could be read")
    record = {"checkpoint": str(args.checkpoint), "threshold": threshold, "img_size": img_size,
              "resize_size": resize_size, "predictions": predictions, "skipped": skipped}
    staged.write_json(output_dir / "predictions.json", record, indent=1)
    if args.save_boxes:
        Path(args.save_boxes).parent.mkdir(parents=True, exist_ok=True)
        entries = [{"file_name": p["image"], "size": p["image_size"], "class": p["class"], "score": p["score"],
                    "box": p["box"]} for p in predictions]
        staged.write_json(args.save_boxes, coco_detections(entries, names))
    return record


if __name__ == "__main__":
    run_cli(main)
    ignore_stop_signals()  # the work is complete
