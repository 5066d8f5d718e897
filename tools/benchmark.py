"""Throughput and peak memory of the training step and of evaluation, on synthetic in-memory batches
or, with --data-root, end to end from image files (and of the input pipeline alone); and how the loader
schedules its workers (--mode loader).

    python tools/benchmark.py --mode train --arch deit_sat_small_patch16_224 --batch-size 16 --steps 5
    python tools/benchmark.py --mode eval --arch deit_sat_small_patch16_224 --batch-size 16 --compare-naive
    python tools/benchmark.py --mode train --data-root data/demo_cub --workers 2 --batch-size 16 --steps 5

Train mode runs ``utils.engine.train_one_epoch`` (forward, SAT losses, backward, AdamW step) exactly as
train.py does; eval mode runs ``utils.engine.evaluate`` (forward + map -> boxes + metrics) as the
evaluators do. Defaults follow train.py (fused attention, fp32; ``--amp`` for bf16 autocast). Prints one JSON
line. Eval mode also reports ``forward_images_per_second`` (the model's forward alone on the same batch
shape, no boxes or metrics) and ``eval_vs_forward`` (the evaluation rate over it). ``--compare-naive`` also
runs the in-project baseline (explicit attention matrices, fp32, no compile) in a fresh process and adds its
numbers and the speed-up.

``--data-root DIR`` (a dataset of ``--data-format``; train mode reads its train split, eval mode its
test split) reads real files through the loaders of train.py / the evaluators (``--workers``
processes) and reports three rates: ``data_images_per_second`` (loader, decoding, crops and
normalisation on the device, no model), ``images_per_second`` (end to end: the same batches through
the training step or the evaluation) and ``step_images_per_second`` (the step alone on in-memory
batches of the same shape), with ``end_to_end_vs_step`` and ``end_to_end_vs_data``. ``--pipeline
host`` times the official torchvision transforms in the workers instead of the device pipeline.
``--time-pass`` adds ``data_pass_images_per_second``: the loader alone over the whole split, from the start
of a pass to its last batch (the second pass: workers already started), i.e. an epoch's data rate with
its pipeline fill and last round, which the steady-state rate leaves out; ``--batch-parts 1`` loads whole
batches per worker (a plain DataLoader, the official code) instead of one slice of each batch per worker
(DataLoader.loader.BatchLoader).

``--mode loader`` measures the loader's scheduling alone, on any machine: ``--images`` items that each take
``--image-ms`` of waiting in a worker (a stand-in for decoding: waiting, so that ``--workers`` workers run side
by side even on a 2-core machine) are consumed by a loop that waits ``--step-ms`` per batch (a stand-in for the
training step). It reports one pass's rate (the second: workers started) with whole batches per worker and
with slices (``--batch-parts``, default: as train.py), each as a ratio of the step-only rate. The defaults of
``--step-ms``, ``--images`` and ``--image-ms`` are those of the H200 runs of docs/performance.md, "Measured on
GPUs": the fp32 DeiT-S step (215 ms), 4,000 images, and 3.7 ms per image and worker, the value for which whole
batches give the measured 913 images/s; their loader also needs ``--workers 14 --batch-size 256`` (the
defaults, 4 and 16, are the other modes').

``--mode check --data-root DIR`` times the check of a split before training (DataLoader/check.py) on the first
``--images`` items of ``--split``: the header alone (what tools/check_dataset.py read before), the default check
(header, boxes and end marker) and the full decode, each in this process and over ``--workers`` processes, after
one untimed pass that brings the files into the page cache; the ratios of the rates, and with each rate the
seconds it gives for a split of CUB's (11,788 images), ImageNet val's (50,000) and ImageNet train's (1,281,167)
size.
"""
import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DataLoader import FORMATS, SPLITS, build_dataset, build_loader  # noqa: E402
from DataLoader.check import check_split, image_problem  # noqa: E402
from DataLoader.dataset import UNREADABLE  # noqa: E402
from DataLoader.device_transforms import on_device  # noqa: E402
from DataLoader.eval_views import EvalViews, default_resize_size, includes_sat, includes_wsol  # noqa: E402
from DataLoader.transforms import TrainPixels, train_transform  # noqa: E402
from Model import build_model  # noqa: E402
from Model.losses import SATLoss  # noqa: E402
from Model.sat import ATTENTION_IMPLS  # noqa: E402
from utils.amp import LossScaler, autocast_context, describe  # noqa: E402
from utils.config import FIELDS, OneLineParser, at_least  # noqa: E402
from utils.engine import CompiledFullBatches, evaluate, forward_in_parts, train_one_epoch  # noqa: E402
from utils.errors import ConfigError, run_cli  # noqa: E402
from utils.host_memory import keep_freed_memory  # noqa: E402
from utils.metrics import TRAIN_THRESHOLDS, SATLocAccumulator, WSOLBoxAccumulator  # noqa: E402
from utils.optim import build_optimizer, build_scheduler  # noqa: E402


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--mode", choices=("train", "eval", "loader", "check"), default="train",
                   help="what is measured (default %(default)s)")
    p.add_argument("--arch", default="deit_sat_small_patch16_224", help="model architecture (default %(default)s)")
    p.add_argument("--num-classes", type=at_least(1), default=200, help="classes of the model (default %(default)s)")
    p.add_argument("--img-size", type=at_least(16), default=224, help="input crop size in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="images per batch (default %(default)s)")
    p.add_argument("--steps", type=at_least(1), default=5,
                   help="timed steps (batches), after --warmup untimed ones (default %(default)s)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first (default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default auto: cuda when available, else cpu, as the scripts')")
    p.add_argument("--attn-impl", choices=ATTENTION_IMPLS, default="fused",
                   help="attention implementation, as the config key attn_impl")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast, as train.py --amp (default: fp32, as train.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model as the scripts' --compile does "
                   "(full batches; eval: full forwards)")
    p.add_argument("--eval-protocol", "--protocol", dest="protocol", choices=("sat", "wsol", "both"), default="sat",
                   help="eval mode: the evaluation protocol, as train.py's and the evaluators' (--protocol: its "
                   "former name; default %(default)s)")
    p.add_argument("--tencrop", action="store_true", help="eval mode: ten-crop classification")
    p.add_argument("--thresholds", type=FIELDS["threshold"].parse, nargs="+", default=list(TRAIN_THRESHOLDS),
                   help="eval mode: the map thresholds searched, as train.py --eval-thresholds (default: its default)")
    p.add_argument("--box-processes", type=int, default=None, metavar="N",
                   help="eval mode: box extraction processes (default: as evaluator.py; 0: a thread pool)")
    p.add_argument("--compare-naive", action="store_true", help="also run the naive fp32 baseline")
    p.add_argument("--data-root", help="read this dataset's image files (train or test split) end to end")
    p.add_argument("--data-format", choices=FORMATS, default="cub", help="with --data-root (default %(default)s)")
    p.add_argument("--metadata-root", help="with --data-root: wsolevaluation metadata (the wsol format needs it)")
    p.add_argument("--val-boxes", help="with --data-root: ImageNet val boxes or the folder format's boxes CSV")
    p.add_argument("--workers", type=at_least(0), default=4,
                   help="with --data-root: loader worker processes (default %(default)s)")
    p.add_argument("--resize-size", type=int, help="with --data-root (default 256/224 x --img-size)")
    p.add_argument("--pipeline", choices=("device", "host"), default="device",
                   help="with --data-root: crops and normalisation on the device (train.py, evaluators) or "
                        "the torchvision transforms in the workers (the official pipeline)")
    p.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=False,
                   help="with --data-root and --pipeline device: decode and resize on the device (train.py / "
                        "evaluator.py --gpu-decode)")
    p.add_argument("--batch-parts", type=at_least(1), default=None, metavar="N",
                   help="with --data-root: workers loading each batch (default: as train.py, one slice per "
                        "worker; 1: whole batches, as a plain DataLoader)")
    p.add_argument("--time-pass", action="store_true",
                   help="with --data-root: also time a whole pass over the split (data only)")
    p.add_argument("--images", type=at_least(1), default=4000,
                   help="loader mode: items in a pass; check mode: items checked (the first of the split) (default "
                        "%(default)s)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="check mode: the split checked (default %(default)s)")
    p.add_argument("--image-ms", type=at_least(0, float), default=3.7,
                   help="loader mode: a worker's time per item, in ms (default %(default)s)")
    p.add_argument("--step-ms", type=at_least(0.001, float), default=215.0,
                   help="loader mode: the step's time per batch, in ms (default %(default)s)")
    args = p.parse_args(argv)
    if args.gpu_decode and (args.pipeline != "device" or not args.data_root):
        p.error("--gpu-decode decodes image files on the device: it needs --data-root and --pipeline device")
    if args.compare_naive and args.mode in ("loader", "check"):
        p.error(f"--compare-naive compares the model's naive fp32 baseline: --mode train or eval, not {args.mode}")
    if args.mode == "check" and not args.data_root:
        p.error("--mode check reads image files: it needs --data-root")
    if args.mode == "loader" and args.data_root:  # (it ran its simulation, minutes, and read nothing)
        p.error("--mode loader times the loader's scheduling on simulated items (--image-ms, --step-ms), not files: "
                "--mode train or eval with --data-root time the pipeline on files")
    if args.img_size % 16:
        p.error(f"--img-size: expected a multiple of the patch size 16, got {args.img_size}")
    if args.resize_size is not None and args.resize_size < args.img_size:  # (train mode: a worker's ValueError)
        p.error(f"--resize-size: expected at least --img-size {args.img_size} (the crops are taken from the resized "
                f"image), got {args.resize_size}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here")
    return args


def synthetic_train_batches(n, batch_size, img_size, num_classes, gen, pin=False):
    """In-memory training batches (``pin``: in pinned memory, as the loaders give them on CUDA, so that the
    step's non_blocking copies do not wait)."""
    return [{"image": _pinned(torch.randn(batch_size, 3, img_size, img_size, generator=gen), pin),
             "label": _pinned(torch.randint(0, num_classes, (batch_size,), generator=gen), pin), "num_skipped": 0}
            for _ in range(n)]


def synthetic_eval_batches(n, batch_size, img_size, num_classes, num_views, gen, pin=False):
    """In-memory evaluation batches of ``num_views`` views per image (``pin``: as synthetic_train_batches)."""
    batches = []
    for b in range(n):
        boxes = [torch.tensor([[20.0, 30.0, 180.0, 200.0]]) for _ in range(batch_size)]
        batches.append({
            "image": _pinned(torch.randn(batch_size, num_views, 3, img_size, img_size, generator=gen), pin),
            "label": torch.randint(0, num_classes, (batch_size,), generator=gen), "num_skipped": 0,
            "boxes": boxes, "size": [(224, 224)] * batch_size,
            "image_id": [f"synthetic/{b}_{i}.jpg" for i in range(batch_size)],
            "index": list(range(b * batch_size, (b + 1) * batch_size)),
        })
    return batches


def _pinned(tensor, pin):
    return tensor.pin_memory() if pin else tensor


class Take:
    """The next ``n`` batches of an iterator, with a length (train_one_epoch and evaluate ask for it); counts
    the images it yields."""

    def __init__(self, iterator, n):
        self.iterator, self.n, self.images = iterator, n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        for batch in itertools.islice(self.iterator, self.n):
            self.images += len(batch["label"])  # a split's last batch may be short
            yield batch


def endless(loader):
    while True:
        yield from loader


def file_loader(args):
    """The loader train.py (train mode) or the evaluators (eval mode) build for --data-root."""
    resize = args.resize_size or default_resize_size(args.img_size)
    device = args.pipeline == "device"
    if args.mode == "train":
        transform = TrainPixels(args.img_size, resize, args.gpu_decode) if device \
            else train_transform(args.img_size, resize)
    else:
        views = EvalViews(args.protocol, args.tencrop, args.img_size, resize)
        transform = views.pixels(args.gpu_decode) if device else views
    dataset = build_dataset(args.data_format, args.data_root, "train" if args.mode == "train" else "test",
                            transform, metadata_root=args.metadata_root, val_boxes=args.val_boxes)
    return build_loader(dataset, args.batch_size, train=args.mode == "train", workers=args.workers,
                        parts=args.batch_parts, pin_memory=torch.device(args.device).type == "cuda")


def time_pass(loader, device):
    """Images per second of the second of two whole passes of ``loader`` onto ``device`` (no model)."""
    for _ in range(2):
        start, images = time.perf_counter(), 0
        for batch in on_device(loader, device):
            images += len(batch["label"])
        sync(device)
    return images / (time.perf_counter() - start)


def time_data(args, batches, device):
    """Images per second of loading batches onto ``device`` in the steady state: 2 batches per worker (at
    least what the workers load ahead) and ``args.warmup`` more are taken untimed, then at least ``args.steps``
    and 2 per worker are timed, so that no batch loaded before the clock started is counted."""
    ahead = 2 * max(args.workers, 1) + args.warmup
    for _ in on_device(Take(batches, ahead), device):
        pass
    sync(device)
    timed = Take(batches, max(args.steps, 2 * max(args.workers, 1)))
    start = time.perf_counter()
    for _ in on_device(timed, device):
        pass
    sync(device)
    return timed.images / (time.perf_counter() - start)


def peak_memory_mb(device):
    """MiB: on CUDA the peak allocated by tensors (counted from the built model on); on a CPU the process's peak
    resident memory since it started (libraries, model and batches: compare runs by their ratio)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_train(args, model, device, batches=None):
    """(seconds, images) of ``args.steps`` training steps (after ``args.warmup``) over ``batches`` (an
    iterator of loader batches), or over synthetic in-memory batches."""
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, schedule="constant", lr=1e-4, min_lr=1e-6, epochs=1, warmup_epochs=0,
                                steps_per_epoch=args.warmup + args.steps)
    if batches is None:
        gen = torch.Generator().manual_seed(0)
        timed = synthetic_train_batches(args.steps, args.batch_size, args.img_size, args.num_classes, gen,
                                        pin=device.type == "cuda")
        warm, timed = timed[:args.warmup], Take(iter(timed), args.steps)
    else:
        warm, timed = Take(batches, args.warmup), Take(batches, args.steps)
    criterion, loss_scaler = SATLoss(area_thr=0.25), LossScaler(device, args.amp)
    kwargs = dict(scheduler=scheduler, autocast=autocast_context(device, args.amp), progress=False, log_every=10**9)
    train_one_epoch(model, criterion, warm, optimizer, device, 0, loss_scaler, **kwargs)
    sync(device)
    start = time.perf_counter()
    train_one_epoch(model, criterion, timed, optimizer, device, 0, loss_scaler, **kwargs)
    sync(device)
    return time.perf_counter() - start, timed.images


def blob_maps(img_size=224, n=64):
    """``n`` random-blob maps of the model's patch grid (14x14 at 224) and a GT box each, in ``img_size`` pixels."""
    rng = np.random.default_rng(0)
    grid = img_size // 16
    yy, xx = np.mgrid[:grid, :grid]
    maps = np.stack([np.exp(-((xx - rng.uniform(0.15, 0.85) * grid) ** 2 + (yy - rng.uniform(0.15, 0.85) * grid) ** 2)
                            / (rng.uniform(0.02, 0.1) * grid ** 2)) for _ in range(n)]).astype(np.float32)
    return maps, [np.array([[0.13, 0.18, 0.67, 0.76]]) * img_size] * n


def box_ms_per_image(thresholds, img_size=224):
    """The sat protocol's box extraction + IoU at ``thresholds``, per image, on 64 random-blob maps."""
    maps, gt = blob_maps(img_size)
    acc = SATLocAccumulator(thresholds, map_size=img_size)
    start = time.perf_counter()
    acc.update(maps, gt, np.zeros((len(maps), 5), np.float32), np.zeros(len(maps), np.int64))
    return (time.perf_counter() - start) * 1000 / len(maps)


def wsol_box_ms_per_image():
    """The wsol protocol's box extraction + IoU at its 100 map thresholds, per image, on the same maps (224 px)."""
    maps, gt = blob_maps()
    acc = WSOLBoxAccumulator()
    start = time.perf_counter()
    acc.update(maps, gt)
    return (time.perf_counter() - start) * 1000 / len(maps)


def run_forward(args, model, device):
    """Seconds of the model's forward alone over ``args.steps`` synthetic evaluation batches (all views,
    no box extraction, no metrics): the rate evaluation is compared with."""
    views = EvalViews(args.protocol, args.tencrop, args.img_size, args.resize_size)
    gen = torch.Generator().manual_seed(0)
    batches = [b["image"].to(device) for b in synthetic_eval_batches(
        args.warmup + args.steps, args.batch_size, args.img_size, args.num_classes, views.num_views, gen)]
    autocast = autocast_context(device, args.amp)
    model.eval()
    model = CompiledFullBatches(model) if args.compile else model
    with torch.no_grad():
        for i, images in enumerate(batches):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            with autocast():
                forward_in_parts(model, images.flatten(0, 1))
    sync(device)
    return time.perf_counter() - start


def run_eval(args, model, device, batches=None):
    """(seconds, images) of evaluating ``args.steps`` batches (after ``args.warmup``) from ``batches`` (an
    iterator of loader batches), or synthetic in-memory batches."""
    views = EvalViews(args.protocol, args.tencrop, args.img_size, args.resize_size)
    if batches is None:
        gen = torch.Generator().manual_seed(0)
        batches = iter(synthetic_eval_batches(args.warmup + args.steps, args.batch_size, args.img_size,
                                              args.num_classes, views.num_views, gen, pin=device.type == "cuda"))
    kwargs = dict(device=device, thresholds=args.thresholds, views=views, amp=args.amp, progress=False,
                  box_processes=args.box_processes, compile=args.compile)
    if args.warmup:  # (an evaluation of no batch has nothing to score)
        evaluate(Take(batches, args.warmup), model, **kwargs)
    sync(device)
    timed = Take(batches, args.steps)
    start = time.perf_counter()
    evaluate(timed, model, **kwargs)
    sync(device)
    return time.perf_counter() - start, timed.images


class WaitingItems(Dataset):
    """``n`` items that each take ``ms`` milliseconds in the worker that loads them."""

    def __init__(self, n, ms):
        self.n, self.ms = n, ms

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        time.sleep(self.ms / 1000)
        return {"image": torch.zeros(1), "label": 0, "index": index}


def run_loader(args):
    """--mode loader: the second pass of each loader, whole batches then slices, through a loop that waits
    ``--step-ms`` per batch."""
    step_rate = args.batch_size / (args.step_ms / 1000)
    result = {"mode": "loader", "workers": args.workers, "batch_size": args.batch_size, "images": args.images,
              "image_ms": args.image_ms, "step_ms": args.step_ms, "step_images_per_second": round(step_rate, 3)}
    for name, parts in (("whole_batches", 1), ("slices", args.batch_parts)):
        loader = build_loader(WaitingItems(args.images, args.image_ms), args.batch_size, train=True,
                              workers=args.workers, parts=parts, drop_last=False)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            start, first = time.perf_counter(), None
            for _ in loader:
                first = time.perf_counter() - start if first is None else first
                time.sleep(args.step_ms / 1000)
            elapsed = time.perf_counter() - start
        rate = args.images / elapsed
        result[name] = {"batch_parts": loader.parts, "images_per_second": round(rate, 3),
                        "vs_step": round(rate / step_rate, 3), "first_batch_seconds": round(first, 3)}
    return result


# Images in the splits whose check time --mode check reports.
CHECK_SIZES = {"cub": 11788, "imagenet_val": 50000, "imagenet_train": 1281167}


def run_check(args):
    """--mode check: images per second of each way of checking the first ``--images`` items of a split."""
    dataset = build_dataset(args.data_format, args.data_root, args.split, lambda image: image,
                            metadata_root=args.metadata_root, val_boxes=args.val_boxes)
    dataset.items = dataset.items[:args.images]
    for index in range(len(dataset)):  # untimed: every file into the page cache
        image_problem(dataset.image_path(index), decode=False)
    start = time.perf_counter()
    for index in range(len(dataset)):
        try:
            Image.open(dataset.image_path(index)).close()  # the header alone
        except UNREADABLE:  # (a bad image is the check's to find: timed as any other, not a traceback)
            pass
    rates = {"header": len(dataset) / (time.perf_counter() - start)}
    for method, decode in (("marker", False), ("decode", True)):
        for workers in dict.fromkeys((0, args.workers)):  # --workers 0: the serial rates only
            report = check_split(dataset, args.split, workers, decode)
            rates[f"{method}_{'serial' if workers == 0 else 'workers'}"] = report.checked / report.seconds
    return {"mode": "check", "data_root": args.data_root, "data_format": args.data_format, "split": args.split,
            "images": len(dataset), "workers": args.workers, "cpus": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 2),
            "images_per_second": {name: round(rate, 1) for name, rate in rates.items()},
            "marker_vs_header": round(rates["marker_serial"] / rates["header"], 3),
            "decode_vs_marker": round(rates["decode_serial"] / rates["marker_serial"], 3),
            "workers_vs_serial": {method: round(rates[f"{method}_workers"] / rates[f"{method}_serial"], 3)
                                  for method in ("marker", "decode") if f"{method}_workers" in rates},
            "seconds": {name: {method: round(size / rate, 1) for method, rate in rates.items()}
                        for name, size in CHECK_SIZES.items()}}


