"""Evaluation engine: one pass over a loader scores protocol A (official SAT: Top-1 / Top-5 / GT-known
Loc, SPEC 5) and/or protocol B (wsolevaluation: MaxBoxAcc, MaxBoxAccV2, PxAP, SPEC 6), and can save
the benchmark's score maps and overlay images.

Views: the loader's dataset is built with ``eval_transform(protocol, tencrop, img_size)``, which turns
each decoded image into one (V, 3, S, S) stack: the protocol A views first (the centre crop, or the
ten crops of TenCrop with the centre crop at index 4), then the protocol B view (plain resize).
``build_eval_loader`` uses its uint8 half ``DataLoader.transforms.EvalPixels`` instead: the workers only
decode and resize, and ``evaluate`` crops and normalises on its device (DataLoader/device_transforms.py,
the same tensors). ``evaluate`` forwards all views of a batch in one call. Protocol B works in the
benchmark's 224x224 frame whatever the model's input size: score maps are resized to 224 and GT boxes
scaled to it.

The per-image box extraction (OpenCV, which releases the GIL) runs in a thread pool while the next
batch is forwarded; each task fills its own counters, merged afterwards and, under DDP, all-reduced.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from DataLoader.device_transforms import on_device

from utils.box_ops import CounterState, max_iou
from utils.errors import ConfigError, DataError
from utils.metrics_sat import TRAIN_THRESHOLDS, SATLocAccumulator, boxes_at_thresholds, normalize_map_sat, topk_correct
from utils.metrics_wsol import SCORE_MAP_SIZE, PxAPAccumulator, WSOLBoxAccumulator, contour_boxes, wsol_score_map

PROTOCOLS = ("sat", "wsol", "both")
TENCROP_CENTER = 4  # torchvision TenCrop order: four corners, centre, then the same flipped


def default_resize_size(img_size):
    """The official Resize((256, 256)) before CenterCrop(224), scaled to other input sizes."""
    return round(img_size * 256 / 224)


def view_counts(protocol, tencrop):
    """(protocol A views, protocol B views) per image: (1 or 10, 0), (0, 1) or (1 or 10, 1)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    return (0 if protocol == "wsol" else 10 if tencrop else 1), int(protocol != "sat")


class EvalViews:
    """PIL image -> (V, 3, S, S): the protocol A view(s), then the protocol B view (see module doc)."""

    def __init__(self, protocol="sat", tencrop=False, img_size=224, resize_size=None):
        from DataLoader import transforms as T  # torchvision is slow to import

        n_a, n_b = view_counts(protocol, tencrop)
        resize_size = resize_size or default_resize_size(img_size)
        self.transforms = []
        if n_a:
            crop = T.tencrop_transform if tencrop else T.test_transform
            self.transforms.append(crop(img_size, resize_size))
        if n_b:
            self.transforms.append(T.wsol_transform(img_size))

    def __call__(self, image):
        views = [transform(image) for transform in self.transforms]
        return torch.cat([view.reshape(-1, *view.shape[-3:]) for view in views])


def eval_transform(protocol="sat", tencrop=False, img_size=224, resize_size=None):
    """The dataset transform ``evaluate`` expects for these settings (resize default 256/224 * img_size)."""
    return EvalViews(protocol, tencrop, img_size, resize_size)


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ...: disjoint shards that cover the dataset exactly once
    (unlike DistributedSampler, no padding duplicates). rank / world_size default to the process group."""

    def __init__(self, length, rank=None, world_size=None):
        self.length = length
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(fmt, root, split, *, protocol, tencrop, img_size, batch_size, workers, distributed=False,
                      metadata_root=None, val_boxes=None, resize_size=None):
    """Loader over ``split`` of a dataset (DataLoader.build_dataset formats) with the views ``evaluate``
    needs; ``distributed``: this process's shard (ShardSampler)."""
    from DataLoader import build_dataset, collate_samples
    from DataLoader.transforms import EvalPixels

    # uint8 pixels and crops; evaluate makes the views on its device (equal to eval_transform's)
    pixels = EvalPixels(*view_counts(protocol, tencrop), img_size, resize_size or default_resize_size(img_size))
    dataset = build_dataset(fmt, root, split, pixels, metadata_root=metadata_root, val_boxes=val_boxes)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      sampler=ShardSampler(len(dataset)) if distributed else None,
                      num_workers=workers, collate_fn=collate_samples, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0)


