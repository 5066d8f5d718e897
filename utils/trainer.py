"""The shared body of train.py and train_ImageNet.py: configuration, data, model, optimizer, resume,
the epoch loop (utils.engine), per-epoch evaluation and model selection, checkpoints and the final
test evaluation of best.pth."""
import functools
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from DataLoader import build_dataset, build_loader
from DataLoader.eval_loader import build_eval_loader, demo_data_root, protocol_for_data
from DataLoader.eval_views import EvalViews, default_resize_size
from DataLoader.image_cache import attach_image_cache
from DataLoader.transforms import TrainPixels  # uint8 pixels: the engine crops on the device
from Model import build_model
from Model.losses import SATLoss, gaussian_kernel_3x3
from utils import distributed as dist_utils
from utils.amp import LossScaler, autocast_context, describe
from utils.checkpoint import load_checkpoint, model_spec, save_checkpoint
from utils.config import config_dict, parse_config, save_config
from utils.engine import train_one_epoch
from utils.evaluation import evaluate
from utils.errors import CheckpointError, ConfigError, DataError
from utils.logger import MetricsLog, close_logging, setup_logging
from utils.optim import build_optimizer, build_scheduler, set_trainable
from utils.preemption import Preempted, StepCheckpoint, StopSignals, resume_command

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
RESULT_KEYS = ("top1_loc", "top5_loc", "gt_known_loc", "top1_cls", "top5_cls", "iou30", "iou50", "iou70",
               "num_images")
# The checkpoints kept during training, each the first epoch reaching the maximum of its metric, as the
# official train.py keeps best_loc / best_top1 / best_gt; best.pth follows selection_metric (official: loc).
EXTRA_BEST = {"best_top1_loc.pth": "top1_loc", "best_gt_known_loc.pth": "gt_known_loc"}
_logger = logging.getLogger("sat")


# ----------------------------------------------------------------------------------------- seeds
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device="cpu"):
    """This process's RNG states (CPU, its GPU, numpy, random) in a form ``torch.load(weights_only=True)``
    accepts."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))


# ------------------------------------------------------------------------------------------ data
def resolve_data(cfg, imagenet, info):
    """(format, root): the configured data, or the synthetic demo dataset when no root is given."""
    if imagenet and cfg.data_format != "imagenet":
        _logger.info("train_ImageNet.py reads the ImageNet layout (data_format %s -> imagenet)", cfg.data_format)
        cfg.data_format = "imagenet"
    if cfg.data_root is not None:
        return cfg.data_format, cfg.data_root
    if imagenet:
        raise ConfigError("train_ImageNet.py needs --data-root (the ILSVRC2012 folder with train/ and val/)")
    return "cub", demo_data_root(info.is_main)


def build_loaders(cfg, fmt, root, info, micro_batch):
    """Train loader, selection loader (the held-out 'val' split with --val-split, else test, as the
    official code does), the final test loader (ten-crop classification with test_tencrop) and the
    evaluation plan (:func:`plan_evaluation`) for what the data's evaluation splits hold."""
    common = dict(metadata_root=cfg.metadata_root, val_boxes=cfg.val_boxes)
    train_set = build_dataset(fmt, root, "train", TrainPixels(cfg.img_size, cfg.resize_size, cfg.gpu_decode),
                              images_per_class=cfg.images_per_class, seed=cfg.seed, strict=cfg.strict_data,
                              **common)
    if len(train_set) < micro_batch * info.world_size:
        raise DataError(f"{root}: the train split has {len(train_set)} images, fewer than one batch "
                        f"({micro_batch} x {info.world_size} processes); lower --batch-size")
    train_loader = build_loader(train_set, micro_batch, train=True, workers=cfg.workers,
                                distributed=info.distributed, seed=cfg.seed, drop_last=cfg.drop_last)

    def eval_loader(split, protocol, tencrop):
        return build_eval_loader(fmt, root, split, protocol=protocol, tencrop=tencrop, img_size=cfg.img_size,
                                 resize_size=cfg.resize_size, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                                 distributed=info.distributed, gpu_decode=cfg.gpu_decode, **common)

    selection_loader = eval_loader("val" if cfg.val_split else "test", "sat", tencrop=False)
    plan = plan_evaluation(cfg, selection_loader.dataset)
    if plan.protocol != "sat":  # built with the official protocol's views before the data was known
        selection_loader.dataset.transform = EvalViews(plan.protocol, False, cfg.img_size,
                                                       cfg.resize_size).pixels(cfg.gpu_decode)
    tencrop = cfg.test_tencrop and plan.official
    test_loader = selection_loader if not cfg.val_split and not tencrop else \
        eval_loader("test", plan.protocol, tencrop=tencrop)
    if cfg.cache_images:
        for dataset in dict.fromkeys(loader.dataset for loader in (train_loader, selection_loader, test_loader)):
            attach_image_cache(dataset, Path(cfg.output_dir) / IMAGE_CACHE)
    return train_loader, selection_loader, test_loader, plan


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalPlan:
    """How training evaluates: ``protocol`` (eval_protocol resolved from the data, evaluate()'s protocol),
    ``annotations`` ('boxes', 'masks' or None) and the ``selection_metric`` that exists for them."""
    protocol: str
    annotations: Optional[str]
    selection_metric: str

    @property
    def official(self):
        """Whether the official SAT protocol is part of the evaluation (thresholds, best_top1 / best_gt files)."""
        return self.protocol in ("sat", "both")


