"""Validate a dataset without writing anything: build each split, check every image (it opens and is complete;
in evaluation splits its boxes lie inside it, and every image has boxes or masks when some have) as train.py
does before training, and print the counts and every bad image.

    python tools/check_dataset.py --data-root /data/CUB_200_2011
    python tools/check_dataset.py --data-root data/demo_cub --split test --decode   # the demo data, in full
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader import FORMATS, SPLITS, build_dataset  # noqa: E402
from DataLoader.check import METHODS, check_split  # noqa: E402
from DataLoader.eval_loader import check_every_image_annotated, split_annotations  # noqa: E402
from utils.config import FIELDS, OneLineParser, at_least  # noqa: E402
from utils.errors import DataError, run_cli  # noqa: E402


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--data-format", default=FIELDS["data_format"].default, choices=FORMATS,
                        help="as training's (default %(default)s)")
    parser.add_argument("--data-root", required=True, help="dataset root (as training's --data-root)")
    parser.add_argument("--split", nargs="+", choices=SPLITS, default=["train", "test"],
                        help="splits to check (default: train test)")
    parser.add_argument("--metadata-root", help="wsolevaluation metadata folder (holds <split>/ folders)")
    parser.add_argument("--val-boxes", help="ImageNet val boxes (XML folder, LOC_val_solution.csv or val_gt.txt), "
                                            "or the folder format's boxes CSV")
    parser.add_argument("--images-per-class", type=int, help="check the seeded few-shot subset of the train split "
                                                              "only (training evaluates whole splits)")
    parser.add_argument("--seed", type=int, default=FIELDS["seed"].default,
                        help="the training seed, which picks the --images-per-class subset (default %(default)s, "
                             "training's)")
    parser.add_argument("--strict-data", action="store_true", help="bad train images are errors")
    parser.add_argument("--workers", type=at_least(0), default=os.cpu_count(),
                        help="processes reading the images (default: one per core)")
    parser.add_argument("--decode", action="store_true",
                        help="decode every image in full (default: header and end marker; a file without its "
                             "end marker is decoded)")
    args = parser.parse_args(argv)
    fatal, checked, seconds = [], 0, 0.0
    for split in args.split:
        # The check reads the files itself, so the images need no transform.
        dataset = build_dataset(args.data_format, args.data_root, split, lambda image: image,
                                images_per_class=args.images_per_class if split == "train" else None,
                                seed=args.seed, metadata_root=args.metadata_root, val_boxes=args.val_boxes,
                                strict=args.strict_data)
        report = check_split(dataset, split, args.workers, args.decode, progress=True)
        checked, seconds = checked + report.checked, seconds + report.seconds
        skipped = split == "train" and not args.strict_data
        if report.bad and not skipped:
            fatal.append(report.summary())
        annotations = split_annotations(dataset) if split != "train" else None
        if annotations is not None:
            try:
                check_every_image_annotated(dataset, annotations)
            except DataError as err:
                fatal.append(str(err))
        annotated = ""  # training reads no annotations (the training split keeps none: CompactItems)
        if dataset.evaluation:
            boxes = sum(len(item.boxes) for item in dataset.items if item.boxes is not None)
            annotated = f"{boxes} boxes, {sum(1 for item in dataset.items if item.mask_paths is not None)} with masks, "
        name = "test (the ILSVRC2012 val set)" if args.data_format == "imagenet" and split == "test" else split
        print(f"{name}: {len(dataset)} images, {dataset.num_classes} classes, {annotated}"
              f"{len(report.bad)} bad{' (skipped in training)' if skipped and report.bad else ''}")
        for path, reason in report.bad:
            print(f"  {path}: {reason}")
        for warning in (report.size_warning(), report.mask_warning()):
            if warning:
                print(f"  warning: {warning}")
    print(f"checked the {METHODS[args.decode]} of {checked} images in {seconds:.1f}s")
    if fatal:
        raise DataError(fatal[0])


if __name__ == "__main__":
    run_cli(main)
