"""Write the synthetic demo dataset (CUB-200-2011 release format); a no-op when it is already complete.

    python tools/make_demo_data.py                                   # what train.py without --data-root reads
    python tools/make_demo_data.py --output-dir /tmp/tiny_cub --num-classes 2 --train-per-class 4 --test-per-class 3
"""
import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader.demo import CLASS_TEMPLATES, DEFAULT_DEMO_ROOT, make_demo_dataset  # noqa: E402
from utils.config import OneLineParser, at_least  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def _num_classes(text):
    """--num-classes: 2 to the number of demo class templates (said with the flag, as the other flags' errors)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 2 <= value <= len(CLASS_TEMPLATES):
        raise argparse.ArgumentTypeError(f"expected an integer in 2..{len(CLASS_TEMPLATES)}, got {text!r}")
    return value


# make_demo_dataset's own defaults: the data train.py writes without --data-root (another value here would make
# train.py regenerate the folder this tool wrote)
DEFAULTS = {name: p.default for name, p in inspect.signature(make_demo_dataset).parameters.items()}


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("--output-dir", default=str(DEFAULT_DEMO_ROOT), help="dataset folder (default %(default)s)")
    parser.add_argument("--num-classes", type=_num_classes, default=DEFAULTS["num_classes"],
                        help=f"2 to {len(CLASS_TEMPLATES)} (default %(default)s)")
    parser.add_argument("--train-per-class", type=at_least(1), default=DEFAULTS["train_per_class"],
                        help="default %(default)s")
    parser.add_argument("--test-per-class", type=at_least(1), default=DEFAULTS["test_per_class"],
                        help="default %(default)s")
    parser.add_argument("--image-size", type=at_least(32), default=DEFAULTS["image_size"],
                        help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="default %(default)s")
    args = parser.parse_args(argv)
    root = make_demo_dataset(args.output_dir, num_classes=args.num_classes, train_per_class=args.train_per_class,
                             test_per_class=args.test_per_class, image_size=args.image_size, seed=args.seed)
    print(f"demo dataset ready at {root}")


if __name__ == "__main__":
    run_cli(main)
