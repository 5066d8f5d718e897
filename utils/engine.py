"""One epoch of training and one pass of evaluation, the two loops the scripts run (as DeiT's / MAE's
engine): ``train_one_epoch`` (forward under autocast, the SAT criterion, backward / clip / step through the
loss scaler, gradient accumulation, DDP) and ``evaluate`` (loader -> forward -> boxes -> metrics of the sat
and / or wsol protocol, utils/boxes.py and utils/metrics.py). Neither synchronises host and device per batch:
training meters sum device tensors read back every ``log_every`` steps; evaluation copies a batch's outputs to
the CPU while the next batch's forward is queued, and extracts boxes in a pool of threads or processes.
"""
import contextlib
import logging
import math
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from DataLoader.dataset import size_difference_warning, size_differences
from DataLoader.device_transforms import on_device
from DataLoader.eval_loader import ShardSampler
from DataLoader.eval_views import TENCROP_CENTRE, includes_sat, views_of
from DataLoader.transforms import denormalize
from DataLoader.check import same_aspect
from DataLoader.formats.wsol import load_mask, read_masks
from Model.losses import LOSS_KEYS
from utils.amp import autocast_context
from utils.boxes import (WSOL_MAP_SIZE, contour_boxes, crop_box_to_original, gt_boxes_sat, gt_boxes_wsol, max_iou,
                         sat_box, sat_boxes_of_maps, sat_map, wsol_map)
from utils.cv import cv2
from utils.distributed import all_gather_object, all_reduce_sum, cpu_share, raise_first
from utils.errors import ConfigError, DataError, OutputError, SATError, user_message, writing_outputs
from utils.host_memory import keep_freed_memory
from utils.logger import progress_bar
from utils.metrics import Counters, chosen_wsol_threshold, per_class_metrics
from utils.preemption import leave_stops_to_the_parent
from utils.saved_maps import write_maps
from utils.visualize import render_overlay, save_rgb

_logger = logging.getLogger("sat")


class NonFiniteLossError(SATError):
    """The training loss became NaN or infinite."""


class Meters:
    """Named sums kept as device tensors (adding never waits for the device); ``totals()`` sums them over
    the processes in one all-reduce and reads them back."""

    def __init__(self, names, device, state=None):
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
        for name, value in (state or {}).items():
            if name in self.sums:  # a last.pth of an earlier version may hold sums no longer kept ("batches")
                self.sums[name] += value.to(device)

    def state(self):
        """This process's sums, on the CPU (saved with a mid-epoch last.pth)."""
        return {name: value.cpu() for name, value in self.sums.items()}

    def update(self, **values):
        for name, value in values.items():
            self.sums[name] += value

    def totals(self):
        values = all_reduce_sum(torch.stack(list(self.sums.values()))).tolist()
        return dict(zip(self.sums, values))