# The localization annotations behind each protocol that protocol_for_data reads off an evaluation split.
ANNOTATIONS = {"sat": "boxes", "wsol": "masks", "cls": None}


def metrics_of(protocol, annotations):
    """The selection metrics an evaluation produces, the natural choice first."""
    official = ("loc", "top1_loc", "gt_known_loc")
    wsol = {"boxes": ("maxboxaccv2",), "masks": ("pxap",), None: ()}[annotations]
    return {"sat": official, "wsol": wsol, "both": official + wsol, "cls": ()}[protocol] + ("top1_cls",)


def plan_evaluation(cfg, dataset):
    """Resolve eval_protocol ('auto': boxes -> sat, masks only -> wsol, neither -> cls) and the selection
    metric for the data of ``dataset``; log both. ConfigError for a protocol the data cannot support."""
    automatic = protocol_for_data(dataset)
    annotations = ANNOTATIONS[automatic]
    protocol = automatic if cfg.eval_protocol == "auto" else cfg.eval_protocol
    needs = {"sat": "boxes", "both": "boxes", "wsol": annotations or "boxes or masks"}.get(protocol)
    if needs is not None and needs != annotations:
        raise ConfigError(f"eval_protocol {protocol} needs {needs} in the evaluation split, which has "
                          f"{annotations or 'neither boxes nor masks'}: use --eval-protocol {automatic} (or auto)")
    available = metrics_of(protocol, annotations)
    metric = cfg.selection_metric if cfg.selection_metric in available else available[0]
    names = {"sat": "official SAT protocol", "wsol": "wsolevaluation protocol", "both": "official SAT and "
             "wsolevaluation protocols", "cls": "classification only"}
    _logger.info("evaluation: %s (eval_protocol %s; the evaluation split has %s); best.pth by %s%s", names[protocol],
                 cfg.eval_protocol, annotations or "neither boxes nor masks", metric,
                 "" if metric == cfg.selection_metric else f" (selection_metric {cfg.selection_metric} does not "
                 f"exist for this evaluation)")
    return EvalPlan(protocol, annotations, metric)


