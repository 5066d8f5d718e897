"""Evaluate a SAT checkpoint on CUB-200-2011 (official defaults: threshold 0.4, ten-crop classification),
wsolevaluation metadata (--data-format wsol), another dataset format or a custom folder dataset; without
--data-root on the demo data. evaluator_ImageNet.py runs the same job on ILSVRC2012 with ImageNet's defaults.

    python evaluator.py --data-root data/CUB_200_2011 --checkpoint best.pth --eval-protocol both

The job: flags (and --config) -> the model from its checkpoint -> the evaluation loader -> ``evaluate`` (loader
-> forward -> boxes -> metrics, utils/engine.py) -> tables, metrics.json, per_image.csv and the other files
(docs/evaluation.md). With ``--maps DIR`` instead of a checkpoint, the saved maps of any method take the
forward's place (utils/saved_maps.py):

    python evaluator.py --data-root data/CUB_200_2011 --maps maps/ --predictions top5.csv --eval-protocol both
"""
import csv
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from DataLoader import DEFAULT_DEMO_ROOT
from DataLoader.build import build_dataset
from DataLoader.check import check_split
from DataLoader.eval_loader import build_eval_loader, resolve_data, resolve_protocol
from DataLoader.formats.imagenet import WNID
from DataLoader.eval_views import EvalViews, includes_sat, includes_wsol, views_of
from DataLoader.loader import check_loading
from Model import build_model_from_checkpoint
from Model.build import square_img_size
from utils.amp import describe
from utils.boxes import coco_detections
from utils.distributed import all_gather_object, cleanup, init_distributed, run_everywhere, run_on_main
from utils.config import parse_config
from utils.engine import NonFiniteOutputError, evaluate, log_evaluation_time
from utils.errors import (CheckpointError, ConfigError, DataError, SATError, echoed, resources_message, run_cli,
                          writing_outputs)
from utils.logger import LOG_FILE_ONLY, close_logging, log_environment, log_error, setup_logging
from utils.metrics import format_per_class, format_tables
from utils.preemption import ignore_stop_signals, signals_held, stopped_as_said, work_complete
from utils.outputs import (EVALUATION_FILES, FolderLock, Staged, check_output_file, partial_name,
                           previous_outputs)
from utils.saved_maps import (CLASS_KEYS, TOP5_KEYS, VIEW_FILE, SavedMaps, check_room_for_maps, drop_class_metrics,
                              map_loader, read_predictions, saved_view, top1_only, write_saved_view)
from utils.visualize import plot_curves

_logger = logging.getLogger("sat")
# What an evaluation writes into --output-dir besides log.txt: utils/outputs.EVALUATION_FILES and the overlays,
# each written under its partial_name until the evaluation is complete; "overlays" counts as the evaluation's
# only beside one of the files (train.py's final test draws overlays too).
OVERLAYS = "overlays"
PARTIALS = [partial_name(name) for name in EVALUATION_FILES + (OVERLAYS,)]
# The data keys evaluator_ImageNet.py takes no flag for (utils/config.py: NOT_IMAGENET_EVAL, split): it reads
# ILSVRC2012's val/ (build_dataset's 'test' split of the imagenet format), never wsolevaluation metadata.
IMAGENET_DATA = {"data_format": "imagenet", "metadata_root": None, "split": "test"}


def main(argv=None, imagenet=False):
    """Evaluate a checkpoint (or saved maps) as the flags say; returns the record written to metrics.json."""
    args = parse_config(argv, "evaluate_imagenet" if imagenet else "evaluate")
    if imagenet:
        vars(args).update(IMAGENET_DATA)
    info = init_distributed(args.device)
    job = evaluate_checkpoint if args.maps is None else evaluate_maps
    lock = FolderLock(args.output_dir, "evaluator_ImageNet.py" if imagenet else "evaluator.py")
    stopped = f"the evaluation stopped: nothing of it was kept (the outputs in {args.output_dir} are as they were)"
    try:  # SIGTERM (a job's time limit), Ctrl-C: what was begun is removed; one line, the status of a stopped job
        with stopped_as_said(stopped, info.is_main):
            output_dir, previous = start_logging(args, info, lock)
            try:
                return job(args, imagenet, info, output_dir, previous)
            except BaseException as err:
                # an error: every process has stopped writing (errors are shared), the main one cleans up; a
                # stop signal: each process cleans up as it stops, the last after the others' last file
                if info.is_main or not isinstance(err, Exception):
                    with signals_held():  # a second Ctrl-C (or the launcher's copy of the first) waits for it
                        discard_partials(args, output_dir)
                raise
    except Exception as err:
        limit = resources_message(err, "less is needed with a smaller --eval-batch-size or --amp")
        if limit:  # one line in log.txt as on the terminal, naming the evaluator's own flags
            err = SATError(limit)
            log_error(err)
            raise err from None
        log_error(err)  # the terminal gets the line from run_cli (a traceback from Python for other errors)
        raise
    finally:
        lock.release()
        close_logging()
        cleanup()