class CompiledFullBatches:
    """``torch.compile(module)`` for batches of ``batch_size`` images (None: the first call's size, in evaluation
    the size of its forwards); any other size (the epoch's last partial batch of the official CUB recipe, a batch
    short of unreadable files, a split's last batch) runs ``module`` eagerly, where torch.compile would compile the
    model a second time for a dynamic batch size. ``train()``, ``no_sync()`` (DDP) and other attributes are the
    module's."""

    def __init__(self, module, batch_size=None):
        self.module, self.batch_size = module, batch_size
        self.compiled = torch.compile(module, dynamic=False)

    def __call__(self, images, *args, **kwargs):
        if self.batch_size is None:
            self.batch_size = len(images)
        return (self.compiled if len(images) == self.batch_size else self.module)(images, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _check_window(window, steps_before_epoch, epoch, world_size):
    """Raise NonFiniteLossError naming the first optimizer step whose loss (averaged over the
    processes) is not finite; ``window`` holds one loss tensor per micro-batch since the last check.
    One host-device sync (and one all-reduce with DDP) per call; ``steps_before_epoch`` None: not known (no
    scheduler)."""
    losses = all_reduce_sum(torch.stack([loss for _, loss in window])) / world_size
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        step = window[bad[0]][0]
        global_step = "" if steps_before_epoch is None else f" (global step {steps_before_epoch + step + 1})"
        raise NonFiniteLossError(
            f"training loss is {losses[bad[0]].item()} at epoch {epoch + 1}, optimizer step {step + 1} of the "
            f"epoch{global_step}; stopping: lower --lr, set --clip-grad or leave out --amp")


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, loss_scaler, *, scheduler=None,
                    accum_steps=1, autocast=contextlib.nullcontext, clip_grad=None, log_every=20, world_size=1,
                    progress=True, steps_done=0, meters_state=None, on_step=None):
    """Train ``model`` (possibly DDP-wrapped) for one pass over ``loader``: ``criterion(logits, loc_maps, labels)``
    (SATLoss), backward / clipping / step through ``loss_scaler`` (a ``utils.amp.LossScaler``: called as
    ``loss_scaler(loss, optimizer, clip_grad=, update_grad=)``, and ``loss_scaler.step(optimizer, clip_grad=)``),
    ``scheduler`` (a torch ``LRScheduler``, e.g. ``utils.optim.build_scheduler``'s; None: the optimizer's lr
    throughout) stepped per optimizer step. ``loader``'s batches: ``build_loader``'s, dicts of ``image`` (a
    normalised float batch, or the loader's uint8 pixels) and ``label`` (``num_skipped``: unreadable images left
    out, 0 if absent), or ``(images, labels)`` pairs as a torch DataLoader of (image, label) samples gives.
    ``accum_steps`` micro-batches make a step (each its own batch area loss); ``steps_done`` (the epoch's
    optimizer steps already done) / ``meters_state`` continue an epoch resumed in its middle;
    ``on_step(steps_done, meters)`` runs after each step (mid-epoch checkpoints, stops). Returns the epoch's
    averages over the processes (metrics.jsonl's train_* keys, docs/training.md)."""
    if torch.device(device).type == "mps":  # Meters' float64 sums (MPS has no float64) failed deep in torch
        raise ConfigError("train_one_epoch: device mps is not supported (its running sums are float64, which MPS "
                          "lacks); train on 'cpu' or 'cuda', as the scripts' --device does")
    model.train()
    done = steps_done * accum_steps  # micro-batches of the epoch before this call
    num_batches = done + len(loader)
    num_steps = math.ceil(num_batches / accum_steps)
    # optimizer steps done before this epoch (None without a scheduler, which counts them)
    steps_before_epoch = None if scheduler is None else scheduler.last_epoch - steps_done
    # "this_run": the images of this call, not restored with a resumed epoch's sums: images/s is of the time measured
    meters = Meters((*LOSS_KEYS, "correct", "images", "skipped", "this_run"), device,
                    {name: value for name, value in (meters_state or {}).items() if name != "this_run"})
    window = []  # (optimizer step, loss) since the last read-back
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = progress_bar(total=num_batches, initial=done, desc=f"epoch {epoch + 1}", disable=not progress)
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    with bar, redirect:
        loaded = on_device(loader, device)
        for i, batch in enumerate(loaded, start=done):
            step, position = divmod(i, accum_steps)
            group_size = min(accum_steps, num_batches - step * accum_steps)
            last_of_group = position == group_size - 1
            meters.update(skipped=batch.get("num_skipped", 0))
            for message in batch.get("skipped", ()):
                _logger.warning("epoch %d: %s", epoch + 1, message)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if not len(images) and world_size > 1:
                raise DataError(f"epoch {epoch + 1}, batch {i + 1} of {num_batches}: every image was unreadable "
                                "(named above); with several processes this would desynchronise them: remove the "
                                "unreadable files (tools/check_dataset.py --split train lists them)")
            if len(images):
                # Gradients are all-reduced only on the last micro-batch of an accumulation group.
                sync = contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        logits, maps = model(images)
                    losses = criterion(logits, maps, labels)
                    loss_scaler(losses["loss"] / group_size, optimizer, clip_grad=clip_grad, update_grad=last_of_group)
                # loss terms weighted by images (a partial batch counts for its images, as in train_acc1)
                meters.update(**{key: losses[key].detach() * len(images) for key in LOSS_KEYS},
                              images=len(images), this_run=len(images),
                              correct=(logits.detach().argmax(dim=1) == labels).sum())
                window.append((step, losses["loss"].detach()))
            elif last_of_group:  # every image of the group's last micro-batch was unreadable: step on the rest
                loss_scaler.step(optimizer, clip_grad=clip_grad)
            if last_of_group:
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                if scheduler is not None:
                    scheduler.step()
                if window and ((step + 1) % log_every == 0 or step + 1 == num_steps):
                    _check_window(window, steps_before_epoch, epoch, world_size)
                    window.clear()
                    sums = torch.stack([meters.sums[key] for key in (*LOSS_KEYS, "images")]).tolist()
                    _logger.info("epoch %d step %d/%d  %s  lr %.3g", epoch + 1, step + 1, num_steps,
                                 "  ".join(f"{k} {v / sums[-1]:.4f}" for k, v in zip(LOSS_KEYS, sums)), lr)
                if on_step is not None:
                    on_step(step + 1, meters)
            bar.update(1)
    elapsed = time.perf_counter() - start
    totals = meters.totals()
    images = totals["images"]
    stats = {key: totals[key] / max(images, 1) for key in LOSS_KEYS}
    stats.update(acc1=100.0 * totals["correct"] / max(images, 1), lr=lr, steps=num_steps, images=int(images),
                 num_skipped=int(totals["skipped"]), time=elapsed,
                 images_per_sec=totals["this_run"] / max(elapsed, 1e-9),
                 data_wait=loaded.wait)
    return stats



