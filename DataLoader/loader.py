"""Batching: the collate function and the DataLoader factory."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .dataset import Skipped
from .gpu_decode import PER_IMAGE, pack
from .sampler import ResumableSampler


def collate_samples(samples):
    """Stack 'image' (a tensor, or each tensor of a dict of them; the files' bytes of ``gpu_decode``
    concatenated, see ``gpu_decode.pack``) and 'label' (LongTensor), keep other keys as lists, drop
    Skipped (and None) samples.

    ``batch['num_skipped']`` counts the dropped (unreadable) samples and ``batch['skipped']`` lists the
    Skipped messages; a batch where every sample was dropped has empty 'image' and 'label' tensors.
    """
    kept = [sample for sample in samples if isinstance(sample, dict)]
    skipped = [sample.message for sample in samples if isinstance(sample, Skipped)]
    batch = {"num_skipped": len(samples) - len(kept), "skipped": skipped}
    if not kept:
        return {**batch, "image": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}
    for key in kept[0]:
        values = [sample[key] for sample in kept]
        if key == "image" and isinstance(values[0], dict):  # uint8 pixels and crops (device_transforms)
            values = {k: [v[k] for v in values] if k in PER_IMAGE else torch.stack([v[k] for v in values])
                      if torch.is_tensor(v0) else v0 for k, v0 in values[0].items()}
            if "encoded" in values:  # --gpu-decode: the files' bytes
                values.update(pack(values["encoded"]))
        elif key == "image":
            values = torch.stack(values)
        elif key == "label":
            values = torch.tensor(values, dtype=torch.long)
        batch[key] = values
    return batch


def init_worker(worker_id):
    """Seed numpy and random in each worker from torch's per-worker seed. (Each worker runs one torch
    thread, set by the DataLoader, and one OpenCV thread, inherited: utils/cv.py.)"""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset, batch_size, *, train, workers, distributed=False, seed=0, drop_last=None):
    """DataLoader over ``dataset`` with collate_samples. ``train``: shuffled by a ResumableSampler (this
    process's share when ``distributed``; call ``loader.sampler.set_epoch(epoch[, start_batch])`` each
    epoch) and by default dropping the last partial batch. Evaluation: in order, through a
    DistributedSampler when ``distributed`` (it pads the split to a multiple of the world size). Pinned
    memory with CUDA, persistent workers when workers > 0."""
    drop_last = train if drop_last is None else drop_last
    if train:  # one process: the same order as DistributedSampler's with one replica
        sampler = ResumableSampler(dataset, batch_size, num_replicas=None if distributed else 1,
                                   rank=None if distributed else 0, seed=seed)
    else:
        sampler = DistributedSampler(dataset, shuffle=False, seed=seed) if distributed else None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=workers, collate_fn=collate_samples, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=workers > 0, worker_init_fn=init_worker,
                      generator=generator)
