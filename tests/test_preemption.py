"""Mid-epoch resume and preemption: the resumable sampler, the stop-signal guard, the resume command, and
train.py stopped by SIGTERM mid-epoch then resumed ending with the weights of the uninterrupted run."""
import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from DataLoader import build_loader, make_demo_dataset
from DataLoader.sampler import ResumableSampler
from Model.losses import SATLoss
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.errors import ConfigError
from utils.preemption import StopSignals, resume_command
from train import main as train_main

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


def test_drop_last_with_accumulation_drops_the_partial_optimizer_step():
    """24 images, micro-batches of 8, 2 per optimizer step: the last micro-batch alone would make a step of 8
    images; drop_last drops it (one step of 16, as with --batch-size 16 and no accumulation)."""
    data = list(range(24))
    loader = build_loader(data, 8, train=True, workers=0, drop_last=True, accum_steps=2)
    loader.sampler.set_epoch(0)
    assert len(loader.sampler) == 16 and len(list(loader)) == 2
    kept = build_loader(data, 8, train=True, workers=0, drop_last=False, accum_steps=2)
    kept.sampler.set_epoch(0)
    assert len(kept.sampler) == 24
    loader.sampler.set_epoch(0, start_batch=1)
    assert len(loader.sampler) == 8


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
    assert resume_command(["train_ImageNet.py"], True, "srun (2 SLURM tasks, master n1:10042)") == \
        "the same launcher (srun) with train_ImageNet.py --resume"  # the tasks srun started itself


# ----------------------------------------------------------------------------- train.py end to end
# 3 classes x 8 train images, batch 4: 6 optimizer steps per epoch, 2 epochs. Drop-path and the random
# crops / flips (workers 0: the main process's RNG) make the result depend on the restored RNG states.
EPOCHS, STEPS = 2, 6
IGNORED = {"train_time", "train_images_per_sec", "train_data_wait", "test_time"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp("data") / "cub", num_classes=3, train_per_class=8,
                                 test_per_class=4, image_size=64))