# ------------------------------------------------------------------------------------------------- evaluation
class NonFiniteOutputError(SATError):
    """The model gave NaN or Inf class scores or maps (as wsolevaluation, such maps are not scored)."""


CPU_ACTIVATION_BYTES = 10 * 2**20


def images_per_forward(model, images):
    """Images per forward in evaluation: on a CPU, as many as keep a forward's largest activation (the MLP's
    hidden layer, every token) within ``CPU_ACTIVATION_BYTES``, where the caches make the forward 1.1-1.3x
    faster than whole batches of 32 (docs/performance.md, "CPU: this project against the official code"); the
    whole batch on GPUs and for models other than SAT's. Each image's outputs are its own either way."""
    if images.device.type != "cpu" or not hasattr(model, "blocks") or not hasattr(model, "grid_size"):
        return len(images)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else images.dtype
    tokens = model.grid_size[0] * model.grid_size[1] + 2  # patches, the class token and the spatial token
    per_image = tokens * model.blocks[0].mlp.fc1.out_features * dtype.itemsize
    return max(1, CPU_ACTIVATION_BYTES // per_image)


def forward_in_parts(model, images, return_block_maps=False):
    """``model(images)`` as forwards of ``images_per_forward`` images each, their outputs joined."""
    kwargs = {"return_block_maps": True} if return_block_maps else {}
    parts = [model(part, **kwargs) for part in images.split(images_per_forward(model, images))]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(out) for out in zip(*parts))


def forward_views(model, images, views, autocast, blocks=False):
    """All views of a batch, ``images`` (B, V, 3, S, S), through the model (``forward_in_parts``) -> ``{'sat' |
    'wsol': (scores, loc_maps)}`` as float32 CPU tensors copied ``non_blocking``: ``HostOutputs.numpy`` waits for
    them. ``tencrop``: the mean of the ten softmaxes and the centre crop's map (official); ``centre`` / ``wsol``:
    the view's logits and map. The sat view's outputs are keyed 'sat' (also for protocol 'cls'); ``blocks``
    adds 'blocks': (None, each spatial-aware block's map of the sat view (B, K, h, w)), for overlays."""
    batch, num_views = images.shape[:2]
    with autocast():
        flat = images.flatten(0, 1)
        logits, loc_maps, *block_maps = forward_in_parts(model, flat, return_block_maps=blocks)
    logits = logits.float().unflatten(0, (batch, num_views))
    loc_maps = loc_maps.float().unflatten(0, (batch, num_views))
    out = {}
    for view, where in views.slices.items():
        centre = where.start + TENCROP_CENTRE if view == "tencrop" else where.start  # the view of the map
        scores = logits[:, where].softmax(dim=-1).mean(dim=1) if view == "tencrop" else logits[:, where.start]
        out["wsol" if view == "wsol" else "sat"] = (scores.to("cpu", non_blocking=True),
                                                     loc_maps[:, centre].to("cpu", non_blocking=True))
        if block_maps and view != "wsol":
            out["blocks"] = (None, block_maps[0].float().unflatten(0, (batch, num_views))[:, centre]
                             .to("cpu", non_blocking=True))
    return HostOutputs(out, images.device)


class HostOutputs:
    """A batch's outputs on their way to the CPU: ``numpy()`` waits for the copies (a CUDA event) and gives
    ``{'sat' | 'wsol': (scores, loc_maps)}`` as numpy, so that the next batch's forward is queued first."""

    def __init__(self, outputs, device):
        self.outputs = outputs
        self.copied = None
        if device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(device))

    def numpy(self):
        if self.copied is not None:
            self.copied.synchronize()
        return {key: (None if scores is None else scores.numpy(), loc_maps.numpy())
                for key, (scores, loc_maps) in self.outputs.items()}


def check_finite(out, image_ids):
    """NonFiniteOutputError naming the first images whose scores or maps hold NaN or Inf."""
    bad = np.zeros(len(image_ids), bool)
    for scores, loc_maps in out.values():
        bad |= ~np.isfinite(loc_maps.reshape(len(loc_maps), -1)).all(axis=1)
        if scores is not None:
            bad |= ~np.isfinite(scores).all(axis=1)
    if bad.any():
        names = [str(image_ids[k]) for k in np.flatnonzero(bad)[:3]]
        raise NonFiniteOutputError(f"the model outputs NaN/Inf scores or maps for {int(bad.sum())} image(s) of a "
                                   f"batch, first {', '.join(names)}")