class ClassAccumulator(CounterState):
    """Top-1 / top-5 classification hits (protocol B reports the classification of its own view)."""

    COUNTERS = ("num_images", "top1", "top5")

    def __init__(self):
        self.num_images, self.top1, self.top5 = (np.zeros((), np.int64) for _ in range(3))

    def update(self, scores, labels):
        top1, top5 = topk_correct(scores, labels)
        self.num_images += len(top1)
        self.top1 += top1.sum()
        self.top5 += top5.sum()

    def compute(self):
        self._check_nonempty()
        pct = 100.0 / int(self.num_images)
        return {"num_images": int(self.num_images), "top1_cls": float(self.top1 * pct),
                "top5_cls": float(self.top5 * pct)}


class _Counters:
    """All accumulators of one evaluation, or of one batch (merged into the evaluation's)."""

    def __init__(self, n_a, n_b, thresholds, cam_size):
        self.parts = {}
        if n_a:
            self.parts["sat"] = SATLocAccumulator(thresholds, cam_size)
        if n_b:
            self.parts.update(cls_b=ClassAccumulator(), boxes_b=WSOLBoxAccumulator(), pxap=PxAPAccumulator())

    def merge(self, other):
        for name, acc in self.parts.items():
            acc.merge(other.parts[name].state())

    def reduce(self, fn):
        for acc in self.parts.values():
            acc.reduce(fn)

    def metrics(self, protocol):
        out = self.parts["sat"].compute() if "sat" in self.parts else {}
        if "cls_b" in self.parts:
            cls_b = self.parts["cls_b"].compute()
            if protocol == "wsol":
                out.update(cls_b)
            else:  # 'both': protocol A's classification (ten-crop or centre crop) keeps the plain keys
                out.update(wsol_top1_cls=cls_b["top1_cls"], wsol_top5_cls=cls_b["top5_cls"])
            for name in ("boxes_b", "pxap"):  # box metrics need boxes, PxAP masks: report what the data has
                if int(self.parts[name].num_images):
                    out.update({k: v for k, v in self.parts[name].compute().items() if k != "num_images"})
        return out


