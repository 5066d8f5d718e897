"""Command line shared by evaluator.py (CUB release, wsolevaluation metadata, custom folders, demo data)
and evaluator_ImageNet.py (ILSVRC2012 layout): flags, ``--config`` YAML defaults, the run, tables and
``<output-dir>/metrics.json``."""
import argparse
import json
import logging
import os
from pathlib import Path

from utils.config import read_yaml_mapping
from utils.errors import CheckpointError, ConfigError

_logger = logging.getLogger("sat")

# Per script: what it reads and the official evaluator's defaults (SPEC 5).
SCRIPTS = {
    "cub": {"description": "Evaluate a SAT checkpoint on CUB-200-2011 (default), wsolevaluation metadata "
                           "(--format wsol) or a custom folder dataset; without --data-root on the demo data.",
            "thresholds": [0.4], "tencrop": True},
    "imagenet": {"description": "Evaluate a SAT checkpoint on the ILSVRC2012 validation set.",
                 "thresholds": [0.3], "tencrop": False},
}


class _ConfigParser(argparse.ArgumentParser):
    """Parses the flags a config file stands for; errors name the file."""

    def __init__(self, source, **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def error(self, message):
        raise ConfigError(f"config file {self.source}: {message}")


def build_parser(kind, parser_class=argparse.ArgumentParser, **kwargs):
    spec = SCRIPTS[kind]
    p = parser_class(description=spec["description"], **kwargs)
    if kind == "cub":
        p.add_argument("--data-root", help="dataset root (default: the built-in demo data, generated if missing)")
        p.add_argument("--format", default="cub", choices=("cub", "wsol", "folder", "dogs", "cars", "aircraft"),
                       help="cub: CUB-200-2011 release; wsol: wsolevaluation metadata (needs --metadata-root), "
                            "images under --data-root; folder: <split>/<class>/<image>; dogs, cars, aircraft: "
                            "the Stanford Dogs, Stanford Cars, FGVC-Aircraft releases (default: cub)")
        p.add_argument("--metadata-root", help="wsolevaluation metadata folder holding <split>/image_ids.txt ...")
        p.add_argument("--split", default="test", choices=("test", "val"),
                       help="test, or val (wsolevaluation train-fullsup) (default: test)")
        p.add_argument("--val-boxes", help="boxes CSV of the folder format (default: <data-root>/boxes.csv)")
    else:
        p.add_argument("--data-root", help="ILSVRC2012 folder with val/ (and train/<wnid>/ for the class list)")
        p.add_argument("--val-boxes", help="val boxes: XML folder, LOC_val_solution.csv or val_gt.txt "
                                           "(default: looked for under --data-root)")
    p.add_argument("--checkpoint", help="checkpoint of this project or an official SAT release file (required)")
    p.add_argument("--config", help="YAML file of flag defaults (keys: flag names with underscores)")
    p.add_argument("--arch", help="architecture, for files that do not record it (official releases)")
    p.add_argument("--num-classes", type=int, help="classes, for files that do not record them")
    p.add_argument("--protocol", default="sat", choices=("sat", "wsol", "both"),
                   help="sat: official Top-1/Top-5/GT-known Loc; wsol: MaxBoxAcc/MaxBoxAccV2/PxAP; both")
    p.add_argument("--thresholds", type=float, nargs="+", default=spec["thresholds"], metavar="T",
                   help=f"protocol A localization thresholds (default: {spec['thresholds']})")
    p.add_argument("--tencrop", action=argparse.BooleanOptionalAction, default=spec["tencrop"],
                   help=f"protocol A ten-crop classification (default: {'on' if spec['tencrop'] else 'off'})")
    p.add_argument("--resize-size", type=int,
                   help="protocol A resize before the centre crop (default: the checkpoint's training setting, "
                        "else 256/224 x the input size)")
    p.add_argument("--save-scoremaps", metavar="DIR",
                   help="write <image_id>.npy protocol B score maps (224x224, [0, 1]) for wsolevaluation")
    p.add_argument("--save-images", metavar="DIR", help="write <image_id>.png overlays (heat map, boxes)")
    p.add_argument("--max-images", type=int, metavar="N", help="overlays of the first N images only")
    p.add_argument("--output-dir", default="output/eval", help="metrics.json and log.txt (default: output/eval)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward (default: 32)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading processes (default: 4, at most the number of CPUs)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="default: cuda when available, else cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default="auto",
                   help="bf16 autocast forward (default: on where CUDA or the CPU supports bf16 natively; metrics "
                        "stay within the tolerance in README, Performance); --no-amp: fp32 as the official evaluators")
    return p


def _config_argv(path, defaults):
    """The flags that the keys of a YAML config file stand for (unknown keys -> ConfigError)."""
    data = read_yaml_mapping(path)
    argv = []
    for key, value in data.items():
        if key not in defaults or key == "config":
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(defaults))})")
        flag = "--" + key.replace("_", "-")
        if isinstance(defaults[key], bool) and isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_args(argv, kind):
    """Flags over ``--config`` values over defaults; --checkpoint (and ImageNet's --data-root) required."""
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    if args.config:
        config_argv = _config_argv(args.config, vars(parser.parse_args([])))
        from_file = build_parser(kind, _ConfigParser, source=args.config).parse_args(config_argv)
        parser.set_defaults(**{key: value for key, value in vars(from_file).items() if key != "config"})
        args = parser.parse_args(argv)
    for name in ("checkpoint",) + (("data_root",) if kind == "imagenet" else ()):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    return args


