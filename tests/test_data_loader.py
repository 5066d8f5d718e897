import gc
import os
import re
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

from torch.utils.data import Dataset, get_worker_info

from DataLoader import build_dataset, build_loader, collate_samples, make_demo_dataset
from DataLoader.build import LOADERS
from DataLoader.eval_views import EvalViews
from DataLoader.loader import merge_batches
from DataLoader.transforms import TrainPixels
from DataLoader.dataset import Skipped
from utils.errors import DataError

from conftest import REPO_ROOT


@pytest.fixture
def cub(tmp_path):
    root = make_demo_dataset(tmp_path / "cub", num_classes=2, train_per_class=3, test_per_class=1, image_size=40)
    broken = root / "images" / "001.Ringed_Disc" / "Ringed_Disc_0002.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    return root


def test_collate_stacks_and_counts_skipped():
    sample = {"image": torch.zeros(3, 4, 4), "label": 1, "index": 0, "image_id": "a"}
    batch = collate_samples([sample, Skipped("skipping unreadable image x.jpg"), dict(sample, label=2, index=5)])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["label"].dtype == torch.long
    assert batch["label"].tolist() == [1, 2] and batch["index"] == [0, 5] and batch["image_id"] == ["a", "a"]
    assert batch["num_skipped"] == 1 and batch["skipped"] == ["skipping unreadable image x.jpg"]
    empty = collate_samples([Skipped("a"), Skipped("b")])
    assert empty["num_skipped"] == 2 and empty["label"].numel() == 0 and empty["skipped"] == ["a", "b"]


def test_an_unreadable_image_is_named_once(tmp_path):
    from PIL import Image, UnidentifiedImageError
    from DataLoader.dataset import unreadable_message
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError) as err:
        Image.open(tmp_path / "a.jpg")
    assert unreadable_message(tmp_path / "a.jpg", err.value) == (  # PIL's message named the file a second time
        f"unreadable image {tmp_path / 'a.jpg'} (not an image file PIL recognises)")


def test_a_zero_byte_image_is_an_empty_file_in_training_as_in_the_data_check(cub):
    """A 0-byte file (a failed copy) is named 'empty file (0 bytes)' by the loader's skip message and its
    DataError, as the data check names it, not as a file PIL does not recognise."""
    from DataLoader.check import image_problem
    train = build_dataset("cub", cub, "train")
    path = train.image_path(0)
    open(path, "wb").close()
    assert train[0].message == f"skipping unreadable image {path} (empty file (0 bytes))"
    assert image_problem(path) == (None, "empty file (0 bytes)")


