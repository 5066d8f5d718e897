"""Train SAT on CUB-200-2011 (or any supported WSOL dataset; the synthetic demo without --data-root).

    python train.py --config config/CUB.yaml --data-root PATH --output-dir DIR [--epochs N --lr LR ...]
    python train.py                       # demo: config/demo.yaml on the generated synthetic dataset
    torchrun --nproc_per_node K train.py --config config/CUB.yaml --data-root PATH

Every config key is also a flag (``python train.py --help``); ``--resume`` continues a run.
"""
from utils.errors import run_cli
from utils.trainer import main

if __name__ == "__main__":
    run_cli(main)