def run_evaluation(model, loader, cfg, info, *, threshold=None, thresholds=(), amp=False, save_images=0,
                   image_dir=None):
    """Metrics of ``model`` on an evaluation loader (this process's shard; counts summed over the processes;
    the loader's views say the protocol): at ``threshold``, and/or at the best of ``thresholds``;
    overlays of the first ``save_images`` images into ``image_dir``.
    The single place where training calls the evaluation code."""
    metrics = evaluate(model, loader, info.device, threshold=threshold, thresholds=thresholds, amp=amp,
                       distributed=info.distributed, save_images=image_dir if save_images else None,
                       max_images=save_images, progress=info.is_main)
    if threshold is None and "at_best_threshold" in metrics:  # selection: at the best of ``thresholds`` (official)
        metrics.update(metrics["at_best_threshold"])
    return metrics


def scalars(metrics):
    """The numeric entries of an evaluation's metrics (no per-threshold lists or per-IoU tables)."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def should_evaluate(cfg, epoch):
    """Whether the model after ``epoch`` (0-based) is evaluated for selection: from eval_start_epoch every
    eval_every epochs (official CUB: every epoch from 26 of 30), and always after the last epoch."""
    done = epoch + 1
    return done == cfg.epochs or (done >= cfg.eval_start_epoch and done % cfg.eval_every == 0)


def selection_value(metrics, metric):
    """The value best.pth maximises: ``loc`` is Top-1 Loc + GT-known Loc (official best_loc), else the metric."""
    if metric == "loc":
        return float(metrics["top1_loc"]) + float(metrics["gt_known_loc"])
    return float(metrics[metric])


def update_best(best, metrics, selection_metric, epoch, official=True):
    """Update ``best`` ({checkpoint file: {'metric', 'value', 'epoch', 'threshold'}}) with this epoch's
    metrics; a file improves only on a strictly higher value (the first epoch wins ties, as the official
    ``>``). ``official``: the official SAT protocol was evaluated, so best_top1_loc.pth and
    best_gt_known_loc.pth are kept too. Returns the files this epoch improved."""
    improved = []
    for name, metric in {"best.pth": selection_metric, **(EXTRA_BEST if official else {})}.items():
        value = selection_value(metrics, metric)
        if name not in best or value > best[name]["value"]:
            best[name] = {"metric": metric, "value": value, "epoch": epoch + 1,
                          "threshold": metrics.get("best_threshold")}
            improved.append(name)
    return improved


def checkpoint_weights(model):
    """The state dict saved in checkpoints: the official model class's parameter names and shapes,
    including its fixed smoothing kernel ``weight``, so that the official ``SAT`` loads it strictly."""
    return {**model.state_dict(), "weight": gaussian_kernel_3x3()}


# ----------------------------------------------------------------------------------------- model
def build_training_model(cfg, num_classes, info):
    model = build_model(cfg.arch, num_classes=num_classes, pretrained=cfg.pretrained, img_size=cfg.img_size,
                        drop_path_rate=cfg.drop_path, num_spatial_blocks=cfg.num_spatial_blocks,
                        attn_impl=cfg.attn_impl)
    trainable = set_trainable(model, cfg.trainable)
    _logger.info("model %s: %.2fM parameters, %.2fM trainable (%s)", cfg.arch,
                 sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6, cfg.trainable)
    model.to(info.device)
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return model, train_model


def resume_path(cfg, checkpoint_dir):
    """The checkpoint to resume from, or None (``--resume`` without a path and no last.pth yet)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = checkpoint_dir / "last.pth"
        if not path.is_file():
            _logger.info("--resume: no %s yet, starting from scratch", path)
            return None
        return path
    return Path(cfg.resume)