def discard_partials(args, output_dir):
    """Delete what an evaluation had begun to write (its partial files and folders, the --save-maps and
    --save-boxes ones); the earlier evaluation stays whole. Another process may delete the same at once."""
    paths = [output_dir / name for name in PARTIALS] + [Path(partial_name(path)) for path in
                                                        (args.save_maps, args.save_boxes) if path]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a folder no longer writable: left, as rmtree leaves one (the error said why)
                pass


def start_logging(args, info, lock):
    """(output folder, the previous evaluation's files there that this one replaces), with log.txt started
    (appended to) and the --config keys the evaluator does not read logged. The main process takes the folder's
    ``lock`` (utils/outputs.FolderLock: refused while another job writes into the folder); a folder holding an
    evaluation is refused without --overwrite, as are output paths that cannot be written. One line on every
    process (utils.distributed.run_on_main), before the model is built."""
    output_dir = Path(args.output_dir)

    def prepare():
        if output_dir.is_dir():  # first: another job writing into the folder is what to say
            lock.acquire()
        previous = check_output_paths(args, output_dir)
        lock.acquire()  # (a new folder is created once the paths are found fit)
        discard_partials(args, output_dir)  # what an evaluation that did not finish left (not a running one's)
        return previous

    previous = all_gather_object(run_on_main(info.is_main, prepare))[0]
    setup_logging(output_dir, info.is_main, info.rank)
    log_environment(info.device)
    if previous:
        _logger.info("--overwrite: the previous evaluation's %s in %s are replaced once this one is complete",
                     ", ".join(previous), output_dir)
    if args.ignored_config_keys:
        _logger.info("config %s: not read by the evaluator (model, optimisation, run and training-only keys): %s",
                     args.config, ", ".join(args.ignored_config_keys))
    if info.distributed:
        _logger.info("%d processes%s, each evaluating its share of the images", info.world_size,
                     f" started by {info.launcher}" if info.launcher else "")
    return output_dir, previous


def check_output_paths(args, output_dir):
    """The previous evaluation's files in ``output_dir`` (utils/outputs.py: refused without --overwrite); a
    ConfigError for an overlays/ folder no evaluation wrote when this one draws overlays, and for --save-boxes /
    --save-maps paths of the wrong kind."""
    previous = previous_outputs(output_dir, EVALUATION_FILES, args.overwrite, "evaluation")
    if (output_dir / OVERLAYS).exists():
        # beside a training run's results, overlays/ is its final test's, even with an evaluation there too (one
        # that drew no overlays): --overwrite --overlays replaced them. Told by train.py's own files: a folder
        # with a checkpoints/ of the user's own held the evaluator's overlays, refused, or kept beside new metrics
        trained = any((output_dir / name).exists() for name in ("results.json", "metrics.jsonl"))
        if previous and not trained:
            previous.append(OVERLAYS)
        elif args.overlays:
            raise ConfigError(f"{output_dir} holds an {OVERLAYS}/ folder that no evaluation wrote (train.py's final "
                              "test draws one): choose another --output-dir for the overlays")
    if args.save_boxes:
        own = [output_dir / name for name in (*EVALUATION_FILES, *PARTIALS, "log.txt")]
        check_output_file(args.save_boxes, args.overwrite, outputs=own)
    if args.save_maps:
        maps, out = Path(args.save_maps).resolve(), output_dir.resolve()
        if maps == out or maps in out.parents:  # the maps' folder, moved in place last, would replace the evaluation
            where = "is the --output-dir" if maps == out else f"holds the --output-dir {output_dir}"
            raise ConfigError(f"--save-maps {args.save_maps}: {where} (its maps would replace the evaluation's "
                              f"files); choose a folder of its own, e.g. {output_dir / 'maps'}")
        overlays = out / OVERLAYS
        if maps == overlays or overlays in maps.parents:  # overlays/ is replaced whole, the maps in it with it
            raise ConfigError(f"--save-maps {args.save_maps}: inside the {OVERLAYS}/ folder of the --output-dir "
                              f"(replaced whole by the evaluation's {OVERLAYS}); choose a folder of its own, e.g. "
                              f"{output_dir / 'maps'}")
        check_maps_folder(args.save_maps, args.overwrite)
    return previous