class _BatchScorer:
    """The per-image CPU work of a batch: GT boxes in each protocol's frame, counters, score maps, overlays."""

    def __init__(self, n_a, n_b, thresholds, img_size, resize_size, save_scoremaps, save_images, class_names):
        self.n_a, self.n_b = n_a, n_b
        self.thresholds, self.img_size, self.resize_size = thresholds, img_size, resize_size
        self.save_scoremaps = Path(save_scoremaps) if save_scoremaps else None
        self.save_images = Path(save_images) if save_images else None
        self.class_names = class_names

    def __call__(self, batch, out, crops):
        from DataLoader import load_mask
        from DataLoader.transforms import boxes_protocol_a, boxes_protocol_b

        counters = _Counters(self.n_a, self.n_b, self.thresholds, self.img_size)
        labels, boxes, sizes, ids = batch["label"], batch["boxes"], batch["size"], batch["image_id"]
        if self.n_a:
            if any(len(b) == 0 for b in boxes):
                missing = next(i for i, b in zip(ids, boxes) if len(b) == 0)
                raise DataError(f"image {missing} has no GT boxes: protocol A (sat) needs boxes; "
                                "use --protocol wsol for mask datasets")
            gt_a = [boxes_protocol_a(b, s, self.resize_size, self.img_size) for b, s in zip(boxes, sizes)]
            ious_a = counters.parts["sat"].update(out["maps_a"], gt_a, out["scores_a"], labels)
        if self.n_b:
            gt_b = [boxes_protocol_b(b, s, SCORE_MAP_SIZE) for b, s in zip(boxes, sizes)]
            counters.parts["cls_b"].update(out["scores_b"], labels)
            with_boxes = [i for i, b in enumerate(gt_b) if len(b)]
            if with_boxes:
                counters.parts["boxes_b"].update(out["maps_b"][with_boxes], [gt_b[i] for i in with_boxes])
            if "mask_paths" in batch:
                masks = [load_mask(paths, ignore, SCORE_MAP_SIZE)
                         for paths, ignore in zip(batch["mask_paths"], batch["ignore_path"])]
                counters.parts["pxap"].update(out["maps_b"], *map(np.stack, zip(*masks)))
            if self.save_scoremaps:
                for image_id, cam in zip(ids, out["maps_b"]):
                    path = self.save_scoremaps / f"{image_id}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, wsol_score_map(cam))
        for k, crop in crops.items():
            pred = int(np.argmax(out["scores_a" if self.n_a else "scores_b"][k]))
            if self.n_a:
                score = normalize_map_sat(out["maps_a"][k], self.img_size)
                box, gt, iou = boxes_at_thresholds(score, self.thresholds[:1])[0], gt_a[k], ious_a[k, 0]
            else:
                score, gt = wsol_score_map(out["maps_b"][k]), gt_b[k]
                box = contour_boxes(score, self.thresholds[:1])[1][0]
                iou = max_iou(box[None], gt)[0] if len(gt) else None  # mask datasets have no boxes
            self._overlay(ids[k], crop, score, box, gt, pred, iou)
        return counters

    def _overlay(self, image_id, crop, score, box, gt, pred, iou):
        from utils.visualize import render_overlay, save_rgb

        name = self.class_names[pred] if self.class_names else str(pred)
        caption = name if iou is None else f"{name}  IoU {iou:.2f} @ {self.thresholds[0]:g}"
        save_rgb((self.save_images / image_id).with_suffix(".png"), render_overlay(crop, score, box, gt, caption))


def _forward(model, views, n_a, autocast):
    """Model outputs of all views in one call -> per-protocol scores and maps as float32 numpy arrays."""
    batch, num_views = views.shape[:2]
    with autocast():
        logits, maps = model(views.flatten(0, 1))
    logits = logits.float().unflatten(0, (batch, num_views))
    maps = maps.float().unflatten(0, (batch, num_views))
    out = {}
    if n_a == 10:  # ten-crop: mean of the ten softmaxes, map of the centre crop
        out.update(scores_a=logits[:, :10].softmax(dim=-1).mean(dim=1), maps_a=maps[:, TENCROP_CENTER])
    elif n_a == 1:
        out.update(scores_a=logits[:, 0], maps_a=maps[:, 0])
    if num_views > n_a:
        out.update(scores_b=logits[:, n_a], maps_b=maps[:, n_a])
    return {key: value.cpu().numpy() for key, value in out.items()}


def _overlay_crops(images, batch, n_a, max_images):
    """{position in batch: uint8 RGB image} of the batch's images that get an overlay: the protocol A
    centre crop, or the protocol B view resized to the 224x224 score-map frame."""
    from DataLoader.transforms import denormalize

    view = TENCROP_CENTER if n_a == 10 else 0  # 'wsol': the protocol B view is the only one
    crops = {}
    for k, index in enumerate(batch["index"]):
        if max_images is None or index < max_images:
            crop = denormalize(images[k, view])
            if not n_a and crop.shape[0] != SCORE_MAP_SIZE:
                crop = cv2.resize(crop, (SCORE_MAP_SIZE, SCORE_MAP_SIZE), interpolation=cv2.INTER_LINEAR)
            crops[k] = crop
    return crops


def _autocast(device, amp):
    from utils.amp import autocast_settings

    return autocast_settings(device, amp)[0]


