"""Evaluation loop: one pass over a loader scores the official SAT protocol (``sat``, the official
evaluator.py's ``val_loc_one_epoch``) and/or the wsolevaluation protocol (``wsol``), or classification
only (``cls``); README, "Evaluation", maps each official function to its counterpart here.

The loader's dataset follows a ``DataLoader.eval_views.EvalViews`` (``views_of``): it names the protocol
and the views (``centre`` or ``tencrop`` for the official protocol, ``wsol``), stacked per image as
(V, 3, S, S); its samples hold their uint8 sources (``EvalViews.pixels``), cropped and normalised here on
the device.
Per batch: ``batch_to_device`` moves the views to the device; ``forward_views`` runs all views in one
call and returns class scores and maps per protocol (copied to the CPU while the next batch's forward is
queued, so that the device does not wait for the CPU work); ``BatchScorer`` does the per-image CPU work (GT
boxes in each protocol's frame, boxes, counters, per-image rows, files) in a pool of threads or processes
while the next batches are forwarded. Counters are summed over batches and, under DDP,
over processes.
"""
import os
from collections import deque
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from DataLoader.device_transforms import on_device, to_device
from DataLoader.eval_loader import ShardSampler
from DataLoader.eval_views import TENCROP_CENTRE, crop_box_to_original, views_of
from DataLoader.transforms import boxes_protocol_a, boxes_protocol_b, denormalize
from DataLoader.wsol_metadata import load_mask
from utils.amp import autocast_settings
from utils.box_ops import max_iou
from utils.cv import cv2
from utils.distributed import all_gather_object, all_reduce_sum
from utils.errors import ConfigError, DataError, SATError
from utils.metrics import ClassAccumulator
from utils.metrics_sat import SATLocAccumulator, normalize_map_sat
from utils.metrics_wsol import SCORE_MAP_SIZE, PxAPAccumulator, WSOLBoxAccumulator, contour_boxes, wsol_score_map
from utils.visualize import render_overlay, save_rgb

LOC_KEYS = ("gt_known_loc", "top1_loc", "top5_loc", "iou30", "iou50", "iou70")


class NonFiniteOutputError(SATError):
    """The model gave NaN or Inf class scores or maps (as wsolevaluation, such maps are not scored)."""


def sat_metrics(acc, threshold, thresholds):
    """Official-protocol metrics of an accumulator: the headline keys at ``threshold`` (when given), and
    the one of ``thresholds`` maximising GT-known + Top-1 Loc on the evaluated split as
    ``best_threshold`` with its metrics under ``at_best_threshold`` (when ``thresholds`` are given)."""
    out = acc.compute_at(threshold) if threshold is not None else {}
    if thresholds:
        best = acc.compute(thresholds)
        out.update({key: best[key] for key in ("num_images", "top1_cls", "top5_cls")})
        out.update(best_threshold=best["best_threshold"], at_best_threshold={key: best[key] for key in LOC_KEYS})
    if len(acc.thresholds) > 1:
        every = acc.compute()
        out.update(thresholds=acc.thresholds, gt_known_loc_per_threshold=every["gt_known_loc_per_threshold"],
                   top1_loc_per_threshold=every["top1_loc_per_threshold"])
    return out


