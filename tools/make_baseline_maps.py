"""Write a trivial localization baseline as saved maps: the same centred Gaussian for every image of a split,
one whole-image map per image named as ``evaluator.py --maps DIR`` reads them (``DIR/<image_id>.npy``).

It guesses "the object is in the middle": the floor any WSOL method should clear under both protocols.
``--img-size`` / ``--resize-size`` write ``views.json``: the sat protocol's centre view to take the maps
through, e.g. that of a model trained at another input size (default: the official 224 of 256).

    python tools/make_baseline_maps.py output/maps_gaussian            # the built-in demo data's test split
    python evaluator.py --maps output/maps_gaussian --eval-protocol both --output-dir output/eval_gaussian
"""
import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader import FORMATS, build_dataset  # noqa: E402
from DataLoader.eval_loader import resolve_data  # noqa: E402
from utils.config import OneLineParser, at_least  # noqa: E402
from utils.errors import ConfigError, OutputError, run_cli, writing_outputs  # noqa: E402
from utils.saved_maps import write_saved_view  # noqa: E402


def centred_gaussian(size, sigma):
    """A size x size map exp(-r^2 / (2 sigma^2)), r the distance to the centre in units of the side."""
    x = (np.arange(size) + 0.5) / size - 0.5
    return np.exp(-(x[None, :] ** 2 + x[:, None] ** 2) / (2 * sigma ** 2)).astype(np.float32)


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("output", help="folder of the maps: a new or empty one")
    parser.add_argument("--data-root", help="dataset folder (default: the built-in demo data)")
    parser.add_argument("--data-format", default="cub", choices=FORMATS, help="as evaluator.py's (default %(default)s)")
    parser.add_argument("--metadata-root", help="wsolevaluation metadata folder (holds <split>/ folders)")
    parser.add_argument("--val-boxes", help="ImageNet val boxes or the folder format's boxes CSV, where not under "
                                            "the data root (as evaluator.py --val-boxes)")
    parser.add_argument("--split", default="test", help="split whose images get a map (default %(default)s)")
    parser.add_argument("--size", type=at_least(1), default=224, help="map side in pixels (default %(default)s)")
    parser.add_argument("--sigma", type=at_least(1e-3, float), default=0.25,
                        help="Gaussian width, in units of the image side (default %(default)s)")
    parser.add_argument("--img-size", type=at_least(16), help="with --resize-size: the centre view's crop size")
    parser.add_argument("--resize-size", type=at_least(16),
                        help="with --img-size: the size the image is resized to first")
    args = parser.parse_args(argv)
    if (args.img_size is None) != (args.resize_size is None):
        raise ConfigError("--img-size and --resize-size go together (the centre img_size crop of a resize_size image)")
    if args.img_size is not None and args.resize_size < args.img_size:
        raise ConfigError(f"--resize-size {args.resize_size}: the centre view crops --img-size {args.img_size} "
                          "pixels of it, resize to at least that")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output}: {'not a folder' if not output.is_dir() else 'not empty'}; expected a new or "
                          "empty folder (maps already there would be scored with these)")
    fmt, root = resolve_data(args.data_format, args.data_root)
    dataset = build_dataset(fmt, root, args.split, lambda image: image, metadata_root=args.metadata_root,
                            val_boxes=args.val_boxes)
    loc_map = centred_gaussian(args.size, args.sigma)
    made = not output.exists()
    try:
        with writing_outputs(output):  # a folder that cannot be written, a full disk: one line
            for item in dataset.items:
                path = output / f"{item.image_id}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, loc_map)
            if args.img_size is not None:
                write_saved_view(output, args.img_size, args.resize_size)
    except OutputError:  # the maps written go (the folder was new or empty): a part would be scored as a method's
        shutil.rmtree(output, ignore_errors=True)
        if not made:
            output.mkdir(exist_ok=True)
        raise
    print(f"{len(dataset.items)} maps ({args.size}x{args.size} centred Gaussian, sigma {args.sigma:g}) written to "
          f"{args.output}")


if __name__ == "__main__":
    run_cli(main)
