"""Train SAT on CUB-200-2011 (or any supported WSOL dataset; the synthetic demo without --data-root).

    python train.py --config config/CUB.yaml --data-root PATH --output-dir DIR [--epochs N --lr LR ...]
    python train.py                       # demo: config/demo.yaml on the generated synthetic dataset
    torchrun --nproc_per_node K train.py --config config/CUB.yaml --data-root PATH

The procedure, as the official train.py: config -> data -> model -> loss, optimizer, schedule -> (resume) ->
epochs of ``train_one_epoch``, each followed from ``eval_start_epoch`` on by an evaluation that keeps the best
checkpoints -> the final test of best.pth (results.json). train_ImageNet.py runs the same with ImageNet's
config. Every config key is also a flag (``python train.py --help``); ``--resume`` continues a run.
Which epochs are evaluated and which metric picks best.pth: utils/selection.py; whether a run may start in its
folder (--resume, --overwrite) and the lines after a stop: utils/run_folder.py.
"""
import collections
import functools
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from DataLoader import build_dataset, build_loader
from DataLoader.check import check_splits
from DataLoader.device_transforms import on_device
from DataLoader.eval_loader import build_eval_loader, resolve_data
from DataLoader.eval_views import default_resize_size, views_of
from DataLoader.image_cache import attach_image_cache
from DataLoader.loader import check_loading
from DataLoader.transforms import TrainPixels  # uint8 pixels: the engine crops on the device
from Model import SATLoss, build_model, check_pretrained, checkpoint_weights, model_spec
from Model.losses import LOSS_KEYS, area_span
from utils import distributed as dist_utils
from utils.amp import LossScaler, autocast_context, describe
from utils.checkpoint import (TrainingCheckpoints, check_resumable, load_checkpoint, resume_path, resume_training,
                              rng_state, seed_everything, set_rng_state)
from utils.config import given_as, job_settings, parse_config, save_config
from utils.engine import CompiledFullBatches, evaluate, log_evaluation_time, train_one_epoch
from utils.errors import (CheckpointError, ConfigError, DataError, OutputError, SATError, first_line,
                          resources_message, restated, run_cli, user_message)
from utils.logger import MetricsLog, close_logging, log_environment, log_error, setup_logging
from utils.optim import build_optimizer, build_scheduler, set_trainable
from utils.outputs import FolderLock, write_text_atomic
from utils.preemption import (StepCheckpoint, StopAtOnce, StopSignals, exit_when_stopped, ignore_stop_signals,
                              resume_command, signal_name)
from utils.run_folder import (IMAGE_CACHE, check_run_folder, check_shared_folder, how_to_continue, interrupted_message,
                              remove_image_cache, remove_old_image_cache, replace_previous_run)
from utils.selection import plan_evaluation, recorded_keys, should_evaluate, update_best

_logger = logging.getLogger("sat")
# What may change after running out of memory (a resumed run keeps batch_size; --accum-steps changes the batch
# area loss's images, see docs/training.md)
OUT_OF_MEMORY_ADVICE = ("less is needed with --accum-steps K (K micro-batches per step), a smaller --eval-batch-size "
                        "or --amp")


def main(argv=None, imagenet=False):
    """Entry point of train.py (``imagenet=False``) and train_ImageNet.py (``imagenet=True``)."""
    cfg = parse_config(argv, "train_imagenet" if imagenet else "train")
    info = dist_utils.init_distributed(cfg.device, cfg.local_rank)
    script = "train_ImageNet.py" if imagenet else "train.py"
    resume = resume_command(None if argv is None else [script, *argv], info.world_size > 1, info.launcher)
    progress = {"epoch": None, "saved": None}
    lock = FolderLock(cfg.output_dir, script)
    try:  # a stop signal outside the epochs (which save first) and the final test ends the run with this line
        with exit_when_stopped(info.is_main, lambda: interrupted_message(cfg, progress, resume)), \
                StopAtOnce(lambda name: interrupted_message(cfg, progress, resume, f"stopped by {name}")):
            return train(cfg, info, imagenet, progress, resume, lock)
    except Exception as err:
        if info.distributed and dist_utils.lost_peer(err):  # a backend traceback named neither cause nor resume
            err = SATError(interrupted_message(cfg, progress, resume, "another process of the job ended (killed, "
                                               "out of memory or its node failed: its own output says why; here: "
                                               f"{first_line(err)})"))
            log_error(err)
            raise err from None
        limit = resources_message(err, OUT_OF_MEMORY_ADVICE)
        if limit:  # out of memory, a loader worker killed: where it stopped, what is saved, how to resume
            err = SATError(interrupted_message(cfg, progress, resume, limit))
            log_error(err)
            raise err from None
        log_error(err)  # the terminal gets the line from run_cli (a traceback from Python for other errors)
        raise
    finally:
        lock.release()
        close_logging()
        dist_utils.cleanup()