class Counters:
    """The accumulators of one evaluation, or of one batch (merged into the evaluation's)."""

    def __init__(self, protocol, thresholds, cam_size):
        self.parts = {}
        if protocol in ("sat", "both"):
            self.parts["sat"] = SATLocAccumulator(thresholds, cam_size)
        if protocol == "cls":
            self.parts["cls"] = ClassAccumulator()
        if protocol in ("wsol", "both"):
            self.parts.update(wsol_cls=ClassAccumulator(), wsol_boxes=WSOLBoxAccumulator(), pxap=PxAPAccumulator())

    def merge(self, other):
        for name, acc in self.parts.items():
            acc.merge(other.parts[name].state())

    def reduce(self, fn):
        for acc in self.parts.values():
            acc.reduce(fn)

    def metrics(self, protocol, threshold, thresholds, wsol_threshold=None):
        out = sat_metrics(self.parts["sat"], threshold, thresholds) if "sat" in self.parts else {}
        if "cls" in self.parts:
            out.update(self.parts["cls"].compute())
        if "wsol_cls" in self.parts:
            classification = self.parts["wsol_cls"].compute()
            if protocol == "wsol":
                out.update(classification)
            else:  # 'both': the official view's classification keeps the plain keys
                out.update(wsol_top1_cls=classification["top1_cls"], wsol_top5_cls=classification["top5_cls"])
            boxes, pxap = self.parts["wsol_boxes"], self.parts["pxap"]
            if int(boxes.num_images):  # box metrics need boxes, PxAP masks: report what the data has
                out.update({k: v for k, v in boxes.compute().items() if k != "num_images"})
                if wsol_threshold is not None:
                    out["at_wsol_threshold"] = boxes.compute_at(wsol_threshold)
            if int(pxap.num_images):
                out.update({k: v for k, v in pxap.compute().items() if k != "num_images"})
        return out

    def curves(self):
        """wsolevaluation curves: box accuracy against the CAM threshold, the PxAP precision-recall curve."""
        out = {}
        if "wsol_boxes" in self.parts and int(self.parts["wsol_boxes"].num_images):
            out["box_accuracy"] = self.parts["wsol_boxes"].curves()
        if "pxap" in self.parts and int(self.parts["pxap"].num_images):
            out["pxap"] = self.parts["pxap"].curves()
        return out


def batch_to_device(batch, device):
    """The batch's views on ``device``, as (B, V, 3, S, S): uint8 pixels (``EvalViews.pixels``) are cropped
    and normalised there (DataLoader/device_transforms.py), normalised views only copied."""
    views = to_device(batch["image"], device)
    return views if views.dim() == 5 else views[:, None]


def forward_views(model, views, layout, autocast):
    """All views of a batch in one forward -> ``{'sat' | 'wsol': (scores, maps)}`` as float32 CPU tensors,
    copied ``non_blocking`` from a CUDA device: ``HostOutputs.numpy`` waits for them.

    ``tencrop``: mean of the ten softmaxes (official), map of the centre crop; ``centre`` / ``wsol``:
    the view's logits and map. The official view's outputs are keyed 'sat' (also for protocol 'cls').
    """
    batch, num_views = views.shape[:2]
    with autocast():
        logits, maps = model(views.flatten(0, 1))
    logits = logits.float().unflatten(0, (batch, num_views))
    maps = maps.float().unflatten(0, (batch, num_views))
    out = {}
    for view, where in layout.slices.items():
        if view == "tencrop":
            scores, cam = logits[:, where].softmax(dim=-1).mean(dim=1), maps[:, where.start + TENCROP_CENTRE]
        else:
            scores, cam = logits[:, where.start], maps[:, where.start]
        out["wsol" if view == "wsol" else "sat"] = (scores.to("cpu", non_blocking=True),
                                                     cam.to("cpu", non_blocking=True))
    return HostOutputs(out, views.device)


class HostOutputs:
    """A batch's outputs on their way to the CPU: ``numpy()`` waits for the copies (a CUDA event) and gives
    ``{'sat' | 'wsol': (scores, maps)}`` as numpy, so that the next batch's forward can be queued first."""

    def __init__(self, outputs, device):
        self.outputs = outputs
        self.copied = None
        if device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(device))

    def numpy(self):
        if self.copied is not None:
            self.copied.synchronize()
        return {key: (scores.numpy(), maps.numpy()) for key, (scores, maps) in self.outputs.items()}


