"""Evaluate a SAT checkpoint on the ILSVRC2012 validation set (official defaults: threshold 0.3,
single-crop classification): the job of evaluator.py on the ImageNet layout.

    python evaluator_ImageNet.py --data-root data/ILSVRC2012 --checkpoint best.pth [--val-boxes LOC_val_solution.csv]
"""
import functools

from evaluator import main
from utils.errors import run_cli
from utils.preemption import ignore_stop_signals

if __name__ == "__main__":
    run_cli(functools.partial(main, imagenet=True))
    ignore_stop_signals()  # the evaluation is complete