def restore(path, cfg, info, model, optimizer, scheduler, loss_scaler):
    """Load a last.pth into the training state; returns its metadata."""
    meta = load_checkpoint(path, model)
    missing = [key for key in ("optimizer", "scheduler", "epoch", "config", "best") if key not in meta]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no {', '.join(missing)}); "
                              "to start from its weights use --pretrained PATH")
    optimizer.load_state_dict(meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    loss_scaler.load_state_dict(meta.get("scaler"))
    changed = {key: (meta["config"].get(key), value) for key, value in config_dict(cfg).items()
               if meta["config"].get(key) != value}
    for key, (old, new) in changed.items():
        _logger.warning("resume: %s was %r in the checkpoint, now %r", key, old, new)
    states = meta.get("rng_states") or []
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
    else:
        _logger.warning("resume: %d processes now, %d saved RNG states: re-seeding", info.world_size, len(states))
        seed_everything(cfg.seed + info.rank + 1000 * meta["epoch"])
    position = meta.get("epoch_step", 0)
    if position and len(meta["epoch_meters"]) != info.world_size:
        _logger.warning("resume: %d processes now, %d when saved in the middle of an epoch: the rest of epoch %d "
                        "is split differently (some samples may repeat or be left out)", info.world_size,
                        len(meta["epoch_meters"]), meta["epoch"] + 1)
    _logger.info("resumed from %s: %d of %d epochs done%s", path, meta["epoch"], cfg.epochs,
                 f", and {position} optimizer steps of epoch {meta['epoch'] + 1}" if position else "")
    return meta


# ------------------------------------------------------------------------------------------- main
def per_process_batch(cfg, world_size):
    micro, rest = divmod(cfg.batch_size, world_size * cfg.accum_steps)
    if rest or micro == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} (global, per optimizer step) must be a multiple of "
                          f"processes ({world_size}) x accum_steps ({cfg.accum_steps})")
    return micro


def default_config(imagenet):
    def choose(cli):
        if imagenet:
            return CONFIG_DIR / "ILSVRC.yaml"
        return CONFIG_DIR / ("CUB.yaml" if cli.get("data_root") else "demo.yaml")
    return choose


def main(argv=None, imagenet=False):
    """Entry point of train.py (``imagenet=False``) and train_ImageNet.py (``imagenet=True``)."""
    description = f"Train SAT on {'ImageNet (ILSVRC2012)' if imagenet else 'CUB-200-2011 or other WSOL data'}"
    cfg = parse_config(argv, description, default_config(imagenet))
    info = dist_utils.init_distributed(cfg.device, cfg.local_rank)
    progress = {"epoch": None, "saved": None}
    try:
        return train(cfg, info, imagenet, progress)
    except Preempted as stop:
        if info.is_main:
            _logger.warning("%s", stop)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:
        if info.is_main:
            script = "train_ImageNet.py" if imagenet else "train.py"
            _logger.warning("%s", interrupted_message(cfg, info, progress, script, argv))
        raise SystemExit(130) from None
    finally:
        close_logging()
        dist_utils.cleanup()


def interrupted_message(cfg, info, progress, script, argv):
    """One line after Ctrl-C: where training stopped, what is saved, and the command that resumes it
    (``utils.preemption.resume_command``, as after SIGTERM / SIGUSR1)."""
    command = resume_command(None if argv is None else [script, *argv], distributed=info.world_size > 1)
    where = "before training started" if progress["epoch"] is None else (
        "in the final test" if progress["epoch"] >= cfg.epochs else f"in epoch {progress['epoch'] + 1}/{cfg.epochs}")
    last = Path(cfg.output_dir) / "checkpoints" / "last.pth"
    if progress["saved"]:
        saved = f"{last} holds {progress['saved']} finished epoch(s)"
    elif last.exists():
        saved = f"{last} holds the last saved position"
    else:
        saved = "no checkpoint yet"
    return f"interrupted {where}; {saved}; resume with: {command}"


# What a run writes into --output-dir; a folder holding the first three is a previous run.
IMAGE_CACHE = "image_cache"  # cache_images: one file per split (DataLoader/image_cache.py)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.json", "config.yaml", "log.txt", "tensorboard", "images")


