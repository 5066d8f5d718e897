"""Validate a dataset without writing anything: build each split, read every image header, check the
boxes against the image sizes, and print the counts."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader import FORMATS, SPLITS, build_dataset  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", nargs="+", choices=SPLITS, default=["train", "test"])
    parser.add_argument("--metadata-root", help="wsolevaluation metadata folder (holds <split>/ folders)")
    parser.add_argument("--val-boxes", help="ImageNet val boxes (XML folder, LOC_val_solution.csv or val_gt.txt), "
                                            "or the folder format's boxes CSV")
    parser.add_argument("--images-per-class", type=int, help="check the seeded few-shot subset only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict-data", action="store_true", help="unreadable train images are errors")
    args = parser.parse_args(argv)
    for split in args.split:
        # Only headers are read, so the images need no transform.
        dataset = build_dataset(args.format, args.data_root, split, lambda image: image,
                                images_per_class=args.images_per_class,
                                seed=args.seed, metadata_root=args.metadata_root, val_boxes=args.val_boxes,
                                strict=args.strict_data)
        skipped = [s for s in map(dataset.check_item, range(len(dataset))) if s is not None]
        for item in skipped:
            print(f"warning: {item.message}", file=sys.stderr)
        boxes = sum(len(item.boxes) for item in dataset.items if item.boxes is not None)
        masks = sum(1 for item in dataset.items if item.mask_paths is not None)
        name = "test (the ILSVRC2012 val set)" if args.format == "imagenet" and split == "test" else split
        print(f"{name}: {len(dataset)} images, {dataset.num_classes} classes, {boxes} boxes, "
              f"{masks} with masks, {len(skipped)} unreadable (skipped)")


if __name__ == "__main__":
    run_cli(main)
