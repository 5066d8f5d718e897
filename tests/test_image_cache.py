"""cache_images: the cached samples are the uncached ones (bit for bit), later passes read no image file,
and a training run with the cache ends with the weights of the same run without it."""
import ctypes
import errno
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from DataLoader import build_dataset, build_loader, make_demo_dataset
from DataLoader.eval_views import EvalViews
from DataLoader.dataset import Skipped
from DataLoader import image_cache
from DataLoader.image_cache import attach_image_cache, cache_bytes
from DataLoader.transforms import TrainPixels
from utils.checkpoint import read_checkpoint
from utils.errors import DataError
from train import main

from test_train import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_root(tmp_path):
    return make_demo_dataset(tmp_path / "cub", num_classes=3, train_per_class=4, test_per_class=3, image_size=80)


def samples(dataset, seed=0):
    """Every sample with the random crops drawn from ``seed`` (torch's RNG, as in a loader worker)."""
    torch.manual_seed(seed)
    return [dataset[i] for i in range(len(dataset))]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key == "image":
                assert x[key].keys() == y[key].keys()
                for part in x[key]:
                    assert torch.equal(torch.as_tensor(x[key][part]), torch.as_tensor(y[key][part])), part
            elif isinstance(x[key], np.ndarray):  # boxes
                assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("split, transform", [
    ("train", TrainPixels(64, 72)),
    ("test", EvalViews("sat", False, 64, 72).pixels()),
    ("test", EvalViews("sat", True, 64, 72).pixels()),
])
def test_cached_samples_equal_decoded_ones_and_need_no_file(tmp_path, data_root, split, transform):
    plain = build_dataset("cub", data_root, split, transform)
    cached = build_dataset("cub", data_root, split, transform)
    cache = attach_image_cache(cached, tmp_path / "cache")
    expected = samples(plain)
    assert_same(samples(cached), expected)  # the first pass decodes and fills the cache
    assert cache.num_cached() == len(cached)
    shutil.move(data_root / "images", tmp_path / "moved")  # nothing left to decode
    assert_same(samples(cached), expected)
    if split == "train":
        assert isinstance(plain[0], Skipped)  # the files are really gone
    else:
        with pytest.raises(DataError, match="unreadable image"):
            plain[0]


def test_cache_is_shared_by_loader_workers_and_found_again(tmp_path, data_root):
    dataset = build_dataset("cub", data_root, "train", TrainPixels(64, 72))
    cache = attach_image_cache(dataset, tmp_path / "cache")
    loader = build_loader(dataset, 4, train=True, workers=2, seed=0)
    loader.sampler.set_epoch(0)
    seen = sorted(i for batch in loader for i in batch["index"])
    assert seen == list(range(len(dataset)))
    assert cache.num_cached() == len(dataset)  # written by the worker processes, visible here
    reopened = build_dataset("cub", data_root, "train", TrainPixels(64, 72))
    assert attach_image_cache(reopened, tmp_path / "cache").path == cache.path
    assert reopened.cache.num_cached() == len(dataset)
    other_size = build_dataset("cub", data_root, "train", TrainPixels(64, 80))
    assert attach_image_cache(other_size, tmp_path / "cache").path != cache.path
    with open(cache.path, "r+b") as f:  # a cache file cut short is one error line, not a traceback
        f.truncate(100)
    with pytest.raises(DataError, match=f"image cache {cache.path} has 100 bytes, expected {cache.nbytes}: delete "
                                        r"it \(the run writes it again\)"):
        attach_image_cache(reopened, tmp_path / "cache")


@pytest.mark.parametrize("split, transform", [("test", EvalViews("both", False, 64, 72).pixels()),
                                              ("train", TrainPixels(64, 72, gpu_decode=True)),
                                              ("test", EvalViews("sat", False, 64, 72).pixels(gpu_decode=True))])
def test_whole_image_views_and_gpu_decode_are_not_cached(tmp_path, data_root, split, transform):
    """The wsol view resizes the original image and --gpu-decode decodes on the device: their loaders read the
    files (and say so)."""
    dataset = build_dataset("cub", data_root, split, transform)
    assert attach_image_cache(dataset, tmp_path / "cache") is None and dataset.cache is None