def _all_reduce_sum(device):
    on_device = dist.get_backend() == "nccl"

    def reduce(counter):
        tensor = torch.as_tensor(counter, dtype=torch.int64, device=device if on_device else "cpu")
        dist.all_reduce(tensor)
        return tensor.cpu()
    return reduce


def evaluate(model, loader, *, device, thresholds=TRAIN_THRESHOLDS, protocol="sat", tencrop=False, amp=False,
             img_size=224, distributed=False, save_scoremaps=None, save_images=None, max_images=None,
             progress=True, resize_size=None, threads=None):
    """Metrics (percentages) of ``model`` on ``loader``, whose dataset was built with
    ``eval_transform(protocol, tencrop, img_size, resize_size)`` (e.g. by ``build_eval_loader``).

    protocol 'sat': num_images, top1_cls, top5_cls, gt_known_loc, top1_loc, top5_loc, best_threshold,
    iou30/50/70 (at the best of ``thresholds``) and per-threshold lists. 'wsol': num_images,
    top1_cls, top5_cls (of the 224 view) and, as the data allows, maxboxacc, maxboxaccv2,
    maxboxaccv2_per_iou and their best CAM thresholds (boxes) and pxap (masks). 'both': protocol A's
    keys plus protocol B's (B's classification as wsol_top1_cls / wsol_top5_cls).

    ``distributed``: the loader holds this rank's shard (ShardSampler); counters are summed over the
    ranks so that every rank returns the same metrics, and each rank writes its own images' files.
    ``save_scoremaps``: folder for ``<image_id>.npy`` benchmark score maps (needs protocol B).
    ``save_images``: folder for ``<image_id>.png`` overlays of the images with dataset index below
    ``max_images`` (None: all), on the protocol A centre crop ('wsol': the 224 resize), with the box
    at the first of ``thresholds``. ``threads``: workers of the CPU box-extraction pool.
    """
    n_a, n_b = view_counts(protocol, tencrop)
    if save_scoremaps and not n_b:
        raise ConfigError("saving score maps needs protocol B: use protocol 'wsol' or 'both'")
    if distributed and not isinstance(loader.sampler, ShardSampler):
        raise ValueError("distributed evaluation needs a loader with a ShardSampler (build_eval_loader)")
    device = torch.device(device)
    thresholds = [float(t) for t in thresholds]
    model = getattr(model, "module", model)  # DDP wrapper: no collectives in the forward of uneven shards
    scorer = _BatchScorer(n_a, n_b, thresholds, img_size, resize_size or default_resize_size(img_size),
                          save_scoremaps, save_images, getattr(getattr(loader, "dataset", None), "classes", None))
    total = _Counters(n_a, n_b, thresholds, img_size)
    autocast = _autocast(device, amp)
    rank = dist.get_rank() if distributed else 0
    threads = threads or min(4, os.cpu_count() or 1)
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(threads) as pool, torch.inference_mode():
            pending = deque()
            for batch in _progress(on_device(loader, device), progress and rank == 0):
                images = batch["image"]
                views = images if images.dim() == 5 else images[:, None]  # (B, V, 3, S, S)
                if views.shape[1] != n_a + n_b or views.shape[-1] != img_size:
                    raise ValueError(f"batch views {tuple(views.shape[1:])} do not fit protocol {protocol!r}, "
                                     f"tencrop={tencrop}, img_size={img_size}: build the dataset with "
                                     "eval_transform(protocol, tencrop, img_size)")
                out = _forward(model, views.to(device, non_blocking=True), n_a, autocast)
                crops = _overlay_crops(views, batch, n_a, max_images) if save_images else {}
                annotations = {key: value for key, value in batch.items() if key != "image"}
                pending.append(pool.submit(scorer, annotations, out, crops))
                while len(pending) > 2 * threads or (pending and pending[0].done()):
                    total.merge(pending.popleft().result())
            while pending:
                total.merge(pending.popleft().result())
    finally:
        model.train(was_training)
    if distributed:
        total.reduce(_all_reduce_sum(device))
    return total.metrics(protocol)


def _progress(loader, enabled):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True)