def _softmax(scores):
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class BatchScorer:
    """The CPU work of one batch: GT boxes in each protocol's frame, boxes, counters, per-image rows (at
    ``threshold``), saved maps and overlays. Runs in a thread or a process of the box pool.

    ``from_files``: the outputs are saved maps (utils/saved_maps.py): their wsol maps are the 224x224 maps to
    score as they are, their scores only rank the predicted classes (no probabilities), or are None where no
    classes were predicted."""

    def __init__(self, views, thresholds, threshold, save_maps, overlay_dir, class_names, from_files=False,
                 block_layers=(), suffix_kept=(), per_image=True):
        self.views, self.thresholds, self.threshold = views, thresholds, threshold
        self.per_image = per_image  # False: no per-image rows (training's evaluations: 50 MiB per 50k images, unused)
        self.suffix_kept = set(suffix_kept)  # image ids whose overlay keeps the extension (overlay_names_shared)
        self.block_layers = block_layers  # the layer number of each spatial-aware block: its overlay panel's name
        self.save_maps = Path(save_maps) if save_maps else None
        self.overlay_dir = Path(overlay_dir) if overlay_dir else None
        self.class_names = class_names
        self.from_files = from_files

    def __call__(self, batch, out, crops):
        views, protocol = self.views, self.views.protocol
        counters = Counters(protocol, self.thresholds, views.img_size)
        labels, boxes, sizes, ids = batch["label"], batch["boxes"], batch["size"], batch["image_id"]
        pred_boxes = ious = gt_sat = gt_masks = None
        if "cls" in counters.parts:
            counters.parts["cls"].update(out["sat"][0], labels)
        if "sat" in out and self.thresholds:  # the sat boxes at each map threshold (predictions without GT too)
            pred_boxes = sat_boxes_of_maps(out["sat"][1], self.thresholds, views.img_size)
        if "sat" in counters.parts:
            missing = next((i for i, b in zip(ids, boxes) if len(b) == 0), None)
            if missing is not None:
                raise DataError(f"image {missing} has no GT boxes: the sat protocol needs boxes; use "
                                "--eval-protocol wsol for mask datasets, cls for neither")
            gt_sat = [gt_boxes_sat(b, s, views.resize_size, views.img_size) for b, s in zip(boxes, sizes)]
            ious = counters.parts["sat"].update_boxes(pred_boxes, gt_sat, out["sat"][0], labels)
        if "wsol" in out:
            scores, loc_maps = out["wsol"]
            gt_wsol = [gt_boxes_wsol(b, s) for b, s in zip(boxes, sizes)]
            if scores is not None:
                counters.parts["wsol_cls"].update(scores, labels)
            with_boxes = [i for i, b in enumerate(gt_wsol) if len(b)]
            if with_boxes:
                counters.parts["wsol_boxes"].update(loc_maps[with_boxes], [gt_wsol[i] for i in with_boxes],
                                                    normalised=self.from_files)
            if "mask_paths" in batch:
                read = [read_masks(paths, ignore, WSOL_MAP_SIZE)
                        for paths, ignore in zip(batch["mask_paths"], batch["ignore_path"])]
                masks = [(foreground, ignore) for foreground, ignore, _ in read]
                skewed = sum(any(not same_aspect(shape, size) for shape in shapes)
                             for (*_, shapes), size in zip(read, batch.get("file_size", sizes)))
                counters.parts["pxap"].update(loc_maps, *map(np.stack, zip(*masks)), normalised=self.from_files,
                                              skewed=skewed)
                gt_masks = [foreground for foreground, _ in masks]
        if self.save_maps:
            write_maps(self.save_maps, ids, out)
        column = self.thresholds.index(self.threshold) if pred_boxes is not None and self.threshold is not None \
            else None
        rows = self._rows(batch, out, pred_boxes, ious, column) if self.per_image else []
        for k, crop in crops.items():
            if column is not None:
                self.overlay(ids[k], crop, out["sat"][1][k], "sat", self.threshold, pred_boxes[k, column],
                             gt_sat[k] if gt_sat else np.zeros((0, 4)), predicted_class(out["sat"][0], k),
                             out["blocks"][1][k] if "blocks" in out else ())
            elif "wsol" in out and self.threshold is not None:  # wsol at a given map threshold
                self.overlay(ids[k], crop, out["wsol"][1][k], "wsol", self.threshold, None,
                             gt_boxes_wsol(boxes[k], sizes[k]), predicted_class(out["wsol"][0], k),
                             gt_mask=gt_masks[k] if gt_masks else None)
        return counters, rows

    def _rows(self, batch, out, pred_boxes, ious, column):
        """One record per image: the prediction of the sat view (of the wsol view without one) and, at the
        reported threshold, its box and, with GT boxes, its IoU (per_image.csv, docs/evaluation.md)."""
        key = "sat" if "sat" in out else "wsol"
        scores = out[key][0]
        predicted = scores is not None  # None: saved maps without predictions
        probs = None  # saved maps: their scores rank the predicted classes, they are no probabilities
        if predicted and not self.from_files:
            probs = scores if self.views.tencrop and key == "sat" else _softmax(scores.astype(np.float64))
        top5 = (torch.as_tensor(scores).topk(min(5, scores.shape[1]), dim=1).indices.numpy() if predicted
                else np.zeros((len(batch["image_id"]), 0), np.int64))  # as topk_correct
        rows = []
        for k, (image_id, label, size) in enumerate(zip(batch["image_id"], batch["label"].tolist(), batch["size"])):
            # saved maps: the classes their predictions name (scores 0: classes a top-1 file does not rank)
            top5_k = [int(c) for c in top5[k] if not self.from_files or scores[k, c] > 0]
            row = {"index": int(batch["index"][k]), "image_id": image_id, "label": int(label), "top5": top5_k,
                   "score": None if probs is None else float(probs[k, top5_k[0]]), "box_crop": None,
                   "box_original": None, "iou": None, "cls_correct": top5_k[0] == label if predicted else None,
                   "gt_known": None, "top1_loc": None, "width": int(size[0]), "height": int(size[1])}
            if column is not None:
                box = pred_boxes[k, column]
                row.update(box_crop=[int(v) for v in box], box_original=crop_box_to_original(
                    box, size, self.views.resize_size, self.views.img_size).tolist())
                if ious is not None:
                    hit = bool(ious[k, column] >= 0.5)
                    row.update(iou=float(ious[k, column]), gt_known=hit,
                               top1_loc=top5_k[0] == label and hit if predicted else None)
            rows.append(row)
        return rows

    def overlay(self, image_id, crop, loc_map, protocol, threshold, box, gt, pred, block_maps=(), gt_mask=None):
        """One overlay PNG: heat map, predicted box at ``threshold`` (green), GT boxes or the GT mask's outline
        (wsol, mask data; red), caption; with ``block_maps`` (sat), each spatial-aware block's map and box first,
        then the fused map (the paper's visualization)."""
        panels = [render_overlay(crop, sat_map(m, self.views.img_size), sat_box(m, threshold, self.views.img_size),
                                 gt, f"block {layer}") for layer, m in zip(self.block_layers, block_maps)]
        if protocol == "sat":
            normalised = sat_map(loc_map, self.views.img_size)
        else:
            normalised = loc_map if self.from_files else wsol_map(loc_map)
            box = contour_boxes(normalised, [threshold])[1][0]
        name = "" if pred is None else self.class_names[pred] if self.class_names else str(pred)
        caption = f"{name}  IoU {max_iou(np.asarray(box)[None], gt)[0]:.2f} @ {threshold:g}".strip() if len(gt) \
            else name
        panels.append(render_overlay(crop, normalised, box, gt, caption, gt_mask))
        path = self.overlay_dir / f"{image_id}.png" if image_id in self.suffix_kept else \
            (self.overlay_dir / image_id).with_suffix(".png")
        with writing_outputs(path):
            save_rgb(path, np.concatenate(panels, axis=1))