SAVED_MAPS = ("sat", "wsol", VIEW_FILE)  # what --save-maps writes into its folder (utils/saved_maps.write_maps)


def check_maps_folder(folder, overwrite):
    """ConfigError for a --save-maps folder that is a file, holds other files than saved maps (never touched:
    maps mixed from two sources would be scored as one method's), or earlier saved maps without --overwrite."""
    if os.path.basename(os.path.normpath(folder)) in (os.curdir, os.pardir):  # '.', '..': no name to stage it by
        raise ConfigError(f"--save-maps {folder}: name the folder by its path, e.g. {os.path.abspath(folder)} (it "
                          "is written beside it and moved in place once the evaluation is complete)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--save-maps {folder}: not a folder")
    if folder.is_symlink() or os.path.ismount(folder):  # the staged folder could not be renamed onto it at the end
        where = f"a link to {os.path.realpath(folder)}: name that folder" if folder.is_symlink() else \
            "a mount point: choose a folder inside it"
        raise ConfigError(f"--save-maps {folder}: {where} (the maps are written beside the folder and moved in "
                          "place once the evaluation is complete)")
    entries = sorted(os.listdir(folder)) if folder.is_dir() else []
    others = [name for name in entries if name not in SAVED_MAPS]
    if others:
        raise ConfigError(f"--save-maps {folder}: holds other files than saved maps ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")
    if entries and not overwrite:
        raise ConfigError(f"--save-maps {folder}: holds earlier saved maps: --overwrite to replace them (once this "
                          "evaluation is complete), or choose another folder")


def searched_thresholds(args, protocol):
    """The map thresholds --thresholds searches: the sat protocol's (none without it)."""
    return list(args.thresholds) if includes_sat(protocol) else []


def evaluate_settings(args, protocol, output_dir, info):
    """The ``evaluate`` arguments both jobs take from the flags: the map thresholds of the protocol, overlays
    (drawn under their partial_name until the evaluation is complete), per-image rows, box processes. Flags the
    protocol leaves unused are warned."""
    overlay_dir = output_dir / partial_name(OVERLAYS) if args.overlays else None
    flags = args.flags_given  # --threshold / --tencrop have defaults: said when given as flags
    unused = [flag for flag, given, used in (("--thresholds", args.thresholds, includes_sat(protocol)),
                                             ("--wsol-threshold", args.wsol_threshold is not None,
                                              includes_wsol(protocol)),
                                             ("--threshold", "threshold" in flags, protocol != "wsol"),
                                             ("--tencrop", "tencrop" in flags, protocol != "wsol"))
              if given and not used]
    if unused and info.is_main:
        _logger.warning("%s not used: the %s protocol does not read %s", " and ".join(unused), protocol,
                        "them" if len(unused) > 1 else "it")
    if args.overlay_blocks and info.is_main and (protocol == "wsol" or not args.overlays):
        _logger.warning("--overlay-blocks not used: %s", "the wsol protocol's overlays show the fused map only (the "
                        "block maps are drawn on the sat protocol's: --eval-protocol both)" if args.overlays else
                        "no --overlays to draw")
    return dict(threshold=args.threshold if protocol != "wsol" else None,
                thresholds=searched_thresholds(args, protocol), wsol_threshold=args.wsol_threshold,
                distributed=info.distributed, overlay_dir=overlay_dir, overlays=overlay_count(args),
                per_image=True, box_processes=args.box_processes,
                progress=info.is_main)