def prepare_output_dir(cfg, output_dir, info):
    """Refuse to write into a folder holding a previous run unless --resume (continue it) or --overwrite
    (delete its outputs first): one-line ConfigError, nothing touched."""
    if cfg.resume is not None and cfg.overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it: choose one")
    # what the main process finds, for every process, before it deletes anything (a process that looked after
    # the deletion would skip the barrier below)
    previous = dist_utils.all_gather_object([name for name in RUN_OUTPUTS[:3] if (output_dir / name).exists()])[0]
    if not previous or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(f"{output_dir} holds a previous run ({', '.join(previous)}): --resume to continue it, "
                          "--overwrite to start again, or choose another --output-dir")
    if info.is_main:
        for name in RUN_OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    dist_utils.barrier()


def train(cfg, info, imagenet=False, progress=None):
    """One training run (see the module doc); ``progress`` ({'epoch', 'saved'}) is kept up to date for the
    message after an interruption."""
    progress = {} if progress is None else progress
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    prepare_output_dir(cfg, output_dir, info)
    setup_logging(output_dir, info.is_main, info.rank)
    micro_batch = per_process_batch(cfg, info.world_size)
    cfg.resize_size = cfg.resize_size or default_resize_size(cfg.img_size)
    cfg.eval_batch_size = cfg.eval_batch_size or micro_batch
    seed_everything(cfg.seed + info.rank)
    _logger.info("config %s; %d process(es) on %s, global batch %d = %d per process x %d accumulation steps, %s; "
                 "batch area loss over %s", cfg.config or "(defaults)", info.world_size, info.device, cfg.batch_size,
                 micro_batch, cfg.accum_steps, describe(info.device, cfg.amp),
                 f"{micro_batch * (info.world_size if cfg.area_loss_scope == 'global' else 1)} images "
                 f"({cfg.area_loss_scope} micro-batch)")
    if info.launcher:
        _logger.info("processes started by %s", info.launcher)

    fmt, root = resolve_data(cfg, imagenet, info)
    train_loader, selection_loader, test_loader, plan = build_loaders(cfg, fmt, root, info, micro_batch)
    train_set, selection_split = train_loader.dataset, "val" if cfg.val_split else "test"
    _logger.info("data %s at %s: %d train images, %d classes; model selection on the %s split (%d images)%s",
                 fmt, root, len(train_set), train_set.num_classes, selection_split, len(selection_loader.dataset),
                 "" if cfg.val_split else " (no --val-split: as the official code does)")

    model, train_model = build_training_model(cfg, train_set.num_classes, info)
    spec = model_spec(model, cfg.arch, train_set.classes, num_spatial_blocks=cfg.num_spatial_blocks)
    criterion = SATLoss(cfg.area_thr, cfg.area_loss_scope)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.decay_tokens)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    scheduler = build_scheduler(optimizer, schedule=cfg.lr_schedule, lr=cfg.lr, min_lr=cfg.min_lr,
                                epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, steps_per_epoch=steps_per_epoch)
    loss_scaler = LossScaler(info.device, cfg.amp)
    autocast = autocast_context(info.device, cfg.amp)

    start_epoch, start_step, meters_state, best = 0, 0, None, {}
    path = resume_path(cfg, checkpoint_dir)
    if path is not None:
        meta = restore(path, cfg, info, model, optimizer, scheduler, loss_scaler)
        start_epoch, start_step, best = meta["epoch"], meta.get("epoch_step", 0), meta["best"]
        if start_step and len(meta["epoch_meters"]) == info.world_size:
            meters_state = meta["epoch_meters"][info.rank]
    progress.update(epoch=start_epoch, saved=start_epoch, step=start_step)
    metrics_log = MetricsLog(output_dir, start_epoch) if info.is_main else None
    if info.is_main:
        save_config(cfg, output_dir / "config.yaml")

    def training_state():
        return dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=loss_scaler.state_dict())

    def save_position(epoch, steps_done, meters):
        """last.pth in the middle of ``epoch``: its optimizer steps done and each process's RNG state and
        running sums, so that --resume continues exactly there. Collective."""
        states = dist_utils.all_gather_object((rng_state(info.device), meters.state()))
        if info.is_main:
            save_checkpoint({"model": checkpoint_weights(model), "epoch": epoch, "epoch_step": steps_done,
                             "config": config_dict(cfg), **spec, "best_thr": None, **training_state(),
                             "rng_states": [rng for rng, _ in states], "epoch_meters": [sums for _, sums in states],
                             "best": best}, checkpoint_dir / "last.pth")
        return checkpoint_dir / "last.pth"

    stop = StopSignals()
    checkpointer = StepCheckpoint(stop, save_position, steps_per_epoch=steps_per_epoch,
                                  save_every_steps=cfg.save_every_steps, check_every=cfg.log_every,
                                  device=info.device, world_size=info.world_size)
    try:
        with stop:
            for epoch in range(start_epoch, cfg.epochs):
                progress["epoch"] = epoch
                first_step = start_step if epoch == start_epoch else 0
                # this epoch's order, and each image's crop seed in the loader workers (BatchLoader), depend
                # only on (seed, epoch): a resumed run sees the samples of the uninterrupted one
                train_loader.sampler.set_epoch(epoch, first_step * cfg.accum_steps)
                stats = train_one_epoch(train_model, criterion, train_loader, optimizer, info.device, epoch,
                                        loss_scaler, scheduler=scheduler, accum_steps=cfg.accum_steps,
                                        autocast=autocast, clip_grad=cfg.clip_grad, log_every=cfg.log_every,
                                        world_size=info.world_size, progress=info.is_main, start_step=first_step,
                                        meters_state=meters_state if first_step else None,
                                        on_step=functools.partial(checkpointer, epoch))
                record = {"epoch": epoch + 1, **{f"train_{key}": value for key, value in stats.items()}}
                metrics, improved = None, []
                if should_evaluate(cfg, epoch):
                    metrics = run_evaluation(model, selection_loader, cfg, info,
                                             thresholds=cfg.eval_thresholds if plan.official else (), amp=cfg.amp)
                    improved = update_best(best, metrics, plan.selection_metric, epoch, plan.official)
                    shown = (*RESULT_KEYS, "best_threshold") if plan.official else scalars(metrics)
                    record.update({f"{selection_split}_{key}": metrics[key] for key in shown})
                rng_states = dist_utils.all_gather_object(rng_state(info.device))
                if info.is_main:
                    save_epoch(checkpoint_dir, model, spec, cfg, epoch, metrics, improved, best, metrics_log, record,
                               training_state=dict(training_state(), rng_states=rng_states))
                progress["saved"] = epoch + 1
                log_epoch(cfg, epoch, stats, metrics, improved, selection_split, plan)
                checkpointer.end_of_epoch(epoch, checkpoint_dir / "last.pth")
    finally:
        if metrics_log is not None:
            metrics_log.close()
    progress["epoch"] = cfg.epochs
    results = final_test(cfg, info, model, test_loader, checkpoint_dir, output_dir, plan)
    if cfg.cache_images:  # a finished run does not need it again; an interrupted one keeps it
        dist_utils.barrier()  # every process is done reading it
        if info.is_main:
            shutil.rmtree(output_dir / IMAGE_CACHE, ignore_errors=True)
    return results