def train(cfg, info, imagenet=False, progress=None, resume=None, lock=None):
    """One training run; ``progress`` ({'epoch', 'saved', 'steps_done', 'previous_kept'}) is kept up to date for the
    message after an interruption (utils/run_folder.interrupted_message); ``resume``: the command that continues
    the run (default: from sys.argv), for the lines of errors that stop it; ``lock``: the output folder's
    FolderLock, taken first (the caller releases it). Returns the record written to results.json."""
    # setup: the output folder (this run's, or an earlier run's that it continues or replaces), the log, the seed
    progress = {} if progress is None else progress
    resume = resume or resume_command(None, info.world_size > 1, getattr(info, "launcher", ""))
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if lock is not None:  # first: another job writing into the folder is what to say (on every process)
        dist_utils.run_on_main(info.is_main, lock.acquire)
        check_shared_folder(lock, info)
    dist_utils.check_agreement(job_settings(cfg), "their settings", "start the processes of every node with the same "
                               "config and flags")
    with dist_utils.said_by_main(info.is_main):  # (from the flags and what the main process finds)
        replaced = check_run_folder(cfg, output_dir)
        micro_batch = per_process_batch(cfg, info.world_size)
    dist_utils.run_everywhere(check_resumable, cfg, checkpoint_dir)  # before the log, data and model
    # a run with caches makes them there (build_loaders): the old ones (rebuilt from the images) go now, not once
    # the new ones are open
    replaced = remove_old_image_cache(output_dir, replaced, cfg.cache_images, info)
    progress["previous_kept"] = bool(replaced)  # --overwrite: the previous run stays until this one can start
    setup_logging(output_dir, info.is_main, info.rank, log_file=not replaced)  # not into the old run's log
    if replaced:
        _logger.info("--overwrite: the previous run's %s in %s go once this run has its data, model and first "
                     "batch", ", ".join(replaced), output_dir)
    cfg.resize_size = cfg.resize_size or default_resize_size(cfg.img_size)
    cfg.eval_batch_size = cfg.eval_batch_size or micro_batch
    seed_everything(cfg.seed + info.rank)
    _logger.info("config %s; %d process(es) on %s, global batch %d = %d per process x %d accumulation steps, %s; "
                 "batch area loss over %s", cfg.config or "(defaults)", info.world_size, info.device, cfg.batch_size,
                 micro_batch, cfg.accum_steps, describe(info.device, cfg.amp),
                 f"{area_span(cfg.area_loss_scope, micro_batch, info.world_size)} images (area_loss_scope "
                 f"{cfg.area_loss_scope}){loss_weights(cfg)}")
    log_environment(info.device)
    if cfg.ignored_config_keys:
        _logger.info("config %s: evaluator keys, not read by training: %s", cfg.config,
                     ", ".join(cfg.ignored_config_keys))
    if info.launcher:
        _logger.info("processes started by %s", info.launcher)

    # the checkpoint a --resume continues; else the DeiT weights to start from, found before the data is read
    resumed_from = resume_path(cfg, checkpoint_dir)
    if resumed_from is None:
        dist_utils.run_everywhere(check_pretrained, cfg.arch, cfg.pretrained)

    # data: the training split, the split that selects best.pth, and the final test split
    fmt, root = resolve_data(cfg.data_format, cfg.data_root, imagenet, info.is_main)
    cfg.data_format = fmt
    _logger.info("reading the %s data at %s (listing the splits, checking the evaluation images)", fmt, root)
    train_loader, selection_loader, test_loader, plan = dist_utils.run_everywhere(build_loaders, cfg, fmt, root, info,
                                                                                 micro_batch)
    train_set, selection_split = train_loader.dataset, "val" if cfg.val_split else "test"
    dist_utils.check_agreement(data_summary(train_set, selection_loader.dataset, test_loader.dataset),
                               "the data they read", "give every node the same dataset (--data-root)", DataError)
    _logger.info("data %s at %s: %d train images, %d classes; model selection on the %s split (%s%d images%s)",
                 fmt, root, len(train_set), train_set.num_classes, selection_split,
                 "ILSVRC2012's val/, " if fmt == "imagenet" and selection_split == "test" else "",
                 len(selection_loader.dataset), "" if cfg.val_split else "; no --val-split: as the official code does")
    if cfg.images_per_class and info.is_main:
        log_short_classes(train_set, cfg.images_per_class)
    if info.is_main:
        check_loading(cfg.workers, cfg.gpu_decode, info.device)
    check_data(cfg, info, train_set, {selection_split: selection_loader.dataset, "test": test_loader.dataset})

    # model, loss, optimizer and learning-rate schedule
    model, train_model = build_training_model(cfg, train_set.num_classes, info, micro_batch,
                                              pretrained=cfg.pretrained if resumed_from is None else False)
    spec = model_spec(model, cfg.arch, train_set.classes, num_spatial_blocks=cfg.num_spatial_blocks)
    criterion = SATLoss(cfg.area_thr, cfg.area_loss_scope, micro_batch=micro_batch,
                        area_loss_weight=cfg.area_loss_weight, norm_loss_weight=cfg.norm_loss_weight)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.decay_tokens)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    scheduler = build_scheduler(optimizer, schedule=cfg.lr_schedule, lr=cfg.lr, min_lr=cfg.min_lr,
                                epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, steps_per_epoch=steps_per_epoch)
    if cfg.warmup_epochs > cfg.epochs and info.is_main:  # e.g. demo.yaml's 3 warm-up epochs with --epochs 2
        _logger.warning("warmup epochs > epochs (%s; %s): the learning rate rises all run and never reaches lr %g",
                        given_as(cfg, "warmup_epochs"), given_as(cfg, "epochs"), cfg.lr)
    loss_scaler = LossScaler(info.device, cfg.amp)
    autocast = autocast_context(info.device, cfg.amp)
    if replaced:  # the new run can start: the old one goes
        load_first_batch(train_loader, info)
        replace_previous_run(output_dir, replaced, info, deleted=lambda: progress.update(previous_kept=False))
        progress["previous_kept"] = False

    # resume: weights, optimizer, schedule, RNG states and the position in the epoch of last.pth
    # (a last.pth saved when the evaluation after an epoch failed holds that epoch's training: ``trained``)
    resumed = resume_training(resumed_from, cfg, info, model, optimizer, scheduler, loss_scaler, steps_per_epoch,
                              checkpoint_dir)
    progress.update(epoch=resumed.epoch, saved=resumed.epoch, steps_done=resumed.steps_done)
    metrics_log = dist_utils.run_on_main(info.is_main, MetricsLog, output_dir, resumed.epoch)
    dist_utils.run_on_main(info.is_main, save_config, cfg, output_dir / "config.yaml", resumed.changed_line())
    checkpoints = TrainingCheckpoints(checkpoint_dir, functools.partial(checkpoint_weights, model), spec, cfg, info,
                                      optimizer, scheduler, loss_scaler, steps_per_epoch, best=resumed.best,
                                      progress=progress)

    # the epochs: train, evaluate (from eval_start_epoch), keep the best checkpoints, save last.pth
    stop = StopSignals()
    checkpointer = StepCheckpoint(stop, checkpoints.save_position, steps_per_epoch=steps_per_epoch,
                                  save_every_steps=cfg.save_every_steps, check_every=cfg.log_every,
                                  device=info.device, world_size=info.world_size, resume=resume)
    try:
        with stop:
            for epoch in range(resumed.epoch, cfg.epochs):
                progress["epoch"] = epoch
                steps_done = resumed.steps_done if epoch == resumed.epoch else 0
                if resumed.trained and epoch == resumed.epoch:
                    stats = resumed.trained
                else:
                    # this epoch's order, and each image's crop seed in the loader workers (BatchLoader), depend
                    # only on (seed, epoch): a resumed run sees the samples of the uninterrupted one
                    train_loader.sampler.set_epoch(epoch, steps_done * cfg.accum_steps)
                    stats = train_one_epoch(train_model, criterion, train_loader, optimizer, info.device, epoch,
                                            loss_scaler, scheduler=scheduler, accum_steps=cfg.accum_steps,
                                            autocast=autocast, clip_grad=cfg.clip_grad, log_every=cfg.log_every,
                                            world_size=info.world_size, progress=info.is_main,
                                            steps_done=steps_done, meters_state=resumed.meters if steps_done else None,
                                            on_step=functools.partial(checkpointer, epoch))
                record = {"epoch": epoch + 1, **{f"train_{key}": value for key, value in stats.items()}}
                metrics, improved = None, []
                if should_evaluate(cfg, epoch):
                    before, started = rng_state(info.device), time.perf_counter()
                    try:
                        metrics = evaluate(selection_loader, model, info.device,
                                           thresholds=cfg.eval_thresholds if plan.sat else (), amp=cfg.amp,
                                           distributed=info.distributed, progress=info.is_main,
                                           label=f"epoch {epoch + 1} {selection_split}")
                    except DataError as err:  # a file changed under the run (every process raises it)
                        path = checkpoints.save_trained(epoch, stats, before)
                        raise restated(err, f"the evaluation after epoch {epoch + 1} failed: {user_message(err)}; "
                                            f"the epoch's training is saved in {path} (a resumed run evaluates "
                                            f"epoch {epoch + 1} again): once the data is fixed, resume with: "
                                            f"{resume}") from None
                    metrics.update(metrics.get("at_best_threshold", {}))  # model selection: at the best threshold
                    improved = update_best(checkpoints.best, metrics, plan.selection_metric, epoch, plan.sat)
                    shown = (*recorded_keys(metrics, plan), *(("best_threshold",) if plan.sat else ()))
                    record.update({f"{selection_split}_{key}": metrics[key] for key in shown})
                    record[f"{selection_split}_time"] = time.perf_counter() - started  # seconds, loading included
                checkpoints.save_epoch(epoch, metrics, improved, metrics_log, record)
                if info.is_main:  # the epoch's numbers are global: logged once
                    log_epoch(cfg, epoch, stats, metrics, improved, selection_split, plan)
                checkpointer.end_of_epoch(epoch, checkpoints.path)
    except (CheckpointError, OutputError) as err:  # a checkpoint or the metrics could not be written
        raise restated(err, f"{err}; once that is fixed, {how_to_continue(checkpoint_dir, resumed_from, resume)}") \
            from None
    finally:
        if metrics_log is not None:
            metrics_log.close(quiet=sys.exc_info()[1] is not None)  # (an error stops the run: its line is said)

    # the final test of best.pth, as the official evaluator
    progress["epoch"] = cfg.epochs
    with StopSignals() as stop:  # once the test is evaluated, a signal only ends the run (see final_test)
        try:
            results = final_test(cfg, info, model, test_loader, checkpoint_dir, output_dir, plan, stopped=lambda
                                 name: interrupted_message(cfg, progress, resume, f"stopped by {name}"))
        except (DataError, CheckpointError, OutputError) as err:
            fixed = "the data" if isinstance(err, DataError) else "that"
            raise restated(err, f"the final test failed: {user_message(err)}; every epoch is saved in "
                                f"{checkpoint_dir} (a resumed run only runs the final test again): once {fixed} is "
                                f"fixed, resume with: {resume}") from None
        remove_image_cache(output_dir, cfg.cache_images, info)  # an interrupted run keeps it
        if stop.received and info.is_main:
            _logger.info("%s received after the final test: the run is complete", signal_name(stop.received))
    return results