def check_finite(out, image_ids):
    """NonFiniteOutputError naming the first images whose scores or maps hold NaN or Inf."""
    bad = np.zeros(len(image_ids), bool)
    for scores, maps in out.values():
        bad |= ~np.isfinite(scores).all(axis=1) | ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    if bad.any():
        names = [str(image_ids[k]) for k in np.flatnonzero(bad)[:3]]
        raise NonFiniteOutputError(f"the model outputs NaN/Inf scores or maps for {int(bad.sum())} image(s) of a "
                                   f"batch, first {', '.join(names)}")


def _softmax(scores):
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class BatchScorer:
    """The per-image CPU work of one batch: GT boxes in each protocol's frame, boxes and counters,
    per-image rows (official protocol, at ``threshold``), score maps and overlays."""

    def __init__(self, layout, thresholds, threshold, save_scoremaps, save_images, class_names):
        self.layout, self.thresholds, self.threshold = layout, thresholds, threshold
        self.save_scoremaps = Path(save_scoremaps) if save_scoremaps else None
        self.save_images = Path(save_images) if save_images else None
        self.class_names = class_names

    def __call__(self, batch, out, crops):
        layout, protocol = self.layout, self.layout.protocol
        counters = Counters(protocol, self.thresholds, layout.img_size)
        labels, boxes, sizes, ids = batch["label"], batch["boxes"], batch["size"], batch["image_id"]
        rows = []
        if "cls" in counters.parts:
            counters.parts["cls"].update(out["sat"][0], labels)
        if "sat" in counters.parts:
            missing = next((i for i, b in zip(ids, boxes) if len(b) == 0), None)
            if missing is not None:
                raise DataError(f"image {missing} has no GT boxes: the official SAT protocol (sat) needs boxes; "
                                "use --eval-protocol wsol for mask datasets, cls for neither")
            gt_sat = [boxes_protocol_a(b, s, layout.resize_size, layout.img_size) for b, s in zip(boxes, sizes)]
            scores, maps = out["sat"]
            sat_boxes = counters.parts["sat"].boxes(maps)
            ious = counters.parts["sat"].update_boxes(sat_boxes, gt_sat, scores, labels)
            if self.threshold is not None:
                column = self.thresholds.index(self.threshold)
                rows = self._rows(batch, scores, sat_boxes[:, column], ious[:, column])
        if "wsol" in out:
            scores, maps = out["wsol"]
            gt_wsol = [boxes_protocol_b(b, s, SCORE_MAP_SIZE) for b, s in zip(boxes, sizes)]
            counters.parts["wsol_cls"].update(scores, labels)
            with_boxes = [i for i, b in enumerate(gt_wsol) if len(b)]
            if with_boxes:
                counters.parts["wsol_boxes"].update(maps[with_boxes], [gt_wsol[i] for i in with_boxes])
            if "mask_paths" in batch:
                masks = [load_mask(paths, ignore, SCORE_MAP_SIZE)
                         for paths, ignore in zip(batch["mask_paths"], batch["ignore_path"])]
                counters.parts["pxap"].update(maps, *map(np.stack, zip(*masks)))
            if self.save_scoremaps:
                for image_id, cam in zip(ids, maps):
                    path = self.save_scoremaps / f"{image_id}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, wsol_score_map(cam))
        for k, crop in crops.items():
            if "sat" in counters.parts:
                column = self.thresholds.index(self.threshold)
                self.overlay(ids[k], crop, out["sat"][1][k], "sat", self.threshold, sat_boxes[k, column], gt_sat[k],
                             int(np.argmax(out["sat"][0][k])))
            elif "wsol" in out and self.threshold is not None:  # wsol at a given CAM threshold
                self.overlay(ids[k], crop, out["wsol"][1][k], "wsol", self.threshold, None,
                             boxes_protocol_b(boxes[k], sizes[k], SCORE_MAP_SIZE), int(np.argmax(out["wsol"][0][k])))
        return counters, rows

    def _rows(self, batch, scores, boxes, ious):
        """One record per image at the reported threshold (see ``per_image.csv`` in README)."""
        layout = self.layout
        probs = scores if layout.tencrop else _softmax(scores.astype(np.float64))
        top5 = torch.as_tensor(scores).topk(min(5, scores.shape[1]), dim=1).indices.numpy()  # as topk_correct
        rows = []
        for k, (image_id, label, size) in enumerate(zip(batch["image_id"], batch["label"].tolist(), batch["size"])):
            top5_k = [int(c) for c in top5[k]]
            rows.append({
                "index": int(batch["index"][k]), "image_id": image_id, "label": int(label), "top5": top5_k,
                "score": float(probs[k, top5_k[0]]),
                "box_crop": [int(v) for v in boxes[k]],
                "box_original": crop_box_to_original(boxes[k], size, layout.resize_size, layout.img_size).tolist(),
                "iou": float(ious[k]), "cls_correct": top5_k[0] == label, "gt_known": bool(ious[k] >= 0.5),
                "top1_loc": top5_k[0] == label and bool(ious[k] >= 0.5), "width": int(size[0]), "height": int(size[1])})
        return rows

    def overlay(self, image_id, crop, cam, protocol, threshold, box, gt, pred):
        """One overlay PNG: heat map, predicted box at ``threshold`` (green), GT boxes (red), caption."""
        if protocol == "sat":
            score = normalize_map_sat(cam, self.layout.img_size)
        else:
            score = wsol_score_map(cam)
            box = contour_boxes(score, [threshold])[1][0]
        name = self.class_names[pred] if self.class_names else str(pred)
        caption = f"{name}  IoU {max_iou(np.asarray(box)[None], gt)[0]:.2f} @ {threshold:g}" if len(gt) else name
        save_rgb((self.save_images / image_id).with_suffix(".png"), render_overlay(crop, score, box, gt, caption))


