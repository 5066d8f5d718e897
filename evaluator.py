"""Evaluate a SAT checkpoint on CUB-200-2011 (official defaults: threshold 0.4, ten-crop classification),
wsolevaluation metadata (--format wsol) or a custom folder dataset; without --data-root on the demo data.

    python evaluator.py --data-root data/CUB_200_2011 --checkpoint best.pth --eval-protocol both
"""
import functools

from utils.errors import run_cli
from utils.eval_cli import main

if __name__ == "__main__":
    run_cli(functools.partial(main, kind="cub"))