def loss_weights(cfg):
    """The start line's words for loss weights other than the official 1 and 1 ('' for those)."""
    if cfg.area_loss_weight == 1 and cfg.norm_loss_weight == 1:
        return ""
    return (f"; loss = ce + {cfg.area_loss_weight:g} x area + {cfg.norm_loss_weight:g} x norm (official: "
            f"weights 1)")


# ------------------------------------------------------------------------------------------- final test
def final_test(cfg, info, model, test_loader, checkpoint_dir, output_dir, plan, stopped=None):
    """Evaluate best.pth on the test split as the official evaluator does (fp32, at ``threshold``, ten-crop
    classification with ``tencrop``) and write results.json; with report_best_threshold, also the metrics at
    the best of eval_thresholds chosen on the test split itself (labelled so). Without boxes: the plan's
    protocol (wsol metrics, or classification only). A stop signal while best.pth is loaded and evaluated
    raises Preempted at once with the line ``stopped(signal name)`` (utils/preemption.StopAtOnce)."""
    dist_utils.barrier()
    best_path = checkpoint_dir / "best.pth"
    sat, started = plan.sat, time.perf_counter()
    with StopAtOnce(stopped or (lambda name: f"stopped by {name} in the final test")):
        meta = load_checkpoint(best_path, model)
        # selected on held-out val: the wsol protocol's numbers also at val's map threshold (the fair protocol)
        held_out = meta["selection"].get("wsol_threshold") if cfg.val_split else None
        metrics = evaluate(test_loader, model, info.device, threshold=cfg.threshold if sat else None,
                           thresholds=cfg.eval_thresholds if cfg.report_best_threshold and sat else (),
                           wsol_threshold=held_out,
                           distributed=info.distributed, overlay_dir=output_dir / "overlays" if cfg.overlays else None,
                           overlays=None if cfg.overlays == "all" else cfg.overlays, progress=info.is_main,
                           label="final test")
    seconds = time.perf_counter() - started
    if info.is_main:
        log_evaluation_time(metrics, seconds)
    tencrop = views_of(test_loader.dataset).tencrop  # (build_loaders: cfg.tencrop where the protocol classifies)
    results = {"checkpoint": str(best_path), "epoch": meta["epoch"], "selection": meta["selection"], "split": "test",
               "eval_protocol": plan.protocol, **({"threshold": cfg.threshold} if sat else {}),
               "tencrop": tencrop, "precision": "fp32", "train_precision": describe(info.device, cfg.amp),
               **{key: metrics[key] for key in recorded_keys(metrics, plan)},
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if "at_wsol_threshold" in metrics:
        results["at_wsol_threshold"] = {"chosen_on": "val", **metrics["at_wsol_threshold"]}
    if cfg.report_best_threshold and sat:
        results["best_threshold"] = metrics["best_threshold"]  # as in the evaluators' metrics.json
        results["at_best_threshold"] = {
            "chosen_on": "test", "note": "the threshold maximising Top-1 + GT-known Loc on the evaluated split "
                                         "itself (not held out)",
            **{key: metrics[key] for key in ("num_images", "top1_cls", "top5_cls")}, **metrics["at_best_threshold"]}
    dist_utils.run_on_main(info.is_main, write_text_atomic, output_dir / "results.json",
                           json.dumps(results, indent=2) + "\n")
    if info.is_main:
        shown = [key for key in recorded_keys(metrics, plan) if key != "num_images" and not key.endswith("threshold")]
        rows = "\n".join(f"  {key:<15} {metrics[key]:8.2f}" for key in shown)
        classification = f"{'ten-crop' if tencrop else 'centre-crop'} classification"
        setting = (f"threshold {cfg.threshold:.2f}, {classification}" if sat else
                   f"{plan.protocol}, {classification}" if plan.classifies_official_view else plan.protocol)
        overlays = f"; the overlays to {output_dir / 'overlays'}" if cfg.overlays else ""  # (README's demo ones)
        _logger.info("test results of %s (epoch %d, %s, fp32):\n%s\nwritten to %s%s", best_path, meta["epoch"],
                     setting, rows, output_dir / "results.json", overlays)
    return results


# ------------------------------------------------------------------------------------------------- data
def data_summary(train_set, selection_set, test_set):
    """What the processes of a job must read alike: the classes and the number of images of each split (the
    steps of an epoch, the evaluation's shards)."""
    names = hashlib.sha1("\n".join(train_set.classes).encode()).hexdigest()[:12]
    return {"train images": len(train_set), "classes": len(train_set.classes), "class names (digest)": names,
            "evaluation images": len(selection_set), "test images": len(test_set)}


def per_process_batch(cfg, world_size):
    """Images per process and micro-batch: the global ``batch_size`` over processes and accumulation steps."""
    micro, rest = divmod(cfg.batch_size, world_size * cfg.accum_steps)
    if rest or micro == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} (global, per optimizer step) must be a multiple of "
                          f"processes ({world_size}) x accum_steps ({cfg.accum_steps})")
    return micro