def per_class_metrics(rows, class_names):
    """Top-1 Cls / Top-1 Loc / GT-known Loc (%) per class, from the per-image rows."""
    out = {}
    for label in sorted({row["label"] for row in rows}):
        mine = [row for row in rows if row["label"] == label]
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        out[name] = {"num_images": len(mine), **{key: 100.0 * sum(row[flag] for row in mine) / len(mine) for key, flag
                     in (("top1_cls", "cls_correct"), ("top1_loc", "top1_loc"), ("gt_known_loc", "gt_known"))}}
    return out


def _overlay_crops(views, batch, layout, max_images):
    """{position in batch: uint8 RGB image} of the batch's images that get an overlay: the official
    centre crop, or the wsol view resized to the 224x224 score-map frame."""
    official = next((view for view in ("centre", "tencrop") if view in layout.slices), None)
    index = layout.slices[official or "wsol"].start + (TENCROP_CENTRE if official == "tencrop" else 0)
    crops = {}
    for k, position in enumerate(batch["index"]):
        if max_images is None or position < max_images:
            crop = denormalize(views[k, index])
            if official is None and crop.shape[0] != SCORE_MAP_SIZE:
                crop = cv2.resize(crop, (SCORE_MAP_SIZE, SCORE_MAP_SIZE), interpolation=cv2.INTER_LINEAR)
            crops[k] = crop
    return crops


def _init_box_process():
    """Box-pool process: one torch thread and (utils/cv.py) one OpenCV thread: the processes are the
    parallelism."""
    torch.set_num_threads(1)


def default_box_processes(device):
    """``box_processes`` when not given: on a GPU machine, half of this process's share of the CPUs (the CPUs
    over the processes of this node, LOCAL_WORLD_SIZE), at most 8, so that box extraction keeps up with the
    GPU's forwards (a thread pool serialises on the GIL and halved the rate: README, Measured on GPUs); 0 (a
    thread pool) when that is fewer than 2, and on CPUs, where the forward is the slower part."""
    if torch.device(device).type != "cuda":
        return 0
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    processes = min(8, share // 2)
    return processes if processes >= 2 else 0


def box_pool(threads, processes=0):
    """The executor of the per-batch CPU work: ``processes`` > 0 -> a process pool, else a thread pool.
    The pool's processes come from a fork server, not from a fork of this process: a child forked while
    OpenCV's or OpenMP's worker threads hold a lock deadlocks in its first OpenCV call."""
    if processes:
        return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_init_box_process)
    return ThreadPoolExecutor(threads)