def bench_model(args, device):
    """The timed model, seeded: drop path in train mode, and ``--compile`` as train.py does it (evaluation
    compiles inside ``evaluate``); the process's host memory kept as the scripts keep it (select_device)."""
    keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=args.num_classes, img_size=args.img_size,
                        drop_path_rate=0.1 if args.mode == "train" else 0.0, attn_impl=args.attn_impl).to(device)
    return CompiledFullBatches(model, args.batch_size) if args.compile and args.mode == "train" else model


def benchmark(args):
    if args.mode == "loader":
        return run_loader(args)
    if args.mode == "check":
        return run_check(args)
    device = torch.device(args.device)
    loader = file_loader(args) if args.data_root else None
    if loader is not None and loader.dataset.num_classes > args.num_classes:  # labels beyond the head
        raise ConfigError(f"--num-classes {args.num_classes}: the data at {args.data_root} has "
                          f"{loader.dataset.num_classes} classes; pass --num-classes {loader.dataset.num_classes}")
    model = bench_model(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = run_train if args.mode == "train" else run_eval
    if args.data_root:
        pass_rate = time_pass(loader, device) if args.time_pass else None
        batches = endless(loader)  # one iterator: the workers keep loading ahead
        data_rate = time_data(args, batches, device)
        elapsed, images = run(args, model, device, batches)
        step_elapsed, step_images = run(args, model, device)
        step_rate = step_images / step_elapsed
    else:
        elapsed, images = run(args, model, device)
    result = {
        "mode": args.mode, "arch": args.arch, "batch_size": args.batch_size, "steps": args.steps,
        "img_size": args.img_size, "device": str(device), "attn_impl": args.attn_impl,
        "precision": describe(device, args.amp), "compile": args.compile,
        "images_per_second": round(images / elapsed, 3), "ms_per_step": round(elapsed * 1000 / args.steps, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"),
    }
    if args.data_root:
        result.update(data_root=args.data_root, data_format=args.data_format, workers=args.workers,
                      pipeline=args.pipeline, gpu_decode=args.gpu_decode, images_in_split=len(loader.dataset),
                      batch_parts=loader.parts,
                      data_images_per_second=round(data_rate, 3), step_images_per_second=round(step_rate, 3),
                      end_to_end_vs_step=round(result["images_per_second"] / step_rate, 3),
                      end_to_end_vs_data=round(result["images_per_second"] / data_rate, 3))
        if pass_rate is not None:
            result.update(data_pass_images_per_second=round(pass_rate, 3))
    if args.mode == "eval":
        forward_rate = args.steps * args.batch_size / run_forward(args, model, device)
        result.update(forward_images_per_second=round(forward_rate, 3),
                      eval_vs_forward=round((step_rate if args.data_root else result["images_per_second"])
                                            / forward_rate, 3))
        result.update(eval_protocol=args.protocol, tencrop=args.tencrop, thresholds=args.thresholds)
        if includes_sat(args.protocol):
            result.update(box_ms_per_image=round(box_ms_per_image(args.thresholds, args.img_size), 3))
        if includes_wsol(args.protocol):
            result.update(wsol_box_ms_per_image=round(wsol_box_ms_per_image(), 3))
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = benchmark(args)
    if args.compare_naive:
        # the same flags, then the baseline's (argparse keeps the last --attn-impl / --amp / --no-amp)
        base_argv = [a for a in argv if a not in ("--compare-naive", "--compile")]
        out = subprocess.run([sys.executable, __file__, *base_argv, "--attn-impl", "naive", "--no-amp"],
                             check=True, capture_output=True, text=True).stdout
        base = json.loads(out.strip().splitlines()[-1])
        keys = ("attn_impl", "precision", "images_per_second", "peak_memory_mb")
        result.update(baseline={k: base[k] for k in keys},
                      speedup=round(result["images_per_second"] / base["images_per_second"], 3),
                      memory_ratio=round(result["peak_memory_mb"] / base["peak_memory_mb"], 3))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
