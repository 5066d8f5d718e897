"""Train SAT on ImageNet (ILSVRC2012 layout: train/<wnid>/, val/ + boxes), usually with several processes:
the procedure of train.py with config/ILSVRC.yaml's settings.

    torchrun --nproc_per_node K train_ImageNet.py --config config/ILSVRC.yaml --data-root PATH --output-dir DIR
    python -m torch.distributed.launch --nproc_per_node K train_ImageNet.py --config config/ILSVRC.yaml ...

Multi-node: torchrun's --nnodes / --node-rank / --master-addr / --master-port (or --rdzv-*) flags.
The model and schedule settings of any config apply; the data is always read in the ImageNet layout.
"""
import functools

from train import main
from utils.errors import run_cli
from utils.preemption import ignore_stop_signals

if __name__ == "__main__":
    run_cli(functools.partial(main, imagenet=True))
    ignore_stop_signals()  # the run is complete