def run_args(data_root, out, *extra):
    return ["--config", str(REPO_ROOT / "config" / "demo.yaml"), "--img-size", "64", "--resize-size", "72",
            "--batch-size", "4", "--eval-batch-size", "12", "--epochs", str(EPOCHS), "--workers", "0",
            "--log-every", "1", "--warmup-epochs", "0", "--drop-path", "0.1", "--overlays", "0", "--device", "cpu",
            "--data-root", data_root, "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train_main(run_args(data_root, out))
    return out


def metrics_lines(out):
    return [{k: v for k, v in json.loads(line).items() if k not in IGNORED}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out, reference):
    a, b = (read_checkpoint(path / "checkpoints" / "last.pth") for path in (reference, out))
    assert a["epoch"] == b["epoch"] == EPOCHS and "epoch_step" not in b
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert metrics_lines(out) == metrics_lines(reference)  # each epoch logged once, same losses and metrics
    results = json.loads((out / "results.json").read_text())
    assert results == {**json.loads((reference / "results.json").read_text()), "checkpoint": results["checkpoint"]}


class InterruptingLoss(SATLoss):
    """The SAT criterion that, at its ``at``-th call (one per optimizer step here), sends this process
    ``signum`` (a real signal, handled by the real handler) or raises (a crash: nothing saved then)."""

    def __init__(self, *args, at, signum=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.at, self.signum = 0, at, signum

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.at:
            if self.signum is None:
                raise RuntimeError("simulated crash")
            os.kill(os.getpid(), self.signum)
        return super().forward(*args)


def interrupt(monkeypatch, **kwargs):
    monkeypatch.setattr("train.SATLoss", functools.partial(InterruptingLoss, **kwargs))


def test_signal_mid_epoch_then_resume_gives_the_uninterrupted_run(data_root, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt(monkeypatch, at=4, signum=signal.SIGTERM)  # during optimizer step 4 of epoch 1
    with pytest.raises(SystemExit) as stopped:
        train_main(run_args(data_root, out))
    assert stopped.value.code == 128 + signal.SIGTERM
    last = read_checkpoint(out / "checkpoints" / "last.pth")
    assert (last["epoch"], last["epoch_step"]) == (0, 4)  # saved at the end of that step
    log = (out / "log.txt").read_text()
    assert f"stopped by SIGTERM at epoch 1, optimizer step 4/{STEPS}: {out / 'checkpoints' / 'last.pth'} saved; " \
           "resume with: python " in log
    assert not (out / "metrics.jsonl").read_text()

    monkeypatch.undo()
    # data whose epoch has 5 steps, not 6: refused (the rest of epoch 1 would leave out images)
    fewer = make_demo_dataset(tmp_path / "fewer", num_classes=3, train_per_class=6, test_per_class=4, image_size=64)
    with pytest.raises(ConfigError, match=r"saved after 4 of the 6 optimizer steps of epoch 1, which now has 5 "):
        train_main(run_args(str(fewer), out, "--resume"))
    train_main(run_args(data_root, out, "--resume"))
    assert "0 of 2 epochs done, and 4 optimizer steps of epoch 1" in (out / "log.txt").read_text()
    assert_same_run(out, reference)


def test_with_workers_a_resumed_run_on_other_workers_gives_the_uninterrupted_run(data_root, tmp_path, monkeypatch):
    """Loader workers draw each sample's crop from (seed, epoch, index): a run stopped mid-epoch and resumed
    with another number of workers (and slices) ends as the uninterrupted run."""
    reference = tmp_path / "reference"
    train_main(run_args(data_root, reference, "--workers", "2"))
    out = tmp_path / "run"
    interrupt(monkeypatch, at=4, signum=signal.SIGTERM)
    with pytest.raises(SystemExit):
        train_main(run_args(data_root, out, "--workers", "2"))
    monkeypatch.undo()
    train_main(run_args(data_root, out, "--workers", "1", "--resume"))
    assert_same_run(out, reference)


def test_periodic_checkpoint_then_crash_then_resume(data_root, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt(monkeypatch, at=11)  # crash in step 11 of 12; the last save was after step 8 (epoch 2, step 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_main(run_args(data_root, out, "--save-every-steps", "4"))
    log = (out / "log.txt").read_text()  # an unexpected error too, with its traceback
    assert "ERROR error: RuntimeError: simulated crash\nTraceback (most recent call last):" in log
    last = read_checkpoint(out / "checkpoints" / "last.pth")
    assert (last["epoch"], last["epoch_step"]) == (1, 2) and len(last["epoch_meters"]) == 1
    monkeypatch.undo()
    train_main(run_args(data_root, out, "--save-every-steps", "4", "--resume"))
    assert_same_run(out, reference)


def test_resumed_on_fewer_processes_the_epoch_still_counts_its_steps_before_the_stop(data_root, reference, tmp_path,
                                                                                     monkeypatch):
    """A last.pth saved mid-epoch by 2 processes, resumed by 1: the epoch's losses and images in metrics.jsonl
    are of the whole epoch (the saved processes' sums were dropped: the epoch counted only its rest)."""
    out = tmp_path / "run"
    interrupt(monkeypatch, at=4, signum=signal.SIGTERM)
    with pytest.raises(SystemExit):
        train_main(run_args(data_root, out))
    monkeypatch.undo()
    path = out / "checkpoints" / "last.pth"
    last = read_checkpoint(path)
    (sums,) = last["epoch_meters"]
    last["epoch_meters"] = [{k: v / 4 for k, v in sums.items()}, {k: v * 3 / 4 for k, v in sums.items()}]
    last["rng_states"] *= 2  # as two processes saved them
    save_checkpoint(last, path)
    train_main(run_args(data_root, out, "--resume"))
    assert "1 processes now, 2 when saved in the middle of an epoch" in (out / "log.txt").read_text()
    first, expected = metrics_lines(out)[0], metrics_lines(reference)[0]
    assert first["train_images"] == expected["train_images"] == STEPS * 4
    assert first["train_steps"] == STEPS


def test_train_py_killed_with_sigterm_resumes_with_the_printed_command(data_root, tmp_path):
    """SIGTERM to the whole process group, loader workers included, as SLURM and torchrun send it: the workers
    leave it to the main process (killed, they made it fail with 'DataLoader worker ... killed by signal',
    exit 1 and nothing saved of the epoch), which saves, says so and exits 143."""
    out = tmp_path / "run"
    argv = run_args(data_root, out, "--workers", "1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    log, deadline = out / "log.txt", time.time() + 180
    while proc.poll() is None and time.time() < deadline and \
            not (log.is_file() and f"epoch 1 step 2/{STEPS}" in log.read_text()):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    message = [line for line in stdout.splitlines() if "stopped by SIGTERM" in line]
    assert len(message) == 1 and "Traceback" not in stderr and "killed by signal" not in stderr
    command = message[0].split("resume with: ")[1]
    assert command == shlex.join(["python", "train.py", *argv, "--resume"])
    train_main(shlex.split(command)[2:])  # the command's train.py arguments, run in this process
    reference = tmp_path / "reference"  # (workers draw the crops as one another, not as the main process does)
    train_main(run_args(data_root, reference, "--workers", "1"))
    assert_same_run(out, reference)


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
    # (the last line: gloo of torch <= 2.9 prints a line of its own when connected)
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == [f"0 {int(signal.SIGUSR1)}"] * 2, outputs