def overlay_count(args):
    """--overlays as ``evaluate`` takes it: a number of images, None for all."""
    return None if args.overlays == "all" else args.overlays


def evaluation_record(args, fmt, root, split, protocol, views):
    """The keys of metrics.json that say what was evaluated and how, for a checkpoint and for saved maps alike: the
    views' sizes, the data (tools/compare.py compares these across runs), the protocol, its views, the searched
    map thresholds."""
    return {"img_size": views.img_size, "resize_size": views.resize_size, "data_format": fmt,
            "data_root": os.path.abspath(root),
            "metadata_root": args.metadata_root and os.path.abspath(args.metadata_root), "split": split,
            "eval_protocol": protocol, "views": list(views.names), "tencrop": views.tencrop,
            "search_thresholds": searched_thresholds(args, protocol)}


def load_model(args, imagenet):
    """The model and metadata of --checkpoint (without --data-root: refused unless trained on the demo data)."""
    model, meta = build_model_from_checkpoint(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    square_img_size(model, args.checkpoint)
    if args.data_root is None and not imagenet:
        check_trained_on_demo(meta, args.checkpoint)
    return model, meta


def evaluate_checkpoint(args, imagenet, info, output_dir, previous):
    """The evaluation job: model, loader, ``evaluate``, then the tables and files of the output folder. (Each
    process loads the model and the data; an error there is said once: run_everywhere.)"""
    model, meta = run_everywhere(load_model, args, imagenet)
    if info.is_main:
        check_loading(args.workers, args.gpu_decode, info.device)
    img_size = int(model.patch_embed.img_size[0])
    resize_size = args.resize_size or (meta.get("config") or {}).get("resize_size")
    fmt, root = resolve_data(args.data_format, args.data_root, imagenet, info.is_main)
    split = args.split

    def load_data():
        loader = build_eval_loader(fmt, root, split, protocol=args.eval_protocol, tencrop=args.tencrop,
                                   img_size=img_size, resize_size=resize_size, batch_size=args.eval_batch_size,
                                   workers=args.workers, distributed=info.distributed,
                                   metadata_root=args.metadata_root, val_boxes=args.val_boxes,
                                   gpu_decode=args.gpu_decode, pin_memory=info.device.type == "cuda")
        return loader, match_classes(loader.dataset, model, meta, args.checkpoint)

    loader, labels_matched_by = run_everywhere(load_data)
    views = views_of(loader.dataset)
    protocol = views.protocol
    if args.eval_protocol == "auto":
        _logger.info("--eval-protocol auto: %s (%s)", protocol, {"sat": "the data has boxes", "wsol": "masks only",
                                                                "cls": "neither boxes nor masks"}[protocol])
    arch = meta["arch"]
    thresholds = "the wsol map thresholds 0, 0.01, ..., 0.99" if protocol == "wsol" else \
        f"threshold {args.threshold:g}" + (f" (searching {args.thresholds} for best_threshold)" if args.thresholds
                                           else "")
    _logger.info("evaluating %s (%d classes, input %d) on %d images of %s, protocol %s, views %s, %s, %s",
                 arch, model.num_classes, img_size, len(loader.dataset), root, protocol,
                 "+".join(views.names), thresholds, describe(info.device, args.amp))
    if args.save_boxes and protocol == "wsol":
        raise ConfigError("--save-boxes writes the sat protocol's boxes: use --eval-protocol both (or sat / cls)")
    if args.save_maps:
        needed = run_everywhere(check_room_for_maps, args.save_maps, len(loader.dataset), protocol,
                                img_size // model.patch_embed.patch_size[0])
        _logger.info("--save-maps: %s MB of maps into %s", f"{needed / 1e6:,.2f}", args.save_maps)
    start = time.perf_counter()
    try:
        metrics = evaluate(loader, model.to(info.device), info.device, amp=args.amp, compile=args.compile,
                           save_maps=args.save_maps and partial_name(args.save_maps),
                           overlay_blocks=args.overlay_blocks,
                           **evaluate_settings(args, protocol, output_dir, info))
    except NonFiniteOutputError as err:
        error = DataError(f"checkpoint {args.checkpoint}: {err}")
        raise echoed(error) if err.echo else error from None
    except DataError as err:  # e.g. an unreadable image: name every bad one of the split, not only the first
        found = all_gather_object(bad_images(loader.dataset, split, args.workers, info))[0]
        raise (DataError(found) if info.is_main else echoed(DataError(found))) if found else err from None
    if args.save_maps and info.is_main:  # moved in place by write_outputs, with the other outputs
        write_saved_view(partial_name(args.save_maps), views.img_size, views.resize_size)
    seconds = time.perf_counter() - start
    log_evaluation_time(metrics, seconds)
    rows, curves = metrics.pop("per_image"), metrics.pop("curves", None)
    record = {"checkpoint": str(args.checkpoint), "arch": arch, "num_spatial_blocks": model.num_spatial_blocks,
              "num_classes": model.num_classes, "labels_matched_by": labels_matched_by,
              **evaluation_record(args, fmt, root, split, protocol, views),
              "precision": describe(info.device, args.amp), "compile": args.compile, "gpu_decode": args.gpu_decode,
              "training_config": meta.get("config"), **metrics}
    work_complete()  # every process: a stop signal from now on lets the outputs be kept
    if info.is_main:
        write_outputs(args, output_dir, previous, record, rows, curves, loader.dataset.classes)
    return record


def check_trained_on_demo(meta, checkpoint):
    """Without --data-root the evaluator reads the built-in demo data, which only a checkpoint trained on it
    (its recorded config has no data_root, or that of the demo data) fits; any other (a released one, one
    trained on CUB) would be scored on 5 demo classes without a word: ConfigError naming its training data."""
    config = meta.get("config")
    trained_root = config and config.get("data_root")
    if config is None or trained_root is not None and Path(trained_root).resolve() != DEFAULT_DEMO_ROOT.resolve():
        trained_on = f"was trained on {config['data_root']}" if config else "records no training data"
        raise ConfigError(f"no --data-root: the evaluator would read the built-in demo data, but checkpoint "
                          f"{checkpoint} {trained_on}: pass --data-root (the dataset to evaluate on)")


def bad_images(dataset, split, workers, info):
    """After an evaluation stopped at a bad image: the line of the split's check (DataLoader/check.py, headers
    and end markers, as train.py checks before training), naming how many are bad and the first few; None when
    it finds none (the error was another) or on the other processes."""
    if not info.is_main:
        return None
    _logger.info("the evaluation stopped: checking every image of the %s split (headers, end markers)", split)
    report = check_split(dataset, split, workers)
    return report.summary() if report.bad else None


def evaluate_maps(args, imagenet, info, output_dir, previous):
    """Saved maps of any method (utils/saved_maps.py) through the same ``evaluate``: a loader of the split's
    annotations without pixels, the maps and the predictions' classes in place of the forward."""
    fmt, root = resolve_data(args.data_format, args.data_root, imagenet, info.is_main)
    split = args.split
    unused = [flag for flag, on in (("--amp", args.amp), ("--compile", args.compile),
                                    ("--gpu-decode", args.gpu_decode), ("--arch", args.arch is not None),
                                    ("--tencrop", "tencrop" in args.flags_given)) if on]
    if unused and info.is_main:
        _logger.warning("--maps: %s not used (saved maps need no model, no forward and no decoding)",
                        ", ".join(unused))
    dataset, protocol, views, predictions, maps = run_everywhere(load_maps, args, fmt, root, split)
    num_classes, ids = maps.num_classes, [item.image_id for item in dataset.items]
    strangers = maps.strangers(ids) if info.is_main else []
    if strangers:
        _logger.warning("--maps %s: %d map file(s) of images not in the %s split, ignored (first: %s): maps of "
                        "another split or dataset version?", args.maps, len(strangers), split, strangers[0])
    whole_image = maps.folders.get("sat", (None, True))[1]
    if not whole_image and info.is_main and not (Path(args.maps) / VIEW_FILE).is_file():
        _logger.warning("--maps %s: a sat/ folder without the %s that --save-maps writes beside it; its maps are "
                        "read as SAT's raw maps of the centre %d crop of %dx%d (whole-image maps of another method go "
                        "in %s itself, each protocol taking them through its own view); maps of another view (an "
                        "earlier version's --save-scoremaps or --save-maps of a model of another input size): write "
                        "%s beside sat/, e.g. {\"img_size\": 128, \"resize_size\": 144} (the model's input and resize "
                        "sizes)", args.maps, VIEW_FILE, views.img_size, views.resize_size, views.resize_size, args.maps,
                        Path(args.maps) / VIEW_FILE)
    loader = map_loader(dataset, views, overlay_count(args), args.eval_batch_size, args.workers, info.distributed)
    sat = includes_sat(protocol)
    scored = {"sat": "GT-known Loc and IoU30/50/70", "wsol": "the wsol metrics",
              "both": "GT-known Loc, IoU30/50/70 and the wsol metrics"}[protocol]
    top1 = top1_only(predictions, num_classes)
    _logger.info("scoring the maps in %s on %d images of %s, protocol %s%s; %s", args.maps, len(dataset), root,
                 protocol, f" (sat: the centre {views.img_size} crop of {views.resize_size}x{views.resize_size}, "
                 f"threshold {args.threshold:g})" if sat else "", f"classes from {args.predictions}"
                 f"{' (top-1 alone: no Top-5 Loc or Cls)' if top1 else ''}" if predictions
                 else f"no --predictions: no Top-1 / Top-5 Loc or Cls ({scored} only)")
    metrics = evaluate(loader, None, info.device, saved_maps=maps,
                       **evaluate_settings(args, protocol, output_dir, info))
    if predictions is None or top1:
        drop_class_metrics(metrics, TOP5_KEYS if top1 else CLASS_KEYS)
    rows, curves = metrics.pop("per_image"), metrics.pop("curves", None)
    record = {"maps": str(args.maps), "predictions": args.predictions, "num_classes": num_classes,
              **evaluation_record(args, fmt, root, split, protocol, views), **metrics}
    work_complete()  # every process: a stop signal from now on lets the outputs be kept
    if info.is_main:
        write_outputs(args, output_dir, previous, record, rows, curves, dataset.classes)
    return record


def load_maps(args, fmt, root, split):
    """(dataset, protocol, views, predictions, saved maps) of --maps on ``split``: the annotations without pixels,
    the protocol the maps are scored by, their views (views.json), the --predictions and the maps folder. Run by
    every process (its errors are said once: utils.distributed.run_everywhere)."""
    dataset = build_dataset(fmt, root, split, metadata_root=args.metadata_root, val_boxes=args.val_boxes)
    protocol = resolve_protocol(args.eval_protocol, dataset)
    if protocol == "cls" and args.eval_protocol == "cls":
        raise ConfigError("--maps with --eval-protocol cls: maps are scored by a localization protocol (sat, wsol or "
                          "both); classification alone needs a --checkpoint")
    if protocol == "cls":
        raise ConfigError(f"--maps: the {split} split of {root} has neither boxes nor masks: no localization to score")
    if args.overlay_blocks:
        raise ConfigError("--overlay-blocks with --maps: saved maps hold the fused map only (a checkpoint's "
                          "block maps: --checkpoint, or tools/predict.py --overlay-blocks)")
    if args.save_boxes:
        raise ConfigError("--save-boxes with --maps: COCO detections need class scores, which saved maps and "
                          "predictions do not carry (per_image.csv holds the boxes)")
    views = EvalViews(protocol, False, *saved_view(args.maps, args.resize_size))
    num_classes = max(args.num_classes or 0, dataset.num_classes)  # predictions may name classes beyond the data's
    dataset.classes += [str(k) for k in range(dataset.num_classes, num_classes)]
    ids = [item.image_id for item in dataset.items]
    predictions = read_predictions(args.predictions, ids, num_classes) if args.predictions else None
    maps = SavedMaps(args.maps, views, predictions, num_classes, args.allow_constant_maps)
    maps.check_complete(ids, split)
    return dataset, protocol, views, predictions, maps


def write_outputs(args, output_dir, previous, record, rows, curves, class_names):
    """metrics.json, the tables in the log, per_image.csv, the COCO boxes (--save-boxes), the wsol curves and
    the overlays, each written under its partial name, then moved in place of ``previous`` (the files of an
    earlier evaluation, --overwrite) together: a failure before leaves the earlier evaluation as it was."""
    protocol = record["eval_protocol"]
    staged = Staged()
    staged.path(output_dir / OVERLAYS)  # drawn there by ``evaluate``
    if args.save_maps:
        staged.path(args.save_maps)  # written there by ``evaluate`` (check_maps_folder: only earlier maps replaced)
    classification = "ten-crop" if record["tencrop"] else "centre-crop"
    if "maps" in record:
        classification = f"{record['predictions']}'s" if record["predictions"] else "no predictions: no"
    # a full disk: one line naming the file (its error names none; main() removes what was staged)
    with writing_outputs(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    staged.write_json(output_dir / "metrics.json", record, indent=1)
    _logger.info("\n%s\n", format_tables(record, protocol, classification))
    with writing_outputs(output_dir / "per_image.csv"):
        write_per_image(staged.path(output_dir / "per_image.csv"), rows)
    if args.save_boxes:
        entries = [{"file_name": row["image_id"], "size": (row["width"], row["height"]),
                    "class": row["top5"][0], "score": row["score"], "box": row["box_original"]} for row in rows]
        with writing_outputs(args.save_boxes):
            Path(args.save_boxes).parent.mkdir(parents=True, exist_ok=True)
        staged.write_json(args.save_boxes, coco_detections(entries, class_names))
    if curves:
        write_curves(output_dir, curves, staged)  # (the PNG's error names it: write_image)
    with writing_outputs(output_dir):
        staged.commit(output_dir, previous)
    if args.save_boxes:
        _logger.info("COCO-format boxes written to %s%s", args.save_boxes,
                     "" if protocol != "cls" else " (predictions: the data has no boxes to score them against)")
    if "per_class" in record:  # a line per class (200 for CUB, 1000 for ImageNet): log.txt alone
        _logger.info("per class (sat protocol, threshold %g):\n%s", args.threshold,
                     format_per_class(record["per_class"]), extra=LOG_FILE_ONLY)
    written = [f"the per-class table to {output_dir / 'log.txt'}"] if "per_class" in record else []
    if args.overlays:  # asked for: where they are, beside the metrics (the last line on screen)
        written.append(f"the overlays to {output_dir / OVERLAYS}")
    if args.save_maps:
        written.append(f"the maps to {args.save_maps}")
    _logger.info("metrics written to %s%s", output_dir / "metrics.json", "".join(f"; {what}" for what in written))


PER_IMAGE_COLUMNS = ("image_id", "label", "top5", "score", "box_crop", "box_original", "iou", "cls_correct",
                     "top1_loc", "gt_known", "width", "height")


def write_per_image(path, rows):
    """``per_image.csv``: one row per image; lists space-separated, floats written exactly (repr), empty
    cells where the data has nothing to score (no GT boxes)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PER_IMAGE_COLUMNS)
        for row in rows:
            writer.writerow([" ".join(map(repr, row[key])) if isinstance(row[key], list) else
                             int(row[key]) if isinstance(row[key], bool) else
                             repr(row[key]) if isinstance(row[key], float) else
                             "" if row[key] is None else row[key] for key in PER_IMAGE_COLUMNS])


def write_curves(output_dir, curves, staged):
    """``wsol_curves.json`` and ``wsol_curves.png`` (``staged``: utils/outputs.Staged): box accuracy against
    the map threshold (per IoU) and the PxAP precision-recall curve."""
    staged.write_json(output_dir / "wsol_curves.json", curves, indent=1)
    panels = []
    if "box_accuracy" in curves:
        box = curves["box_accuracy"]
        series = {"MaxBoxAcc (largest, IoU 50)": box["boxacc"]}
        series.update({f"V2 IoU{iou}": acc for iou, acc in box["boxaccv2_per_iou"].items()})
        panels.append(("box accuracy (%) vs map threshold", box["cam_thresholds"],
                       {name: values for name, values in series.items()}, (0, 1), (0, 100)))
    if "pxap" in curves:
        pr = curves["pxap"]
        points = [(r, p) for r, p in zip(pr["recall"], pr["precision"]) if p is not None]
        panels.append(("PxAP: precision vs recall", [r for r, _ in points], {"precision": [p for _, p in points]},
                       (0, 1), (0, 1)))
    if panels:
        plot_curves(staged.path(output_dir / "wsol_curves.png"), panels)


def match_classes(dataset, model, meta, checkpoint):
    """Align the dataset's labels with the model's classes: by name when the checkpoint records its class
    names (a class subset is remapped, with a warning), else by index. A class the model lacks is an
    error, and so are names all unlike the data's for another class count (a checkpoint of another dataset);
    names that differ are a warning naming a few (renamed classes), unless a name both have sits at another index
    (a class renamed, the others shifted: an error). Returns how labels were matched ("name" or "index"), for
    metrics.json."""
    names = meta.get("class_names")
    if names and set(dataset.classes) <= set(names) and dataset.classes != list(names):
        index = {name: k for k, name in enumerate(names)}
        mapping = [index[name] for name in dataset.classes]
        dataset.items = [dataclasses.replace(item, label=mapping[item.label]) for item in dataset.items]
        dataset.classes = list(names)
        if len(mapping) == len(names):
            _logger.warning("the data has the checkpoint's %d classes in another order: labels matched by name",
                            len(names))
        else:
            _logger.warning("the data has %d of the checkpoint's %d classes: evaluating on that class subset, labels "
                            "matched by name", len(mapping), len(names))
        return "name"
    named = not all(str(name).isdigit() for name in dataset.classes)  # wsol metadata names classes by index
    if names and named and dataset.num_classes != len(names) and not set(dataset.classes) & set(names):
        raise CheckpointError(f"checkpoint {checkpoint} was trained on other classes: none of its {len(names)} class "
                              f"names is among the data's {dataset.num_classes} (e.g. checkpoint {names[0]!r}, data "
                              f"{dataset.classes[0]!r}); is it for another dataset?")
    if dataset.num_classes > model.num_classes:
        extra = dataset.classes[model.num_classes:][:3]
        raise CheckpointError(f"checkpoint {checkpoint} predicts {model.num_classes} classes but the data has "
                              f"{dataset.num_classes}; classes outside the model: {', '.join(map(str, extra))}")
    matched = "name" if names and list(names[:dataset.num_classes]) == list(dataset.classes) else "index"
    position = {name: k for k, name in enumerate(names or ())}  # in the checkpoint
    moved = [(name, position[name], k) for k, name in enumerate(dataset.classes) if position.get(name, k) != k]
    if matched == "index" and moved:  # by index it would be scored as another class; by name a class is missing
        name, theirs, ours = moved[0]
        missing = next(c for c in dataset.classes if c not in names)
        raise CheckpointError(f"checkpoint {checkpoint}: class {name!r} is its class {theirs} but the data's class "
                              f"{ours}, and the data's class {missing!r} is not among the checkpoint's: labels match "
                              "neither by index nor by name; give the data the class names the model was trained on")
    if names and matched == "index":
        differ = [(a, b) for a, b in zip(dataset.classes, names) if a != b][:3]
        _logger.warning("the checkpoint's class names differ from the data's (labels matched by index), e.g. %s",
                        "; ".join(f"data {a!r} vs checkpoint {b!r}" for a, b in differ))
    if dataset.num_classes < model.num_classes and not names and all(WNID.fullmatch(str(c)) for c in dataset.classes):
        # an ImageNet class's index is its place among all 1000 wnids, which a subset of them does not tell
        raise CheckpointError(f"the data has {dataset.num_classes} of ImageNet's wnids ({dataset.classes[0]}, ...) "
                              f"and checkpoint {checkpoint} records no class names for its {model.num_classes} "
                              "classes: their indices cannot be told from a subset; give the data its train/ with "
                              "every wnid folder (the class list), or evaluate the whole val set")
    if dataset.num_classes < model.num_classes:
        _logger.warning("the data has %d classes, the model predicts %d: evaluating on a class subset (labels "
                        "taken as the model's first %d classes)", dataset.num_classes, model.num_classes,
                        dataset.num_classes)
        dataset.classes = list(dataset.classes) + [str(k) for k in range(dataset.num_classes, model.num_classes)]
    return matched


if __name__ == "__main__":
    run_cli(main)
    ignore_stop_signals()  # the evaluation is complete