def build_loaders(cfg, fmt, root, info, micro_batch):
    """Train loader, selection loader (the held-out 'val' split with --val-split, else test, as the official
    code does), the final test loader (ten-crop classification with ``tencrop``) and the :class:`EvalPlan`
    for what the evaluation splits hold."""
    common = dict(metadata_root=cfg.metadata_root, val_boxes=cfg.val_boxes)
    train_set = build_dataset(fmt, root, "train", TrainPixels(cfg.img_size, cfg.resize_size, cfg.gpu_decode),
                              images_per_class=cfg.images_per_class, seed=cfg.seed, strict=cfg.strict_data,
                              **common)
    if len(train_set) < cfg.batch_size:
        subset = f" (--images-per-class {cfg.images_per_class})" if cfg.images_per_class else ""
        if cfg.drop_last:  # every batch would be dropped: nothing to train
            raise DataError(f"{root}: the train split has {len(train_set)} images{subset}, fewer than one batch "
                            f"(--batch-size {cfg.batch_size}) with drop_last: no batch to train on; lower "
                            "--batch-size or give --no-drop-last")
        if info.is_main:
            _logger.warning("the train split has %d images%s, fewer than one batch (--batch-size %d): each epoch "
                            "is one partial batch", len(train_set), subset, cfg.batch_size)
    pin_memory = info.device.type == "cuda"
    train_loader = build_loader(train_set, micro_batch, train=True, workers=cfg.workers,
                                distributed=info.distributed, seed=cfg.seed, drop_last=cfg.drop_last,
                                pin_memory=pin_memory, accum_steps=cfg.accum_steps)

    def eval_loader(split, protocol, tencrop):
        return build_eval_loader(fmt, root, split, protocol=protocol, tencrop=tencrop, img_size=cfg.img_size,
                                 resize_size=cfg.resize_size, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                                 distributed=info.distributed, gpu_decode=cfg.gpu_decode, pin_memory=pin_memory,
                                 **common)

    selection_loader = eval_loader("val" if cfg.val_split else "test", cfg.eval_protocol, tencrop=False)
    plan = plan_evaluation(cfg, selection_loader.dataset)
    tencrop = cfg.tencrop and plan.classifies_official_view
    test_loader = selection_loader if not cfg.val_split and not tencrop else \
        eval_loader("test", plan.protocol, tencrop=tencrop)
    if cfg.cache_images:
        said = set()  # the selection and test loaders of one split share its cache: said once
        for dataset in dict.fromkeys(loader.dataset for loader in (train_loader, selection_loader, test_loader)):
            attach_image_cache(dataset, Path(cfg.output_dir) / IMAGE_CACHE, said)
    return train_loader, selection_loader, test_loader, plan