def overlay_names_shared(items):
    """The image ids of ``items`` that another item shares but for the extension (a.jpg, a.png): their
    overlays keep it (a.jpg.png), so that neither overwrites the other."""
    stems = Counter(os.path.splitext(item.image_id)[0] for item in items)
    return {item.image_id for item in items if stems[os.path.splitext(item.image_id)[0]] > 1}


def predicted_class(scores, k):
    """The top class of image ``k`` of a batch's scores; None without scores (saved maps without predictions)."""
    return None if scores is None else int(np.argmax(scores[k]))


def _overlay_crops(images, batch, views, overlays):
    """{position in batch: uint8 RGB image} of the batch's images that get an overlay (dataset index below
    ``overlays``; None: all): the sat view's centre crop, or the wsol view at the 224x224 map size."""
    sat_view = next((view for view in ("centre", "tencrop") if view in views.slices), None)
    index = views.slices[sat_view or "wsol"].start + (TENCROP_CENTRE if sat_view == "tencrop" else 0)
    crops = {}
    for k, position in enumerate(batch["index"]):
        if overlays is None or position < overlays:
            crop = denormalize(images[k, index])
            if sat_view is None and crop.shape[0] != WSOL_MAP_SIZE:
                crop = cv2.resize(crop, (WSOL_MAP_SIZE, WSOL_MAP_SIZE), interpolation=cv2.INTER_LINEAR)
            crops[k] = crop
    return crops