def _data(args, kind, info):
    """(format, root) to read: the ImageNet layout, the given data, or the demo data."""
    if kind == "imagenet":
        return "imagenet", args.data_root
    if args.data_root is not None:
        return args.format, args.data_root
    if args.format != "cub":
        raise ConfigError(f"--format {args.format} needs --data-root")
    from DataLoader import DEFAULT_DEMO_ROOT, make_demo_dataset
    from utils.distributed import barrier

    if info.is_main:
        make_demo_dataset(DEFAULT_DEMO_ROOT)
    barrier()
    _logger.info("no --data-root: evaluating on the built-in demo data at %s", DEFAULT_DEMO_ROOT)
    return "cub", str(DEFAULT_DEMO_ROOT)


def _row(cells):
    return " | ".join(f"{cell:>{max(9, len(name))}}" for name, cell in cells)


def _table(title, columns):
    """A titled two-line table of (name, value) columns; floats with two decimals."""
    cells = [(name, f"{value:.2f}" if isinstance(value, float) else str(value)) for name, value in columns]
    return "\n".join([title, _row([(n, n) for n, _ in cells]), _row(cells)])


def format_tables(metrics, protocol, tencrop):
    """Readable protocol A and/or protocol B tables of a metrics dict."""
    tables = []
    if protocol in ("sat", "both"):
        classification = "ten-crop" if tencrop else "centre-crop"
        tables.append(_table(
            f"Protocol A (official SAT): {metrics['num_images']} images, {classification} classification, "
            f"best threshold {metrics['best_threshold']:g}",
            [("Top-1 Cls", metrics["top1_cls"]), ("Top-5 Cls", metrics["top5_cls"]),
             ("Top-1 Loc", metrics["top1_loc"]), ("Top-5 Loc", metrics["top5_loc"]),
             ("GT-known Loc", metrics["gt_known_loc"]), ("IoU30", metrics["iou30"]),
             ("IoU50", metrics["iou50"]), ("IoU70", metrics["iou70"])]))
        if len(metrics["thresholds"]) > 1:
            tables.append(_table("Protocol A per threshold (GT-known Loc / Top-1 Loc)", [
                (f"{t:g}", f"{gt:.2f} / {top1:.2f}") for t, gt, top1 in zip(
                    metrics["thresholds"], metrics["gt_known_loc_per_threshold"], metrics["top1_loc_per_threshold"])]))
    if protocol in ("wsol", "both"):
        prefix = "wsol_" if protocol == "both" else ""
        columns = [("Top-1 Cls", metrics[prefix + "top1_cls"]), ("Top-5 Cls", metrics[prefix + "top5_cls"])]
        if "maxboxacc" in metrics:
            columns += [("MaxBoxAcc", metrics["maxboxacc"]), ("MaxBoxAccV2", metrics["maxboxaccv2"])]
            columns += [(f"V2 IoU{iou}", acc) for iou, acc in metrics["maxboxaccv2_per_iou"].items()]
        if "pxap" in metrics:
            columns += [("PxAP", metrics["pxap"])]
        tables.append(_table(f"Protocol B (wsolevaluation, 224x224 score maps): {metrics['num_images']} images",
                             columns))
    return "\n\n".join(tables)