def log_short_classes(train_set, images_per_class):
    """--images-per-class N: a warning when some classes have fewer than N training images (all of theirs are
    used), since the run is named by N (config.yaml, tools/figure1.py)."""
    counts = collections.Counter(item.label for item in train_set.items)
    short = [count for count in counts.values() if count < images_per_class]
    if short:
        _logger.warning("--images-per-class %d: %d of the %d classes have fewer training images (as few as %d): all "
                        "of theirs are used", images_per_class, len(short), len(counts), min(short))


def check_data(cfg, info, train_set, eval_sets):
    """Before the first step: every image of the evaluation splits (and of the training split with
    check_train_split) complete and its boxes inside it (DataLoader/check.py); one DataError line otherwise,
    on every process, so that a broken test image is not found after training. Each process reads its share
    of the files (a main process alone made the others wait past NCCL's timeout on a slow file system)."""
    # --strict-data with several processes: a bad training image would stop one process alone mid-epoch while
    # the others wait in the gradient all-reduce, so the training split is checked first
    check_train = cfg.check_train_split or (cfg.strict_data and info.world_size > 1)
    if info.is_main and check_train and not cfg.check_train_split:
        _logger.info("--strict-data with %d processes: checking the training split too", info.world_size)
    options = dict(workers=cfg.workers, check_train=check_train, strict=cfg.strict_data, progress=True)
    if not info.distributed:
        check_splits(train_set, eval_sets, **options)
        return

    def gather(report):  # every process's report, or the failure of one whose check broke (said by that one)
        failures = dist_utils.all_gather_object(report if isinstance(report, str) else None)
        dist_utils.raise_first(failures, SATError)
        return dist_utils.all_gather_object(report)

    with dist_utils.said_by_main(info.is_main):
        check_splits(train_set, eval_sets, **options, shard=(info.rank, info.world_size), gather=gather)