def _init_box_process():
    """Box-pool process: one torch thread and (utils/cv.py) one OpenCV thread: the processes are the
    parallelism; stop signals are its parent's (utils/preemption.py); its freed host memory kept, as the
    scripts' processes keep theirs (utils.host_memory: the fork server is a fresh interpreter, not a fork of them)."""
    keep_freed_memory()
    torch.set_num_threads(1)
    leave_stops_to_the_parent()


def default_box_processes(device):
    """``box_processes`` when not given: on a GPU machine half of this process's share of the CPUs (over the
    node's processes, LOCAL_WORLD_SIZE), at most 8, so that box extraction keeps up with the forwards (a
    thread pool serialises on the GIL); 0 (a thread pool) when that is fewer than 2, and on CPUs."""
    if torch.device(device).type != "cuda":
        return 0
    processes = min(8, cpu_share() // 2)
    return processes if processes >= 2 else 0


def box_pool(threads, processes=0):
    """The executor of the per-batch CPU work: ``processes`` > 0 -> a process pool from a fork server (a
    child forked while OpenCV's or OpenMP's threads hold a lock deadlocks), else a thread pool. The fork
    server imports this module (torch, OpenCV) once, before it forks: without that, every child of every
    pool imported them again, 11 s per evaluation on a 16-core GPU machine (docs/performance.md)."""
    if processes:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])  # no effect once the server runs
        return ProcessPoolExecutor(processes, mp_context=context, initializer=_init_box_process)
    return ThreadPoolExecutor(threads)


def log_evaluation_time(metrics, seconds):
    """The line of an evaluation's rate (tools/gpu_table.py reads it from the scripts' output)."""
    _logger.info("evaluated %d images in %.1f s (%.0f images/s, loading and box extraction included)",
                 metrics["num_images"], seconds, metrics["num_images"] / max(seconds, 1e-9))


def _sum_over_processes(device):
    """Counter -> its sum over the processes (on the device for NCCL, on the CPU for gloo)."""
    nccl = dist.get_backend() == "nccl"

    def reduce(counter):
        return all_reduce_sum(torch.as_tensor(counter, dtype=torch.int64, device=device if nccl else "cpu")).cpu()
    return reduce


def model_outputs(batches, model, views, autocast, overlays, blocks=False):
    """(batch, outputs, crops) of each batch of ``batches`` through ``model`` (``forward_views``): the outputs as
    numpy, checked finite, and the uint8 crops of its overlays (``_overlay_crops``; ``overlays`` 0: none). Each
    batch is yielded once the next batch's forward is queued: the device computes while the caller scores on
    the CPU, and the copy of the outputs to the CPU (``HostOutputs``) is waited for only then."""
    previous = None
    for batch in batches:
        images = batch["image"]
        images = images if images.dim() == 5 else images[:, None]  # (B, V, 3, S, S)
        if images.shape[1] != views.num_views or images.shape[-1] != views.img_size:
            raise ValueError(f"batch views {tuple(images.shape[1:])} do not fit {views}")
        outputs = forward_views(model, images, views, autocast, blocks=blocks)
        crops = _overlay_crops(images, batch, views, overlays) if overlays != 0 else {}
        if previous is not None:
            yield _on_host(*previous)
        previous = batch, outputs, crops
    if previous is not None:
        yield _on_host(*previous)


def _on_host(batch, outputs, crops):
    """The batch's outputs as numpy (waiting for their copy), checked finite."""
    out = outputs.numpy()
    check_finite(out, batch["image_id"])
    return batch, out, crops


def saved_outputs(batches, saved_maps):
    """(batch, outputs, crops) of each batch of a ``map_loader`` (utils/saved_maps.py): the outputs read from
    files by ``saved_maps`` (a ``SavedMaps``, which checks them), the crops those the loader read for the
    overlays. No forward to queue first: each batch is yielded at once."""
    for batch in batches:
        yield batch, saved_maps(batch), {k: crop for k, crop in enumerate(batch["crop"]) if crop is not None}


class PooledScoring:
    """Batches scored by a ``BatchScorer`` in the box pool, merged in the order they were submitted into one
    ``Counters`` and the per-image rows. ``submit`` returns once at most ``keep`` batches are being scored (the
    loop runs ahead of the pool by no more than that); ``finish`` waits for the rest."""

    def __init__(self, pool, scorer, counters, keep):
        self.pool, self.scorer, self.counters, self.keep = pool, scorer, counters, keep
        self.rows, self.pending = [], deque()

    def submit(self, batch, out, crops):
        annotations = {key: value for key, value in batch.items() if key not in ("image", "crop")}  # no pixels
        self.pending.append(self.pool.submit(self.scorer, annotations, out, crops))
        self._collect(self.keep)

    def finish(self):
        """(Counters, rows) of every submitted batch."""
        self._collect(0)
        return self.counters, self.rows

    def _collect(self, keep):
        """Merge the finished batches in order, waiting while more than ``keep`` are pending."""
        while self.pending and (len(self.pending) > keep or self.pending[0].done()):
            counters, rows = self.pending.popleft().result()
            self.counters.merge(counters)
            self.rows.extend(rows)