def save_epoch(checkpoint_dir, model, spec, cfg, epoch, metrics, improved, best, metrics_log, record,
               training_state):
    """Rank 0: the improved best checkpoints, the metrics line, then last.pth. last.pth is written last:
    a run killed before it redoes this epoch, and on resume MetricsLog drops the metrics line written here,
    so that every epoch is logged once."""
    state = {"model": checkpoint_weights(model), "epoch": epoch + 1, "config": config_dict(cfg), **spec,
             "best_thr": metrics.get("best_threshold") if metrics else None}
    for name in improved:
        save_checkpoint(dict(state, selection=best[name]), checkpoint_dir / name)
    metrics_log.log_epoch(record)
    save_checkpoint(dict(state, **training_state, best=best), checkpoint_dir / "last.pth")


def log_epoch(cfg, epoch, stats, metrics, improved, split, plan):
    if metrics is not None:
        best_mark = "  * best" if "best.pth" in improved else ""
        if plan.official:
            _logger.info("epoch %d %s: Top-1 Loc %.2f  GT-known Loc %.2f  Top-1 Cls %.2f  (best of the thresholds: "
                         "%.2f)%s", epoch + 1, split, metrics["top1_loc"], metrics["gt_known_loc"],
                         metrics["top1_cls"], metrics["best_threshold"], best_mark)
        else:
            shown = tuple(key for key in ("maxboxaccv2", "pxap") if key in metrics) + ("top1_cls",)
            _logger.info("epoch %d %s: %s%s", epoch + 1, split,
                         "  ".join(f"{key} {metrics[key]:.2f}" for key in shown), best_mark)
    if stats["num_skipped"]:
        _logger.warning("epoch %d: %d unreadable training images skipped (named in the log above; "
                        "--strict-data makes them an error)", epoch + 1, stats["num_skipped"])
    _logger.info("epoch %d/%d done in %.0fs (%.0f%% of it waiting for data): loss %.4f (ce %.4f area %.4f norm "
                 "%.4f), train acc %.2f, lr %.3g", epoch + 1, cfg.epochs, stats["time"],
                 100 * stats["data_wait"] / max(stats["time"], 1e-9), stats["loss"], stats["ce"], stats["area"],
                 stats["norm"], stats["acc1"], stats["lr"])


