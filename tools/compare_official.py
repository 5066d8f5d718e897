"""This project against the official code (wpy1999/SAT) on this machine's CPUs, side by side: the training
step (forward, SAT losses, backward, AdamW step) and evaluation end to end (forward, map -> boxes at the
training thresholds, metrics), on synthetic in-memory batches of the same shape.

    python tools/compare_official.py --official-root /path/to/SAT --official-deps /path/to/skimage --rounds 7

Each variant runs in its own process (the official Model / utils packages share our names), started once and
kept: the driver asks one process at a time for a measurement (``--steps`` batches), in turn, round after
round, so that a load that comes and goes on a shared machine hits every variant alike. The first round is a
warm-up and is not counted. Reported: each variant's median images/s, the ratio of the medians, and the median
of the per-round ratios (each measured next to the official run of its round). Ours runs tools/benchmark.py's
train / eval functions; the official side imports its model and evaluator from ``--official-root``, runs its
training step as its train.py does (loss = CE + |mean area - area_thr| + norm term; AdamW with its parameter
groups) and its ``val_loc_one_epoch`` (per-image loop, scikit-image box extraction) with tensors left on the
CPU. The official code needs scikit-image (``--official-deps DIR`` is put on its path). Prints one JSON line.
"""
import argparse
import contextlib
import importlib.machinery
import io
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
# The official train.py's list (ours: utils.metrics.TRAIN_THRESHOLDS, which the process running the official code
# cannot import: both projects have top-level Model/ and utils/ packages).
TRAIN_THRESHOLDS = [0.3, 0.35, 0.4, 0.45]


# The models both projects build (ours also has a nano size, the official code does not).
ARCHS = ("deit_sat_tiny_patch16_224", "deit_sat_small_patch16_224", "deit_sat_base_patch16_224")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (plain argparse: the workers cannot import our utils package, whose
    name the official code's takes)."""

    def error(self, message):
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        """``--flag=~/x`` with the home folder for ``~``, as a shell passes ``--flag ~/x`` (utils.config's
        OneLineParser does the same for the other tools)."""
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        home = [f"{flag}={os.path.expanduser(value)}" if word.startswith("--") and equals and value.startswith("~")
                else word for word in args for flag, equals, value in [word.partition("=")]]
        return super().parse_known_args(home, namespace)


def positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv=None):
    p = Parser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-root", required=True, help="a checkout of wpy1999/SAT")
    p.add_argument("--official-deps", help="folder with the official code's extra packages (scikit-image)")
    p.add_argument("--arch", choices=ARCHS, default="deit_sat_small_patch16_224", help="model (default %(default)s)")
    p.add_argument("--num-classes", type=positive, default=200, help="classes (default %(default)s)")
    p.add_argument("--batch-size", type=positive, default=32, help="images per batch (default %(default)s)")
    p.add_argument("--steps", type=positive, default=2, help="batches per measurement (default %(default)s)")
    p.add_argument("--rounds", type=positive, default=7,
                   help="measurements per variant, after a warm-up round (default %(default)s)")
    p.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"],
                   help="what is timed (default: train eval)")
    p.add_argument("--threads", type=positive, default=1,
                   help="torch threads per process (default 1: on a machine shared with other jobs, a thread that "
                        "waits at every operator for a descheduled sibling would dominate the times)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="also time ours with bf16 autocast (default: where the CPU has native bf16)")
    p.add_argument("--compile", action="store_true", help="also time ours in fp32 with --compile (torch.compile)")
    p.add_argument("--worker", choices=("official", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("train", "eval"), help=argparse.SUPPRESS)
    p.add_argument("--worker-amp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:  # what the workers need, said before they start (they would fail with a traceback)
        root = Path(args.official_root)
        missing = [name for name in ("evaluator.py", "Model/SAT.py") if not (root / name).is_file()]
        if missing:
            p.error(f"--official-root {root}: {'not found' if not root.exists() else 'has no ' + ', '.join(missing)}"
                    " (expected a checkout of wpy1999/SAT)")
        if args.official_deps and not Path(args.official_deps).is_dir():
            p.error(f"--official-deps {args.official_deps}: not a folder")
        if importlib.machinery.PathFinder.find_spec("skimage", [d for d in (args.official_deps,) if d] + sys.path) \
                is None:
            p.error("the official evaluator needs scikit-image, not found here"
                    + (f" nor in --official-deps {args.official_deps}" if args.official_deps else "")
                    + ": pip install --target DIR --no-deps scikit-image lazy_loader, then --official-deps DIR")
    return args


# ------------------------------------------------------------------------------------------ the workers
def synthetic_batches(args):
    """``args.steps`` random batches of ``args.batch_size`` 224 x 224 images and labels."""
    import torch
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch_size, 3, 224, 224, generator=gen),
             torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)) for _ in range(args.steps)]


def import_official(root, deps):
    """The official modules, imported from ``root`` alone."""
    sys.path[:0] = [p for p in (deps, str(root)) if p]
    try:
        import matplotlib.pyplot  # noqa: F401  (imported, never called, by its utils/func.py)
    except ImportError:
        for name in ("matplotlib", "matplotlib.pyplot"):
            sys.modules[name] = types.ModuleType(name)
    import torch
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # its loops move every tensor with .cuda()
    import evaluator
    from Model import SAT
    return SAT, evaluator


def official_optimizer(model):
    """AdamW as the official create_optimizerv2 builds it on its DataParallel wrapper (which hides
    no_weight_decay), with its defaults lr 1e-4 and weight decay 0.05: 1-D parameters and biases without weight
    decay, the rest with it."""
    import torch
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": 0.05}], lr=1e-4, weight_decay=0.0)