def _best_thresholds(metrics):
    best = {}
    if "best_threshold" in metrics:
        best["sat"] = metrics["best_threshold"]
    if "maxboxacc_threshold" in metrics:
        best["wsol"] = {"maxboxacc": metrics["maxboxacc_threshold"],
                        "maxboxaccv2_per_iou": metrics["maxboxaccv2_threshold_per_iou"]}
    if "piou_threshold" in metrics:
        best["wsol_piou"] = metrics["piou_threshold"]
    return best


def main(argv=None, kind="cub"):
    """Evaluate a checkpoint as the flags say; returns the record written to metrics.json."""
    from utils.amp import describe
    from utils.checkpoint import build_model_from_checkpoint
    from utils.distributed import cleanup, init_distributed
    from utils.evaluation import build_eval_loader, default_resize_size, evaluate
    from utils.logger import setup_logging

    args = parse_args(argv, kind)
    info = init_distributed(args.device)
    try:
        output_dir = Path(args.output_dir)
        setup_logging(output_dir, info.is_main, info.rank)
        model, meta = build_model_from_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
        img_size = int(model.patch_embed.img_size[0])
        resize_size = (args.resize_size or (meta.get("config") or {}).get("resize_size")
                       or default_resize_size(img_size))
        fmt, root = _data(args, kind, info)
        tencrop = args.tencrop and args.protocol != "wsol"
        loader = build_eval_loader(fmt, root, getattr(args, "split", "test"), protocol=args.protocol,
                                   tencrop=tencrop, img_size=img_size, resize_size=resize_size,
                                   batch_size=args.batch_size, workers=args.workers, distributed=info.distributed,
                                   metadata_root=getattr(args, "metadata_root", None), val_boxes=args.val_boxes)
        if loader.dataset.num_classes != model.num_classes:
            raise CheckpointError(f"checkpoint {args.checkpoint} predicts {model.num_classes} classes but the data "
                                  f"at {root} has {loader.dataset.num_classes}")
        arch = args.arch or meta.get("arch")
        _logger.info("evaluating %s (%s, %d classes, input %d) on %d images of %s, protocol %s, thresholds %s, "
                     "%s, %s", args.checkpoint, arch, model.num_classes, img_size, len(loader.dataset), root,
                     args.protocol, args.thresholds, "ten-crop" if tencrop else "single crop",
                     describe(info.device, args.amp))
        metrics = evaluate(model.to(info.device), loader, device=info.device, thresholds=args.thresholds,
                           protocol=args.protocol, tencrop=tencrop, amp=args.amp, img_size=img_size,
                           resize_size=resize_size, distributed=info.distributed,
                           save_scoremaps=args.save_scoremaps, save_images=args.save_images,
                           max_images=args.max_images, progress=info.is_main)
        record = {"checkpoint": str(args.checkpoint), "arch": arch, "num_classes": model.num_classes,
                  "img_size": img_size, "resize_size": resize_size, "data_format": fmt, "data_root": str(root),
                  "split": getattr(args, "split", "test"), "protocol": args.protocol,
                  "thresholds": args.thresholds, "tencrop": tencrop,
                  "precision": describe(info.device, args.amp), **metrics,
                  "best_thresholds": _best_thresholds(metrics)}
        if info.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "metrics.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            _logger.info("\n%s\n", format_tables(record, args.protocol, tencrop))
            _logger.info("metrics written to %s", output_dir / "metrics.json")
        return record
    finally:
        cleanup()
