import contextlib
import gc
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Numbers produced by the official SAT code, shipped with the tests (fixtures/original_sat_narrow/README.md):
# the official model class at width 48, loaded here as DeiT-Tiny's architecture with embed_dim=48.
OFFICIAL_DIR = REPO_ROOT / "tests" / "fixtures" / "original_sat_narrow"
OFFICIAL_CKPT = OFFICIAL_DIR / "sat_narrow_original_format.pth.tar"
OFFICIAL_ARCH = "deit_sat_tiny_patch16_224"
OFFICIAL_MODEL_KWARGS = {"embed_dim": 48}

# One torch (OpenMP) thread for the suite, here and in the scripts it starts (they inherit OMP_NUM_THREADS): the
# tests' models and batches are tiny, and on a 2-core machine a second thread spinning beside the loader workers
# and the other processes of a test made steps take seconds instead of a fraction of one. One setting for both,
# so that a run in a script and its reference run in this process compute alike. A value set before is kept.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def official_outputs():
    """The official model's inputs and outputs (eval and train mode) for OFFICIAL_CKPT."""
    return torch.load(OFFICIAL_DIR / "sat_narrow_outputs.pt")


@pytest.fixture(scope="session")
def official_boxes():
    """Maps, thresholds, the official evaluator's boxes, GT boxes and official IoUs."""
    with np.load(OFFICIAL_DIR / "original_boxes.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture
def collector_off():
    """Python's cyclic garbage collector off during the test: what is still alive after its last reference
    went is held by a reference cycle."""
    gc.disable()
    yield
    gc.enable()


class Terminal(io.StringIO):
    """A stream that says it is a terminal (a progress bar is redrawn there), for sys.stderr in a test's body (pytest
    puts its own capture back between a fixture and the test)."""

    def isatty(self):
        return True


def free_port():
    """A free TCP port on the loopback interface, for a local process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous(folder):
    """``init_method`` of a test's local process group: a file store in ``folder`` (a fresh one per group), where
    a free TCP port could be taken by another test process before the group binds it."""
    return f"file://{Path(folder).resolve() / 'rendezvous'}"


def start_ranks(fn, args, nprocs, join=True):
    """``mp.start_processes`` for a test's local process group: fork, so that the children reuse the imported
    modules (spawn would import torch and timm again, ~5 s), but spawn on a GPU machine: once this process has
    asked whether CUDA is available (the CUDA tests' skip markers do), a forked child that touches CUDA fails
    ("Cannot re-initialize CUDA in forked subprocess"), and the loaders pin their batches where CUDA is."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join,
                              start_method="spawn" if torch.cuda.is_available() else "fork")


def wait_for_file(proc, path, timeout=180):
    """Wait until ``path`` exists, ``proc`` has exited or ``timeout`` seconds have passed."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


HOLDER = """
import sys, time
from utils.outputs import FolderLock
FolderLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def folder_locked_by(folder, job):
    """Another process holding ``folder``'s FolderLock (utils/outputs.py) as ``job``, as a running job does;
    killed at the end (which frees the lock: tested)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), job], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def refused_for_lock(line, folder, job, holder):
    """Whether ``line`` is the one-line refusal of a job started into ``folder`` while ``holder`` (``job``) holds
    it."""
    return line.startswith(f"error: --output-dir {folder}: another job is writing into it ({job}, pid {holder.pid} "
                           "on ") and line.endswith(f"; {folder / '.lock'}): wait for it to end, or choose another "
                                                    "--output-dir")


@pytest.fixture
def sigterm_not_handled_fails():
    """While the test runs, a SIGTERM that the code under test does not handle fails the test (instead of ending
    the test process, as the default handler would)."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test's handler: the code under test did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)