def official_measure(args):
    """A function that times ``args.steps`` batches of the official code and returns their seconds."""
    import torch
    SAT, evaluator = import_official(Path(args.official_root).resolve(), args.official_deps)
    torch.manual_seed(0)
    train = args.mode == "train"
    model = getattr(SAT, args.arch)(num_classes=args.num_classes, drop_path_rate=0.1 if train else 0.0,
                                    pretrained=False)
    batches = synthetic_batches(args)
    if train:
        optimizer, loss_fn, area_thr = official_optimizer(model), torch.nn.CrossEntropyLoss(), 0.25
        model.train()

        def measure():
            start = time.perf_counter()
            for images, labels in batches:
                optimizer.zero_grad()
                logits, area, norm = model(images, phase="train")
                area, norm = area.mean(0), norm.mean(0)
                loss = loss_fn(logits, labels) + torch.abs(area - area_thr).mean(0) + norm
                loss.backward()
                optimizer.step()
                SAT.compute_cls_acc(logits, labels)  # its per-step accuracy meter
            return time.perf_counter() - start
        return measure

    opts = argparse.Namespace(threshold=list(TRAIN_THRESHOLDS), evaluate=True, tencrop=False, crop_size=224,
                              root="CUB_200_2011", save_img_flag=False)
    boxes = torch.tensor([[20, 30, 180, 200]] * args.batch_size)  # as its loader collates the test boxes
    loader = [(images, images, labels, boxes, ["x.jpg"] * args.batch_size) for images, labels in batches]

    def measure():
        with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch prints
            start = time.perf_counter()
            evaluator.val_loc_one_epoch(opts, loader, model)
            return time.perf_counter() - start
    return measure


def ours_measure(args):
    """The same for this project: tools/benchmark.py's run_train / run_eval (train.py's and the evaluators'
    code paths) on ``args.steps`` synthetic batches (evaluation: after one untimed batch, as it needs)."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import benchmark
    bench = benchmark.parse_args(["--mode", args.mode, "--arch", args.arch, "--num-classes", str(args.num_classes),
                                  "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                  "--warmup", "0" if args.mode == "train" else "1",
                                  "--device", "cpu", "--amp" if args.worker_amp else "--no-amp",
                                  *(["--compile"] if args.worker_compile else [])])
    model = benchmark.bench_model(bench, torch.device("cpu"))
    run = benchmark.run_train if args.mode == "train" else benchmark.run_eval
    return lambda: run(bench, model, torch.device("cpu"))[0]  # seconds (of steps x batch size images)


def worker(args):
    """Answer each line on stdin with one measurement: a JSON line with its images/s."""
    import torch
    torch.set_num_threads(args.threads)
    measure = official_measure(args) if args.worker == "official" else ours_measure(args)
    for _ in sys.stdin:
        seconds = measure()
        print(json.dumps({"images_per_second": args.steps * args.batch_size / seconds,
                          "threads": torch.get_num_threads()}), flush=True)


# ------------------------------------------------------------------------------------------- the driver
def variants(args, amp):
    """name -> worker command line, official first in each mode."""
    common = [sys.executable, __file__, "--official-root", args.official_root, "--arch", args.arch, "--num-classes",
              str(args.num_classes), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    if args.official_deps:
        common += ["--official-deps", args.official_deps]
    runs = {}
    for mode in args.modes:
        runs[f"{mode}_official_fp32"] = common + ["--worker", "official", "--mode", mode]
        runs[f"{mode}_ours_fp32"] = common + ["--worker", "ours", "--mode", mode]
        if args.compile:
            runs[f"{mode}_ours_fp32_compile"] = common + ["--worker", "ours", "--mode", mode, "--worker-compile"]
        if amp:
            runs[f"{mode}_ours_bf16"] = common + ["--worker", "ours", "--mode", mode, "--worker-amp"]
    return runs


def ask(process, name):
    process.stdin.write("go\n")
    process.stdin.flush()
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"error: the {name} worker stopped:\n{process.stderr.read()[-3000:]}")
    return json.loads(line)["images_per_second"]


def measure_mode(args, runs):
    """images/s of every variant of one mode, per round (the warm-up round left out)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    processes = {name: subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env) for name, cmd in runs.items()}
    rates = {name: [] for name in runs}
    try:
        for r in range(args.rounds + 1):
            order = list(runs)
            order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
            for name in order:
                rate = ask(processes[name], name)
                if r:
                    rates[name].append(round(rate, 3))
                print(f"{'warm-up' if not r else f'round {r}/{args.rounds}'} {name}: {rate:.2f} images/s",
                      file=sys.stderr, flush=True)
    finally:
        for process in processes.values():
            process.stdin.close()
            process.wait(timeout=60)
    return rates


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from utils.amp import cpu_supports_bf16
    amp = cpu_supports_bf16() if args.amp is None else args.amp
    runs = variants(args, amp)
    rates = {}
    for mode in args.modes:
        rates.update(measure_mode(args, {name: cmd for name, cmd in runs.items() if name.startswith(mode)}))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {}
    for name, values in rates.items():
        official = rates[f"{name.split('_')[0]}_official_fp32"]
        if "official" not in name:
            ratios[name] = {"of_medians": round(medians[name] / statistics.median(official), 3),
                            "median_per_round": round(statistics.median(v / o for v, o in zip(values, official)),
                                                      3)}
    result = {"date": time.strftime("%Y-%m-%d"), "arch": args.arch, "batch_size": args.batch_size,
              "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__,
              "threads": args.threads, "cpu_native_bf16": cpu_supports_bf16(),
              "images_per_second": rates, "median": medians, "vs_official": ratios}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