class HeldOverlays:
    """The wsol overlays of an evaluation without a given map threshold: drawn at MaxBoxAcc's threshold, known
    once every batch is counted (over all processes), so each batch's crops and maps are held until then."""

    def __init__(self, scorer):
        self.scorer, self.held = scorer, []

    def hold(self, batch, out, crops):
        """Keep the batch's overlays; the crops left to draw with the batch: none."""
        scores, loc_maps = out["wsol"]
        masks = batch.get("mask_paths")
        self.held.extend((batch["image_id"][k], crop, loc_maps[k], batch["boxes"][k], batch["size"][k],
                          predicted_class(scores, k),
                          load_mask(masks[k], None, WSOL_MAP_SIZE)[0] if masks else None)
                         for k, crop in crops.items())
        return {}

    def draw(self, threshold):
        """Draw the held overlays at ``threshold``; the OutputError of one that cannot be written is returned (the
        caller shares it with the other processes), None when all were."""
        try:
            for image_id, crop, loc_map, boxes, size, pred, gt_mask in self.held:
                self.scorer.overlay(image_id, crop, loc_map, "wsol", threshold, None,
                                    gt_boxes_wsol(boxes, size), pred, gt_mask=gt_mask)
        except OutputError as err:
            return err
        return None


def _stop_together(failure, distributed):
    """Raise ``failure`` (this process's SATError, or None); ``distributed``: every process calls this (an
    all_gather_object) and all raise the first process's failure, so that none goes on into a collective that
    one which stopped never joins (a hang under NCCL)."""
    if distributed:
        raise_first(all_gather_object(failure and (type(failure), user_message(failure))))
    if failure is not None:
        raise failure