def test_truncated_train_image_is_skipped_and_named(cub):
    train = build_dataset("cub", cub, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named in the sample, not through the warnings machinery
        skipped = train[1]
    assert isinstance(skipped, Skipped) and re.search("skipping unreadable image .*Ringed_Disc_0002.jpg",
                                                      skipped.message)
    loader = build_loader(train, 4, train=True, workers=2, drop_last=False)
    assert loader.loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    for _ in range(2):  # two epochs over persistent workers
        batches = list(loader)
        assert sum(b["num_skipped"] for b in batches) == 1
        assert [m for b in batches for m in b["skipped"]] == [skipped.message]
        assert sum(len(b["label"]) for b in batches) == 5


def test_strict_data_and_evaluation_splits_raise(cub):
    with pytest.raises(DataError, match="unreadable image .*Ringed_Disc_0002.jpg"):
        build_dataset("cub", cub, "train", strict=True)[1]
    (cub / "images" / "002.Checkered_Square" / "Checkered_Square_0004.jpg").write_bytes(b"junk")
    test = build_dataset("cub", cub, "test")
    with pytest.raises(DataError, match="unreadable image .*Checkered_Square_0004.jpg"):
        test[1]


def test_loader_is_reproducible_and_drops_last_when_training(cub):
    train = build_dataset("cub", cub, "train")
    orders = [[i for b in build_loader(train, 4, train=True, workers=0, seed=7) for i in b["index"]]
              for _ in range(2)]
    assert orders[0] == orders[1] and len(orders[0]) in (3, 4)  # one full batch of 4, maybe one skipped
    assert len(build_loader(train, 4, train=True, workers=0)) == 1
    assert len(build_loader(train, 4, train=False, workers=0)) == 2


def test_opencv_runs_no_pool_threads_so_workers_fork_safely():
    """A loader worker forked while OpenCV's pool threads held a lock hung in its first OpenCV call (seen
    after an evaluation): the project's OpenCV work must start no threads in the calling process."""
    code = ("import os, sys, numpy as np; sys.path.insert(0, '.'); import DataLoader; "
            "from utils.metrics import SATLocAccumulator; import cv2; "
            "before = len(os.listdir('/proc/self/task')); "
            "maps = np.random.default_rng(0).random((8, 14, 14), dtype=np.float32); "
            "[SATLocAccumulator().boxes(maps) for _ in range(20)]; "
            "cv2.resize(np.ones((900, 900), np.float32), (2000, 2000)); "
            "print(cv2.getNumThreads(), len(os.listdir('/proc/self/task')) - before)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "0"]


class WhoLoads(Dataset):
    """Sample i names the worker that loaded it."""

    def __len__(self):
        return 30

    def __getitem__(self, index):
        return {"image": torch.zeros(1), "label": get_worker_info().id, "index": index}


def test_each_batch_is_loaded_by_every_worker():
    """A worker that loads a whole batch makes each pass wait for it and idles the others in the last round;
    the loader gives each worker a slice of every batch (the last, short one too)."""
    for parts, expected in ((None, [{0, 1, 2}] * 3), (1, [{0}, {1}, {2}])):
        loader = build_loader(WhoLoads(), 12, train=False, workers=3, parts=parts)
        batches = list(loader)
        assert len(loader) == len(batches) == 3
        assert [b["index"] for b in batches] == [list(range(0, 12)), list(range(12, 24)), list(range(24, 30))]
        assert [set(b["label"].tolist()) for b in batches] == expected


def test_batches_loaded_in_slices_equal_whole_batches(cub):
    """Same samples, pixels, order and skipped files whether a batch is loaded whole or in slices."""
    train = build_dataset("cub", cub, "train", EvalViews("sat", False, 32, 36).pixels())
    whole, sliced = (list(build_loader(train, 5, train=False, workers=2, parts=parts)) for parts in (1, None))
    assert len(whole) == len(sliced) == 2
    for a, b in zip(whole, sliced):
        assert a["index"] == b["index"] and torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"]["pixels"], b["image"]["pixels"])
        assert a["image"]["pixels"].shape[1:] == (36, 36, 3)
        assert torch.equal(a["image"]["crops"], b["image"]["crops"]) and a["image"]["crop_size"] == 32
        assert a["num_skipped"] == b["num_skipped"] and a["skipped"] == b["skipped"]
    assert sum(b["num_skipped"] for b in sliced) == 1 and "Ringed_Disc_0002.jpg" in sliced[0]["skipped"][0]


def test_merge_batches_joins_parts_and_counts_skipped():
    part = {"image": {"pixels": torch.ones(2, 3), "crops": torch.zeros(2, 3), "crop_size": 7},
            "label": torch.tensor([1, 2]), "index": [4, 5], "num_skipped": 1, "skipped": ["skipping a.jpg"]}
    empty = collate_samples([Skipped("skipping b.jpg")])
    merged = merge_batches([part, empty, {**part, "index": [9, 8], "label": torch.tensor([3, 4]), "num_skipped": 0,
                                          "skipped": []}])
    assert merged["index"] == [4, 5, 9, 8] and merged["label"].tolist() == [1, 2, 3, 4]
    assert merged["image"]["pixels"].shape == (4, 3) and merged["image"]["crop_size"] == 7
    assert merged["num_skipped"] == 2 and merged["skipped"] == ["skipping a.jpg", "skipping b.jpg"]
    nothing = merge_batches([empty, empty])
    assert nothing["num_skipped"] == 2 and nothing["label"].numel() == 0 and len(nothing["skipped"]) == 2


def test_a_pass_left_early_does_not_disturb_the_next(cub):
    loader = build_loader(WhoLoads(), 12, train=False, workers=3)
    early = iter(loader)
    assert next(early)["index"] == list(range(12))  # left there, still referenced
    assert [b["index"] for b in loader] == [list(range(0, 12)), list(range(12, 24)), list(range(24, 30))]
    with pytest.raises(DataError, match="unreadable image .*Ringed_Disc_0002.jpg"):  # raised in a worker
        list(build_loader(build_dataset("cub", cub, "train", strict=True), 4, train=False, workers=2, parts=2))


class FailsWhileMarked(WhoLoads):
    """WhoLoads whose sample 5 raises a DataError while the file ``marker`` exists."""

    def __init__(self, marker):
        self.marker = marker

    def __getitem__(self, index):
        if index == 5 and self.marker.exists():
            raise DataError(f"unreadable image {index}")
        return super().__getitem__(index)


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("parts", [None, 1])
def test_a_loader_whose_pass_failed_serves_the_next_and_is_freed_at_once(tmp_path, parts):
    """After a worker's error the loader serves the next pass, and nothing keeps it in a reference cycle: left
    to the garbage collector, its workers would each cost a 5 s join timeout whenever it ran (the suite's
    slowest test had been the next one, for no reason of its own)."""
    marker = tmp_path / "broken"
    marker.touch()
    loader = build_loader(FailsWhileMarked(marker), 12, train=False, workers=3, parts=parts)
    with pytest.raises(DataError, match="unreadable image 5"):
        list(loader)
    marker.unlink()
    assert [b["index"] for b in loader] == [list(range(0, 12)), list(range(12, 24)), list(range(24, 30))]
    freed = weakref.ref(loader)
    del loader
    assert freed() is None


def test_training_crops_depend_on_seed_epoch_and_sample_only(cub):
    """With workers, a sample's crop is the same whatever the worker count and slices, and whether the epoch
    starts at its first batch or is resumed later; a new epoch draws anew."""
    train = build_dataset("cub", cub, "train", TrainPixels(32, 36))

    def crops(workers, parts, epoch, start_batch=0):
        loader = build_loader(train, 4, train=True, workers=workers, seed=3, parts=parts, drop_last=False)
        loader.sampler.set_epoch(epoch, start_batch)
        return {i: tuple(crop) for batch in loader for i, crop in zip(batch["index"], batch["image"]["crops"].tolist())}

    first = crops(2, 2, epoch=0)
    assert len(first) == 5 and crops(3, 1, epoch=0) == first  # (one of the 6 images is unreadable)
    resumed = crops(1, 1, epoch=0, start_batch=1)
    assert 0 < len(resumed) < 5 and all(first[i] == crop for i, crop in resumed.items())
    assert crops(2, 2, epoch=1) != first


@pytest.mark.parametrize("drop_last", [False, True])
def test_slices_of_a_resumed_epoch_form_its_batches(drop_last):
    """The slices are made as the workers ask for them; the joined batches of an epoch resumed at its second
    batch are the batches a plain loader gives (the short last one, or none with drop_last)."""
    batches = {}
    for parts in (1, 3):
        loader = build_loader(WhoLoads(), 12, train=True, workers=3, parts=parts, drop_last=drop_last)
        loader.sampler.set_epoch(2, start_batch=1)
        batches[parts] = [b["index"] for b in loader]
        assert len(loader) == len(batches[parts])
    assert batches[3] == batches[1] and [len(b) for b in batches[3]] == ([12] if drop_last else [12, 6])


def test_more_workers_than_cpus_is_one_warning_of_ours(monkeypatch, caplog):
    """PyTorch's multi-line note (per loader) gives way to one line per script (train.py, the evaluators)."""
    import logging
    from DataLoader import loader as loader_module
    monkeypatch.setattr(loader_module, "cpu_share", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="sat"):
        loader_module.check_loading(2, False, "cpu")
        assert caplog.text == ""
        loader_module.check_loading(14, False, "cpu")
    assert "--workers 14: this process has 2 CPU(s) (those it may run on, over the machine's processes), which " \
           "the workers share; 2 or fewer may load faster" in caplog.text


def test_training_items_are_compact_and_read_back_as_listed(cub):
    """A training split keeps its items' paths and labels in buffers (CompactItems) that give them back as
    listed, names that are not UTF-8 included; an evaluation split keeps its Items (annotations)."""
    from DataLoader.formats.annotations import CompactItems, Item
    train, test = build_dataset("cub", cub, "train"), build_dataset("cub", cub, "test")
    assert isinstance(train.items, CompactItems) and not isinstance(test.items, CompactItems)
    read = LOADERS["cub"](cub, "train")[1]  # the format's reader: what the split lists
    assert [(item.path, item.label) for item in train.items] == [(item.path, item.label) for item in read]
    listed = [Item("a/é.jpg", 3), Item(b"b/\xff.jpg".decode("utf-8", "surrogateescape"), 0), Item("c.png", 7)]
    compact = CompactItems(listed)
    assert list(compact) == listed and compact[-1] == listed[-1] and compact[1:] == listed[1:]
    assert compact[0].image_id == "a/é.jpg" and test.items[0].boxes is not None
    with pytest.raises(IndexError, match="item -4 of 3"):
        compact[-4]


def test_loader_workers_share_the_training_items():
    """Reading every item in a forked process (a loader worker) leaves the items' memory shared: a list of Items
    became a private copy in each worker, about 270 MB per worker for ImageNet's 1.28 M images."""
    script = """if True:
        import os, sys
        from DataLoader.formats.annotations import CompactItems, Item
        def private_mb():
            with open('/proc/self/smaps_rollup') as f:
                return sum(int(line.split()[1]) for line in f if line.startswith('Private_')) / 1024
        for items in ([Item(f'n{i % 100:08d}/{i}.JPEG', i % 100) for i in range(150_000)],):
            for kind in (list, CompactItems):
                held = kind(items)
                read, write = os.pipe()
                if os.fork() == 0:
                    before = private_mb()
                    for index in range(len(held)):
                        os.path.join('/data', held[index].path)
                    os.write(write, str(private_mb() - before).encode())
                    os._exit(0)
                os.wait()
                print(kind.__name__, os.read(read, 64).decode())
    """
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("needs Linux's /proc/self/smaps_rollup")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    grown = dict(line.split() for line in out.stdout.splitlines())
    assert float(grown["list"]) > 15, out  # the test measures what it should: Items are copied
    assert float(grown["CompactItems"]) < 5, out


# the head of the scripts below: the repository importable, and a dataset of 8 numbers
NUMBERS = """sys.path[:0] = [{root!r}, {root!r} + "/tests"]
from DataLoader.loader import BatchLoader
from loader_numbers import Numbers  # importable by workers started by spawn, unlike a class of a -c script
"""

EXIT_WITH_LIVE_WORKERS = """
import sys
{numbers}
loader = BatchLoader(Numbers(), 4, workers={workers})
kept = [loader, iter(loader)]
kept.append(kept)  # a reference cycle, as the traceback of an error raised mid-evaluation keeps its loader
next(kept[1])
print("error: a one-line error", file=sys.stderr)
sys.exit(2)
"""


CHILD_WITH_LIVE_WORKERS = """
import multiprocessing, sys
{numbers}
def child():
    global kept
    kept = BatchLoader(Numbers(), 4, workers=2)
    next(iter(kept))

if __name__ == "__main__":
    process = multiprocessing.get_context({method!r}).Process(target=child)
    process.start()
    process.join(60)
    print(process.exitcode)
"""


@pytest.mark.parametrize("method", ["fork"])  # (spawn: the same finalizer; 9 s to import torch again)
def test_a_child_process_ending_with_a_live_loader_exits(tmp_path, method):
    """In a process started by multiprocessing (mp.spawn, the tests' ranks), multiprocessing's own exit ends the
    daemonic workers, which ignore SIGTERM, before any atexit hook would run: the loaders' shutdown is a
    finalizer that runs first."""
    script = tmp_path / "child.py"
    script.write_text(CHILD_WITH_LIVE_WORKERS.format(numbers=NUMBERS.format(root=str(REPO_ROOT)), method=method))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert proc.stdout.split() == ["0"], proc.stderr


def test_script_ending_with_a_live_loader_exits():
    """The workers ignore SIGTERM (utils.preemption.leave_stops_to_the_parent), with which multiprocessing's exit
    hook ends them before joining them: a script that stopped on an error mid-pass (a missing map, an
    unreadable image) while its loader was still referenced printed its error, then waited for ever."""
    script = EXIT_WITH_LIVE_WORKERS.format(numbers=NUMBERS.format(root=str(REPO_ROOT)), workers=2)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "a one-line error" in proc.stderr


class _Items(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"image": torch.zeros(1), "label": 0, "index": index}


def test_workers_left_running_are_shut_down_at_exit():
    """Workers ignore SIGTERM (init_worker), and multiprocessing's exit handler ends daemonic children with
    SIGTERM then waits for them: a loader still alive at exit (referenced by an uncaught error's traceback, or a
    module's global) hung the process for ever. The loader's own exit handler shuts its workers down first."""
    import DataLoader.loader as loader_module
    loader = build_loader(_Items(), 8, train=False, workers=2)
    assert [len(b["label"]) for b in loader] == [8, 8] and loader.parts == 2
    workers = list(loader.loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)  # persistent: alive after the pass
    assert loader in loader_module._WITH_WORKERS
    loader.shutdown()  # what loader_module._shut_down_at_exit does for each live loader
    assert not any(w.is_alive() for w in workers)
    assert [len(b["label"]) for b in loader] == [8, 8]  # a later pass starts new workers


SIGNAL_WHILE_WORKERS_START = """
import multiprocessing, os, signal, sys
multiprocessing.set_start_method("fork", force=True)  # the hooks after a fork (macOS's default, spawn, has none)
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job may start with SIGINT ignored)
{numbers}from utils.preemption import StopAtOnce

# the signal arrives while the parent runs Python's hooks after forking a worker, as one sent to the job does
sent = []
os.register_at_fork(after_in_parent=lambda: sent and os.kill(os.getpid(), sent.pop()))
for name, stop in (("ctrl-c", signal.SIGINT), ("sigterm", signal.SIGTERM)):
    sent.append(stop)
    try:
        with StopAtOnce(lambda name: "stopped by " + name):
            print(name, sum(len(batch["label"]) for batch in BatchLoader(Numbers(), 4, workers=2)))
    except BaseException as err:
        print(name, type(err).__name__)

# a SIGTERM that reaches a worker once PyTorch has set its own handler (which ends it), before init_worker
from torch.utils.data._utils import signal_handling
set_handlers = signal_handling._set_worker_signal_handlers
signal_handling._set_worker_signal_handlers = lambda: (set_handlers(), os.kill(os.getpid(), signal.SIGTERM))
try:
    print("worker", sum(len(batch["label"]) for batch in BatchLoader(Numbers(), 4, workers=2)))
except RuntimeError as err:  # DataLoader worker (pid ...) is killed by signal: Terminated
    print("worker", "RuntimeError")
"""


def test_a_stop_signal_while_the_workers_start_is_not_lost():
    """A Ctrl-C or a SIGTERM (raising Preempted in the evaluators and the final test) that arrived while a loader
    forked its workers ran its handler in the hooks Python runs after a fork, where the exception was printed
    ("Exception ignored in: ... _releaseLock") and dropped: the evaluation went on to its end, or (Ctrl-C, whose
    worker then died before it ignored it) failed with "DataLoader worker ... exited unexpectedly"; a worker that
    a SIGTERM reached before it ignored it was ended by PyTorch's handler ("killed by signal: Terminated")."""
    script = SIGNAL_WHILE_WORKERS_START.format(numbers=NUMBERS.format(root=str(REPO_ROOT)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["ctrl-c", "KeyboardInterrupt", "sigterm", "Preempted", "worker", "8"], \
        proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


def test_an_unreadable_image_is_named_once_whatever_its_name(tmp_path):
    from PIL import Image, UnidentifiedImageError
    from DataLoader.dataset import unreadable_message
    for name in ("it's a.jpg", "C:\\data\\x.jpg", "a"):  # a quote, backslashes (PIL's repr), a one-letter name
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(b"not an image")
        with pytest.raises(UnidentifiedImageError) as err:
            Image.open(path)
        assert unreadable_message(path, err.value) == (
            f"unreadable image {path} (not an image file PIL recognises)")
    with pytest.raises(OSError) as err:
        open(tmp_path / "gone.jpg", "rb")
    assert unreadable_message(tmp_path / "gone.jpg", err.value) == (  # not '... No such file or directory:)'
        f"unreadable image {tmp_path / 'gone.jpg'} (file not found)")
    assert unreadable_message("a", OSError("broken data stream when reading image file")) == (
        "unreadable image a (OSError: broken data stream when reading image file)")


def test_a_split_is_listed_with_the_cyclic_collector_paused(cub, monkeypatch):
    """Python's cyclic collector is off while a format lists its split (ImageNet's 1.28 M lines made it run
    again and again: half the wsol format's listing time), and as it was after, the listing failed or not."""
    states, read = [], LOADERS["cub"]
    monkeypatch.setitem(LOADERS, "cub", lambda *args: states.append(gc.isenabled()) or read(*args))
    assert len(build_dataset("cub", cub, "train")) == 6 and states == [False] and gc.isenabled()
    monkeypatch.setitem(LOADERS, "cub", lambda *args: states.append(gc.isenabled()) or read(cub / "absent", "train"))
    with pytest.raises(DataError):
        build_dataset("cub", cub, "train")
    assert states == [False, False] and gc.isenabled()
    monkeypatch.setitem(LOADERS, "cub", read)
    gc.disable()
    try:
        build_dataset("cub", cub, "test")
        assert not gc.isenabled()
    finally:
        gc.enable()