def load_first_batch(train_loader, info):
    """Read the first training batch (to the device), as a check before --overwrite deletes anything; the RNG
    states are put back, so that the run draws what it would have drawn without it. One DataError on every
    process when one of them could not."""
    state = rng_state(info.device)
    failure = None
    try:
        batches = iter(on_device(train_loader, info.device))
        next(batches, None)
        batches.close()
    except DataError as err:
        failure = user_message(err)
    finally:
        set_rng_state(state)
    dist_utils.raise_first(dist_utils.all_gather_object(failure), DataError)


# ------------------------------------------------------------------------------------------------ model
def build_training_model(cfg, num_classes, info, micro_batch, pretrained):
    """(the model, the module that trains it: DDP-wrapped and / or compiled as configured; compiled for
    batches of ``micro_batch`` images). ``pretrained``: the initial weights (False when a checkpoint's follow)."""
    model = build_model(cfg.arch, num_classes=num_classes, pretrained=pretrained, img_size=cfg.img_size,
                        drop_path_rate=cfg.drop_path, num_spatial_blocks=cfg.num_spatial_blocks,
                        attn_impl=cfg.attn_impl)
    trainable = set_trainable(model, cfg.trainable)
    _logger.info("model %s: %.2fM parameters, %.2fM trainable (%s)", cfg.arch,
                 sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6, cfg.trainable)
    model.to(info.device)
    train_model = model
    if info.distributed:
        # a process's batch of one image (a skipped unreadable image, a last partial batch, a global batch of one
        # per process) leaves the class and spatial tokens' gradients as views into the token sequence's, with
        # strides DDP's buckets do not share: DDP copies them (a few hundred values) and torch says so in a
        # multi-line UserWarning per process that breaks into the progress bar; nothing for the user to do (the
        # filter is process-wide and stays after the run: it matches that message alone)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        train_model = CompiledFullBatches(train_model, micro_batch)
    return model, train_model