def evaluate(loader, model, device, *, threshold=None, thresholds=(), wsol_threshold=None, amp=False,
             distributed=False, save_maps=None, overlay_dir=None, overlays=None, per_image=False,
             progress=True, threads=None, box_processes=None, views=None, saved_maps=None, overlay_blocks=False,
             compile=False, label="eval"):
    """Metrics (percentages; keys in docs/evaluation.md) of ``model`` on ``loader``, whose dataset's transform
    is an ``EvalViews`` (``views``: that EvalViews, for a loader without a dataset): it gives the protocol.

    sat: at ``threshold`` (the reported map threshold) and/or the best of ``thresholds`` (chosen on this
    split: model selection); wsol: every map threshold of its grid, and box accuracy (on mask data the pixel
    IoU) at ``wsol_threshold``.
    ``distributed``: the loader holds this rank's shard (ShardSampler); counters are summed over the ranks.
    ``save_maps``: folder for the localization maps; ``overlay_dir``: overlay PNGs of the images with dataset
    index below ``overlays`` (None: all; ``overlay_blocks``: each block's map beside the fused one);
    ``per_image``: add ``per_image`` rows (and ``per_class`` for sat).
    Box extraction runs in ``box_processes`` processes (None: ``default_box_processes``) or ``threads`` threads.
    ``saved_maps``: a ``SavedMaps`` (utils/saved_maps.py) giving each batch's outputs from files instead of a
    forward of ``model`` (None); its loader's batches hold no pixels, and ``'crop'``: those of the overlays.
    ``compile``: the forwards of the full size through ``torch.compile`` (``CompiledFullBatches``).
    ``label``: the progress bar's (training's: which epoch's evaluation, or the final test).
    """
    views = views or views_of(getattr(loader, "dataset", None))
    protocol = views.protocol
    thresholds = [float(t) for t in thresholds]
    threshold = None if threshold is None else float(threshold)
    evaluated = list(dict.fromkeys(([threshold] if threshold is not None else []) + thresholds))
    if includes_sat(protocol) and not evaluated:
        raise ConfigError("the sat protocol needs the reported threshold and/or thresholds to search")
    if includes_sat(protocol) and (overlay_dir or per_image) and threshold is None:
        raise ConfigError("overlays and per-image rows are at the reported threshold: pass threshold")
    if distributed and not isinstance(loader.sampler, ShardSampler):
        raise ValueError("distributed evaluation needs a loader with a ShardSampler (build_eval_loader)")
    device = torch.device(device)
    model = getattr(model, "module", model)  # DDP wrapper: no collectives in the forward of uneven shards
    model_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if model_size is not None and tuple(model_size) != (views.img_size, views.img_size):
        raise ConfigError(f"the loader's views are {views.img_size} x {views.img_size} pixels, the model takes "
                          f"{model_size[0]} x {model_size[1]}: build the loader with img_size={model_size[0]} (or the "
                          f"model with img_size={views.img_size})")
    dataset = getattr(loader, "dataset", None)
    class_names = getattr(dataset, "classes", None)
    num_classes = getattr(model, "num_classes", None)
    if class_names and num_classes and len(class_names) > num_classes:  # those labels could never be predicted
        raise ConfigError(f"the loader's dataset has {len(class_names)} classes, the model {num_classes}: labels "
                          f"{num_classes} and above could never be predicted; use a model with num_classes="
                          f"{len(class_names)} (evaluator.py matches a checkpoint's named classes to the data's)")
    scorer = BatchScorer(views, evaluated, wsol_threshold if protocol == "wsol" else threshold, save_maps,
                         overlay_dir, class_names, from_files=saved_maps is not None,
                         block_layers=model.spatial_layers if overlay_blocks and model is not None else (),
                         suffix_kept=overlay_names_shared(getattr(dataset, "items", ())) if overlay_dir else (),
                         per_image=per_image)
    held = HeldOverlays(scorer) if protocol == "wsol" and overlay_dir is not None and wsol_threshold is None \
        else None  # wsol overlays at the threshold this evaluation chooses
    size_mismatches = 0  # images whose file is not the size their annotation states
    autocast = autocast_context(device, amp)
    rank = dist.get_rank() if distributed else 0
    box_processes = default_box_processes(device) if box_processes is None else box_processes
    threads = box_processes or threads or min(4, os.cpu_count() or 1)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    forward = CompiledFullBatches(model) if compile and model is not None else model
    failure = None  # a file this process could not read: with several processes, each stops on it (below)
    try:
        with box_pool(threads, box_processes) as pool, torch.inference_mode():
            # on CUDA, the next batch is prepared on a side stream
            # cleared when done: the line that follows says it (the evaluator's 'evaluated N images in T s',
            # training's 'epoch N test: ...')
            batches = progress_bar(on_device(loader, device) if saved_maps is None else loader, desc=label,
                                   unit="batch", disable=not progress or rank)
            if saved_maps is None:
                outputs = model_outputs(batches, forward, views, autocast, overlays if overlay_dir else 0,
                                        blocks=overlay_blocks and bool(overlay_dir))
            else:
                outputs = saved_outputs(batches, saved_maps)
            scoring = PooledScoring(pool, scorer, Counters(protocol, evaluated, views.img_size), keep=2 * threads)
            with contextlib.closing(outputs):  # a failure ends the loader's pass (workers, threads) here
                for batch, out, crops in outputs:
                    size_mismatches += size_differences(batch)
                    scoring.submit(batch, out, crops if held is None else held.hold(batch, out, crops))
            total, rows = scoring.finish()
    except (DataError, NonFiniteOutputError, OutputError) as err:  # OutputError: an overlay or a saved map
        failure = err
    finally:
        if model is not None:
            model.train(was_training)
    _stop_together(failure, distributed)  # the loop holds no collectives: every process gets here
    if distributed:
        total.reduce(_sum_over_processes(device))
        size_mismatches = int(_sum_over_processes(device)(size_mismatches))
    if size_mismatches and rank == 0:
        _logger.warning(size_difference_warning(size_mismatches))
    metrics = total.metrics(protocol, threshold, thresholds, wsol_threshold)
    if metrics.get("skewed_masks") and rank == 0:  # stretched to 224 x 224 as the image is: over other pixels
        _logger.warning("%d of the %d images have a mask of another aspect ratio than the image: masks are resized to "
                        "224 x 224 as their images are (wsolevaluation's rule), so such a mask does not lie over its "
                        "object (tools/check_dataset.py names them)", metrics["skewed_masks"], metrics["num_images"])
    if metrics.get("empty_masks") and rank == 0:  # scored as wsolevaluation does, but likely a broken mask file
        _logger.warning("%d of the %d images have a mask with no foreground pixel (at 224 x 224): PxAP counts all "
                        "their pixels as background; check those mask files", metrics["empty_masks"],
                        metrics["num_images"])
    curves = total.curves()
    if curves:
        metrics["curves"] = curves
    chosen = chosen_wsol_threshold(metrics)
    # drawn by the processes that hold them; ``held`` and ``chosen`` are alike on every process: all share a failure
    if held is not None and chosen is not None:
        _stop_together(held.draw(chosen), distributed)
    if per_image:
        rows = [row for part in all_gather_object(rows) for row in part] if distributed else rows
        metrics["per_image"] = sorted(rows, key=lambda row: row["index"])
        if includes_sat(protocol):
            metrics["per_class"] = per_class_metrics(rows, class_names)
    return metrics