def _sum_over_processes(device):
    """Counter -> its sum over the processes (on the device for NCCL, on the CPU for gloo)."""
    nccl = dist.get_backend() == "nccl"

    def reduce(counter):
        return all_reduce_sum(torch.as_tensor(counter, dtype=torch.int64, device=device if nccl else "cpu")).cpu()
    return reduce


def evaluate(model, loader, device, *, threshold=None, thresholds=(), wsol_threshold=None, amp=False,
             distributed=False, save_scoremaps=None, save_images=None, max_images=None, per_image=False,
             progress=True, threads=None, box_processes=None, views=None):
    """Metrics (percentages) of ``model`` on ``loader``, whose dataset's transform is an ``EvalViews``
    (e.g. from ``DataLoader.eval_loader.build_eval_loader``): it gives the protocol and the views.
    ``views``: that ``EvalViews``, for a loader without a dataset (an iterable of batches).

    Official protocol (``sat`` / ``both``; at least one of ``threshold`` / ``thresholds``): num_images,
    top1_cls, top5_cls and, at ``threshold`` (the reported CAM threshold, e.g. the official 0.4),
    threshold, gt_known_loc, top1_loc, top5_loc, iou30/50/70; with ``thresholds``, the one of them
    maximising GT-known + Top-1 Loc on this split as best_threshold, its metrics under at_best_threshold
    (the official train.py's per-epoch search); with several thresholds in all, per-threshold lists.
    ``wsol``: num_images, top1_cls, top5_cls (of the wsol view) and, as the data allows, maxboxacc,
    maxboxaccv2, maxboxaccv2_per_iou and their best CAM thresholds (boxes), pxap (masks), ``curves``;
    ``wsol_threshold`` (e.g. chosen on val) adds box accuracies at that CAM threshold (at_wsol_threshold).
    ``both``: the official keys plus wsol's (its classification as wsol_top1_cls / wsol_top5_cls).
    ``cls``: num_images, top1_cls, top5_cls. ``amp``: autocast as utils.amp (default fp32, as official).

    ``distributed``: the loader holds this rank's shard (ShardSampler); counters are summed over the
    ranks so that every rank returns the same metrics, and each rank writes its own images' files.
    ``save_scoremaps``: folder for ``<image_id>.npy`` wsolevaluation score maps. ``save_images``: folder
    for ``<image_id>.png`` overlays of the images with dataset index below ``max_images`` (None: all),
    drawn at the threshold whose numbers are reported (wsol: ``wsol_threshold``, else maxboxacc's).
    ``per_image``: add ``per_image`` rows (official protocol, at ``threshold``) and ``per_class``.
    ``threads``: workers of the CPU box-extraction thread pool (OpenCV releases the GIL); ``box_processes``
    > 0: a pool of that many processes instead (started once per call, a few seconds), which scales with
    cores (the same boxes and metrics); None: ``default_box_processes(device)``.
    """
    layout = views or views_of(loader.dataset)
    protocol = layout.protocol
    thresholds = [float(t) for t in thresholds]
    threshold = None if threshold is None else float(threshold)
    evaluated = list(dict.fromkeys(([threshold] if threshold is not None else []) + thresholds))
    if protocol in ("sat", "both") and not evaluated:
        raise ConfigError("the official SAT protocol needs the reported threshold and/or thresholds to search")
    if protocol in ("sat", "both") and (save_images or per_image) and threshold is None:
        raise ConfigError("overlays and per-image rows are at the reported threshold: pass threshold")
    if save_scoremaps and "wsol" not in layout.slices:
        raise ConfigError("saving score maps needs the wsolevaluation protocol: use protocol 'wsol' or 'both'")
    if distributed and not isinstance(loader.sampler, ShardSampler):
        raise ValueError("distributed evaluation needs a loader with a ShardSampler (build_eval_loader)")
    device = torch.device(device)
    model = getattr(model, "module", model)  # DDP wrapper: no collectives in the forward of uneven shards
    class_names = getattr(getattr(loader, "dataset", None), "classes", None)
    wsol_overlays = protocol == "wsol" and save_images is not None
    scorer = BatchScorer(layout, evaluated, wsol_threshold if protocol == "wsol" else threshold, save_scoremaps,
                         save_images, class_names)
    total, rows, pending_overlays = Counters(protocol, evaluated, layout.img_size), [], []
    autocast = autocast_settings(device, amp)[0]
    rank = dist.get_rank() if distributed else 0
    box_processes = default_box_processes(device) if box_processes is None else box_processes
    threads = box_processes or threads or min(4, os.cpu_count() or 1)
    was_training = model.training
    model.eval()
    try:
        with box_pool(threads, box_processes) as pool, torch.inference_mode():
            pending = deque()

            def score(batch, outputs, crops):
                """The CPU side of a batch, once the next batch's forward is queued on the device."""
                out = outputs.numpy()
                check_finite(out, batch["image_id"])
                if wsol_overlays and wsol_threshold is None:  # drawn once maxboxacc's threshold is known
                    scores, maps = out["wsol"]
                    pending_overlays.extend((batch["image_id"][k], crop, maps[k], batch["boxes"][k], batch["size"][k],
                                             int(np.argmax(scores[k]))) for k, crop in crops.items())
                    crops = {}
                annotations = {key: value for key, value in batch.items() if key != "image"}
                pending.append(pool.submit(scorer, annotations, out, crops))
                collect(keep=2 * threads)

            def collect(keep):
                """Merge the finished batches in order, waiting while more than ``keep`` are pending."""
                while pending and (len(pending) > keep or pending[0].done()):
                    counters, batch_rows = pending.popleft().result()
                    total.merge(counters)
                    rows.extend(batch_rows)

            batches = on_device(loader, device)  # on CUDA, the next batch is prepared on a side stream
            previous = None
            for batch in tqdm(batches, desc="eval", unit="batch", dynamic_ncols=True, disable=not progress or rank):
                views_on_device = batch_to_device(batch, device)
                if views_on_device.shape[1] != layout.num_views or views_on_device.shape[-1] != layout.img_size:
                    raise ValueError(f"batch views {tuple(views_on_device.shape[1:])} do not fit {layout}")
                outputs = forward_views(model, views_on_device, layout, autocast)
                crops = _overlay_crops(views_on_device, batch, layout, max_images) if save_images else {}
                if previous is not None:
                    score(*previous)
                previous = batch, outputs, crops
            if previous is not None:
                score(*previous)
            collect(keep=0)
    finally:
        model.train(was_training)
    if distributed:
        total.reduce(_sum_over_processes(device))
    metrics = total.metrics(protocol, threshold, thresholds, wsol_threshold)
    curves = total.curves()
    if curves:
        metrics["curves"] = curves
    chosen = metrics.get("maxboxacc_threshold", metrics.get("piou_threshold"))  # boxes, else masks
    if pending_overlays and chosen is not None:
        for image_id, crop, cam, boxes, size, pred in pending_overlays:
            scorer.overlay(image_id, crop, cam, "wsol", chosen, None,
                           boxes_protocol_b(boxes, size, SCORE_MAP_SIZE), pred)
    if per_image:
        rows = [row for part in all_gather_object(rows) for row in part] if distributed else rows
        metrics["per_image"] = sorted(rows, key=lambda row: row["index"])
        metrics["per_class"] = per_class_metrics(rows, class_names)
    return metrics
