"""Building blocks of preemption and mid-epoch resume: the resumable sampler, the stop-signal guard (one
process and two agreeing), the resume command."""
import os
import signal
import socket
import subprocess
import sys

import torch
from torch.utils.data import DistributedSampler

from DataLoader.sampler import ResumableSampler
from utils.preemption import StopSignals, resume_command

from conftest import REPO_ROOT


def test_sampler_epoch_order_split_and_skip():
    data = list(range(10))
    full = ResumableSampler(data, batch_size=3, num_replicas=1, rank=0, seed=6)
    full.set_epoch(2)
    order = list(full)
    assert sorted(order) == data and len(full) == 10
    generator = torch.Generator()
    generator.manual_seed(6 + 2)  # the epoch's permutation: seed + epoch, as DistributedSampler
    assert order == torch.randperm(10, generator=generator).tolist()
    full.set_epoch(2, start_batch=2)  # two batches of 3 done: the rest of the same permutation
    assert list(full) == order[6:] and len(full) == 4
    full.set_epoch(3)
    assert len(full) == 10 and list(full) != order

    # two processes: each skips its own share's first batches, as DistributedSampler splits the epoch
    for rank in range(2):
        reference = DistributedSampler(data, num_replicas=2, rank=rank, seed=6)
        reference.set_epoch(1)
        sampler = ResumableSampler(data, batch_size=2, num_replicas=2, rank=rank, seed=6)
        sampler.set_epoch(1, start_batch=1)
        assert list(sampler) == list(reference)[2:] and len(sampler) == 3


def test_loader_resumed_mid_epoch_yields_the_remaining_batches():
    data = list(range(11))
    sampler = ResumableSampler(data, batch_size=4, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    sampler.set_epoch(0)
    full = [batch.tolist() for batch in loader]
    sampler.set_epoch(0, start_batch=1)
    assert len(loader) == 1 and [batch.tolist() for batch in loader] == full[1:]


def test_stop_signals_are_recorded_then_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert stop.received_by_any() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received_by_any() == signal.SIGUSR1  # the first one
    assert signal.getsignal(signal.SIGUSR1) is before


def test_resume_command():
    assert resume_command(["train.py", "--config", "a b.yaml", "--overwrite"]) == \
        "python train.py --config 'a b.yaml' --resume"
    assert resume_command(["train.py", "--resume", "old/last.pth", "--epochs", "3"]) == \
        "python train.py --epochs 3 --resume"
    assert resume_command(["train.py", "--resume", "--epochs", "3"]) == "python train.py --epochs 3 --resume"
    assert resume_command(["train_ImageNet.py", "--epochs", "3"], distributed=True) == \
        "the same launcher (torchrun, srun ...) with train_ImageNet.py --epochs 3 --resume"


AGREE = """
import os, signal, sys
import torch.distributed as dist
from utils.preemption import StopSignals
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
with StopSignals() as stop:
    before = stop.received_by_any(world_size=2)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    print(before, stop.received_by_any(world_size=2))
dist.destroy_process_group()
"""


def test_processes_agree_on_a_signal_only_one_received():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", AGREE], cwd=REPO_ROOT, env=dict(env, RANK=str(rank)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [out.strip() for out, _ in outputs] == [f"0 {int(signal.SIGUSR1)}"] * 2, outputs