# ------------------------------------------------------------------------------------------- each epoch
def log_epoch(cfg, epoch, stats, metrics, improved, split, plan):
    if metrics is not None:
        best_mark = "  * best" if "best.pth" in improved else ""
        # the metrics by the names of the printed tables (utils.metrics.format_tables), as in the sat branch
        wsol = "  ".join(f"{name} {metrics[key]:.2f}" for key, name in (("maxboxaccv2", "MaxBoxAccV2"),
                                                                         ("pxap", "PxAP")) if key in metrics)
        if plan.sat:
            _logger.info("epoch %d %s: Top-1 Loc %.2f  GT-known Loc %.2f  Top-1 Cls %.2f  (at best_threshold %.2f "
                         "of eval_thresholds)%s%s", epoch + 1, split, metrics["top1_loc"], metrics["gt_known_loc"],
                         metrics["top1_cls"], metrics["best_threshold"], f"  {wsol}" if wsol else "", best_mark)
        else:
            _logger.info("epoch %d %s: %s%s", epoch + 1, split, "  ".join(filter(None, (wsol, f"Top-1 Cls "
                         f"{metrics['top1_cls']:.2f}"))), best_mark)
    if stats["num_skipped"]:
        _logger.warning("epoch %d: %d unreadable training images skipped (named in the log above; "
                        "--strict-data makes them an error)", epoch + 1, stats["num_skipped"])
    terms = " ".join(f"{key} {stats[key]:.4f}" for key in LOSS_KEYS if key != "loss")
    _logger.info("epoch %d/%d done in %.0fs (%.0f%% of it waiting for data): loss %.4f (%s), train acc %.2f, lr %.3g",
                 epoch + 1, cfg.epochs, stats["time"], 100 * stats["data_wait"] / max(stats["time"], 1e-9),
                 stats["loss"], terms, stats["acc1"], stats["lr"])


if __name__ == "__main__":
    run_cli(main)
    ignore_stop_signals()  # the run is complete