def test_no_cache_where_the_disk_has_no_room(tmp_path, data_root, monkeypatch, caplog):
    """A worker writing a mapped page the disk cannot hold dies of SIGBUS: a cache that may not fit is not
    made (a warning; the loader reads the files), counting the space the folder's other caches still need."""
    train = build_dataset("cub", data_root, "train", TrainPixels(64, 72))
    test = build_dataset("cub", data_root, "test", EvalViews("sat", False, 64, 72).pixels())
    free = cache_bytes(len(train), 72) + cache_bytes(len(test), 72) - 1
    folder = tmp_path / "cache"

    def taken():  # the disk space of the caches made (each takes its whole size when made)
        return sum(path.stat().st_blocks * 512 for path in folder.glob("*.cache"))

    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free - taken()))
    assert attach_image_cache(train, folder) is not None  # fits alone
    with caplog.at_level(logging.WARNING):
        assert attach_image_cache(test, folder) is None and test.cache is None
    assert "not for the loader of 9 images" in caplog.text and "image caches need" in caplog.text
    assert "0.0 GB" not in caplog.text and f"need {image_cache.readable_size(cache_bytes(len(test), 72))} more" \
        in caplog.text  # (in GB, the small caches were '0.0 GB')
    assert image_cache.readable_size(2.3e9) == "2.3 GB" and image_cache.readable_size(6224896) == "6.2 MB"
    # a cache an interrupted run left sparse (made before its space was taken at once) counts what it has yet to take
    for path in folder.glob("*.cache"):
        path.unlink()
    sparse = folder / image_cache.cache_name(train, 72)
    with open(sparse, "wb") as file:
        file.truncate(cache_bytes(len(train), 72))
    assert image_cache.unfilled_bytes(folder) > 0
    assert attach_image_cache(test, folder) is None