def final_test(cfg, info, model, test_loader, checkpoint_dir, output_dir, plan):
    """Evaluate best.pth on the test split as the official evaluator does (fp32, at ``threshold``, ten-crop
    classification with test_tencrop) and write results.json; with report_best_threshold, also the
    metrics at the best of eval_thresholds, chosen on the test split itself, under 'best_threshold'.
    Without boxes: the plan's protocol (wsolevaluation metrics, or classification only)."""
    dist_utils.barrier()
    best_path = checkpoint_dir / "best.pth"
    meta = load_checkpoint(best_path, model)
    official = plan.official
    metrics = run_evaluation(model, test_loader, cfg, info, threshold=cfg.threshold if official else None,
                             thresholds=cfg.eval_thresholds if cfg.report_best_threshold and official else (),
                             save_images=cfg.save_images, image_dir=output_dir / "images")
    tencrop = cfg.test_tencrop and official
    results = {"checkpoint": str(best_path), "epoch": meta["epoch"], "selection": meta["selection"], "split": "test",
               "eval_protocol": plan.protocol, **({"threshold": cfg.threshold} if official else {}),
               "tencrop": tencrop, "precision": "fp32",
               **({key: metrics[key] for key in RESULT_KEYS} if official else scalars(metrics)),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if cfg.report_best_threshold and official:
        results["best_threshold"] = {
            "threshold": metrics["best_threshold"], "chosen_on": "test",
            "note": "threshold maximising Top-1 + GT-known Loc on the evaluated split itself (not held out)",
            **{key: metrics[key] for key in ("num_images", "top1_cls", "top5_cls")}, **metrics["at_best_threshold"]}
    if info.is_main:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        shown = RESULT_KEYS[:8] if official else [key for key in scalars(metrics)
                                                  if key != "num_images" and not key.endswith("threshold")]
        rows = "\n".join(f"  {key:<15} {metrics[key]:8.2f}" for key in shown)
        setting = (f"threshold {cfg.threshold:.2f}, {'ten-crop' if tencrop else 'centre-crop'} classification"
                   if plan.official else plan.protocol)
        _logger.info("test results of %s (epoch %d, %s, fp32):\n%s\nwritten to %s", best_path, meta["epoch"],
                     setting, rows, output_dir / "results.json")
    return results