def test_training_with_cache_gives_the_same_run(tmp_path, data_root):
    common = [*TINY, "--data-root", str(data_root), "--epochs", "2", "--workers", "1"]
    main([*common, "--output-dir", str(tmp_path / "plain")])
    # into a previous run that kept its caches (interrupted): --overwrite deleted image_cache/ after the new run had
    # made its caches there, and the first pass to open one ended in FileNotFoundError (the final test's, after
    # the whole run)
    cached = shutil.copytree(tmp_path / "plain", tmp_path / "cached")
    (cached / "image_cache").mkdir()
    (cached / "image_cache" / "vm-0123456789abcdef_72px.cache").write_bytes(b"\0" * 4096)
    main([*common, "--output-dir", str(cached), "--cache-images", "--overwrite", "--tencrop"])
    a, b = (read_checkpoint(tmp_path / run / "checkpoints" / "last.pth")["model"] for run in ("plain", "cached"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "cached" / "log.txt").read_text()
    assert "cache_images: 12 images" in log and "cache_images: 9 images" in log
    assert not (tmp_path / "cached" / "image_cache").exists()  # removed at the end of the finished run


def test_cache_name_of_file_names_that_are_not_utf8(tmp_path):
    """A file name that is not UTF-8 (read by os.listdir as surrogate escapes) names its cache; it raised
    UnicodeEncodeError with --cache-images."""
    names = ["a.jpg", b"\xff.jpg".decode("utf-8", "surrogateescape")]
    dataset = type("Listed", (), {"__len__": lambda self: 2, "image_path": lambda self, i: str(tmp_path / names[i])})()
    other = type("Listed", (), {"__len__": lambda self: 2, "image_path": lambda self, i: str(tmp_path / "ab"[i])})()
    assert image_cache.cache_name(dataset, 72).endswith("_72px.cache")
    assert image_cache.cache_name(dataset, 72) != image_cache.cache_name(other, 72)


def test_the_cache_takes_its_disk_space_when_made(tmp_path, data_root, monkeypatch, caplog):
    """A sparse cache found room at the start, then lost it to the checkpoints written meanwhile: the first
    evaluation's writes to its mapped pages killed train.py with SIGBUS (exit 135, nothing in log.txt). The space
    is taken when the file is made; a disk without it: the warning, no cache."""
    train = build_dataset("cub", data_root, "train", TrainPixels(64, 72))
    assert attach_image_cache(train, tmp_path / "cache") is not None
    assert image_cache.unfilled_bytes(tmp_path / "cache") == 0  # nothing left to take once filling starts
    test = build_dataset("cub", data_root, "test", EvalViews("sat", False, 64, 72).pixels())

    monkeypatch.setattr(image_cache, "_FALLOCATE", failing_fallocate(errno.ENOSPC))
    monkeypatch.setattr(image_cache.os, "posix_fallocate", failing_fallocate(errno.ENOSPC, raises=True))
    with caplog.at_level(logging.WARNING):
        assert attach_image_cache(test, tmp_path / "cache") is None and test.cache is None
    assert "not for the loader of 9 images" in caplog.text and "No space left on device" in caplog.text
    assert len(list((tmp_path / "cache").glob("*.cache*"))) == 1  # the train cache alone: no file left of this one


def failing_fallocate(code, raises=False):
    """A fallocate(2) (through ctypes: -1 and errno) or os.posix_fallocate (``raises``) failing with ``code``."""
    def call(fd, *args):
        if raises:
            raise OSError(code, os.strerror(code))
        ctypes.set_errno(code)
        return -1
    return call


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (its fault injection)")
def test_a_file_system_without_fallocate_keeps_the_cache_sparse(tmp_path):
    """Where the file system has no fallocate (NFSv3, FUSE, ZFS before 2.2), glibc's posix_fallocate wrote a byte
    into every 4 KiB block instead: a read and a write per block (25 million each for a 100 GB cache, over the
    network on NFS, at every start and --resume), where the docstring said the file stays sparse."""
    code = ("import importlib.util, os; "
            "spec = importlib.util.spec_from_file_location('c', 'DataLoader/image_cache.py'); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "  # (no torch: fast)
            f"c = module.ImageCache({str(tmp_path / 'x.cache')!r}, 400, 64); print(os.stat(c.path).st_blocks * 512)")
    done = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", "inject=fallocate:error=EOPNOTSUPP",
                           sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    if done.returncode and "ptrace" in done.stderr:
        pytest.skip("strace cannot trace here")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < cache_bytes(400, 64) // 100  # sparse (it was allocated block by block)


def test_the_processes_of_a_node_make_one_cache_and_all_use_it(tmp_path, data_root, monkeypatch):
    """Each process reserved the cache's space in a temporary file of its own before one of them was linked in
    place: on a disk with room for one copy, the node's other processes found no room (a warning) and read the
    files every epoch."""
    train = build_dataset("cub", data_root, "train", TrainPixels(64, 72))
    folder = tmp_path / "cache"
    folder.mkdir()
    budget = cache_bytes(len(train), 72) * 3 // 2

    def disk_usage(path):  # room for one copy: what every file of the folder takes is gone
        return SimpleNamespace(free=budget - sum(p.stat().st_blocks * 512 for p in folder.iterdir()))

    reserve = image_cache.reserve

    def slow_reserve(fd, nbytes):  # (the other process looks meanwhile)
        reserve(fd, nbytes)
        time.sleep(0.3)

    monkeypatch.setattr(image_cache.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(image_cache, "reserve", slow_reserve)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()

    def process():
        barrier.wait()
        results.put(attach_image_cache(train, folder) is not None)

    processes = [context.Process(target=process) for _ in range(2)]
    for each in processes:
        each.start()
    for each in processes:
        each.join(30)
    if not any(p.stat().st_blocks for p in folder.glob("*.cache")):
        pytest.skip("this file system does not allocate ahead (no fallocate)")
    assert [results.get(timeout=5) for _ in processes] == [True, True]
    assert len(list(folder.glob("*.cache"))) == 1
