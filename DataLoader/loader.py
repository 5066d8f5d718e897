"""Batching: the collate function, the loader that spreads each batch over the workers, and its factory."""
import hashlib
import logging
import multiprocessing.util
import os
import random
import traceback
import warnings
import weakref

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from utils.distributed import cpu_share
from utils.host_memory import keep_freed_memory
from utils.preemption import leave_stops_to_the_parent, signals_deferred

from .background import Background
from .dataset import Skipped
from .gpu_decode import PER_IMAGE, pack
from .sampler import ResumableSampler

MIN_PART = 4  # images per worker task, at least: smaller slices cost more in overhead than they save
PREFETCH_BATCHES = 4  # slices each worker loads ahead: with one slice of each batch per worker, 4 batches
READY_BATCHES = 2  # joined batches waiting for the caller


_WITH_WORKERS = weakref.WeakSet()  # the loaders with workers, for _shut_down_at_exit
_EXIT_HOOK_PID = None  # the process that registered _shut_down_at_exit (a forked child registers its own)


def _shut_down_at_exit():
    """At a process's exit, the persistent workers of its loaders still alive (one referenced by an uncaught
    error's traceback, or by a module's globals) shut down as a pass left early shuts them down. multiprocessing's
    exit then ends its daemonic children with SIGTERM, which the workers ignore (``init_worker``), and waits for
    them: without this the process never ends."""
    for loader in list(_WITH_WORKERS):
        if loader.owner == os.getpid():  # (a forked child's copy: the workers are its parent's)
            try:
                loader.shutdown()
            except Exception:  # the next loaders' workers still go
                logging.getLogger("sat").debug("shutting down loader workers at exit failed", exc_info=True)


def _shut_down_when_done(loader):
    """Track ``loader`` for _shut_down_at_exit, registered once per process as a multiprocessing finalizer: those
    run first in multiprocessing's exit (an atexit hook in the main process; in a child process started by
    multiprocessing, its own last step, where atexit hooks come too late or never)."""
    global _EXIT_HOOK_PID
    _WITH_WORKERS.add(loader)
    if _EXIT_HOOK_PID != os.getpid():
        multiprocessing.util.Finalize(None, _shut_down_at_exit, exitpriority=100)
        _EXIT_HOOK_PID = os.getpid()


# PyTorch's own note on more workers than CPUs is a multi-line warning on every loader: check_loading says it once
warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


def check_loading(workers, gpu_decode, device):
    """A warning for each loading setting slower than it need be here, said once by a script's main process:
    ``workers`` (per process) above this process's share of the CPUs (they then share them), ``gpu_decode`` on
    a device that is not CUDA (decoded in the main process, one image after another)."""
    logger, share = logging.getLogger("sat"), cpu_share()
    if workers > share:
        logger.warning("--workers %d: this process has %d CPU(s) (those it may run on, over the machine's "
                       "processes), which the workers share; %d or fewer may load faster", workers, share, share)
    if gpu_decode and torch.device(device).type != "cuda":
        logger.warning("--gpu-decode on %s: the JPEGs are decoded in the main process, one after another (nvJPEG "
                       "needs CUDA); the default, PIL in the workers, is faster here", device)


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
    """Seed numpy and random in each worker from torch's per-worker seed, and leave stop signals to the main
    process (utils/preemption.py). (Each worker runs one torch thread, set by the DataLoader, and one OpenCV
    thread, inherited: utils/cv.py.) Its freed host memory is kept (utils/host_memory.py: inherited when forked;
    set here where workers start as fresh interpreters, forkserver or spawn)."""
    leave_stops_to_the_parent()
    keep_freed_memory()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def merge_batches(parts, pin_memory=False):
    """Collated parts of one batch -> the batch ``collate_samples`` would give for all their samples: tensors
    concatenated (into pinned memory when ``pin_memory``, ready for a ``non_blocking`` copy), lists
    joined, values common to every sample (crop sizes) kept once, skipped samples counted over all parts."""
    kept = [part for part in parts if len(part["label"])]
    batch = {"num_skipped": sum(part["num_skipped"] for part in parts),
             "skipped": [message for part in parts for message in part["skipped"]]}
    if not kept:
        return {**parts[0], **batch}
    for key in kept[0]:
        if key not in batch:
            batch[key] = _merge([part[key] for part in kept], pin_memory)
    return batch


def _merge(values, pin_memory):
    first = values[0]
    if isinstance(first, dict):
        return {key: _merge([value[key] for value in values], pin_memory) for key in first}
    if isinstance(first, list):
        return [item for value in values for item in value]
    if not torch.is_tensor(first):
        return first
    if not pin_memory:
        return torch.cat(values)
    out = torch.empty((sum(len(value) for value in values), *first.shape[1:]), dtype=first.dtype, pin_memory=True)
    return torch.cat(values, out=out)


def split_batch(indices, parts):
    """A batch's indices -> ``parts`` consecutive slices of nearly equal length (fewer for a short batch)."""
    parts = min(parts, len(indices))
    return [indices[len(indices) * k // parts:len(indices) * (k + 1) // parts] for k in range(parts)]


class _Slices(Sampler):
    """The keys the workers are given, a list per slice of each batch of ``batch_sampler``: ``(index, epoch)``
    (``epoch``: the sampler's, read at the start of each pass). Made as the loader asks for them, so that a
    pass starts without first going through all its indices."""

    def __init__(self, batch_sampler, parts):
        self.batch_sampler, self.parts = batch_sampler, parts

    def parts_per_batch(self):
        """How many slices each batch of a pass has (``split_batch`` of batches of the sampler's length)."""
        size, sampler = self.batch_sampler.batch_size, self.batch_sampler.sampler
        full, rest = divmod(len(sampler), size)
        lengths = [size] * full + ([rest] if rest and not self.batch_sampler.drop_last else [])
        return [min(self.parts, length) for length in lengths]

    def __iter__(self):
        epoch = getattr(self.batch_sampler.sampler, "epoch", 0)
        for indices in self.batch_sampler:
            for part in split_batch(indices, self.parts):
                yield [(index, epoch) for index in part]

    def __len__(self):
        return sum(self.parts_per_batch())


def sample_seed(seed, epoch, index):
    """The seed of sample ``index``'s random draws in ``epoch``: a function of these three alone."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest(), "little") >> 1


class _SeededSamples(Dataset):
    """``dataset`` read by ``(index, epoch)`` keys: torch's CPU RNG is seeded with ``sample_seed(seed, epoch,
    index)`` before each sample, so that a sample's random crop does not depend on which worker reads it, nor
    on what that worker read before."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        # the CPU generator the crops draw from (torch.manual_seed, which also queues CUDA seeding: 100x slower)
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


class BatchLoader:
    """The batches of a DataLoader of the same ``sampler`` and ``batch_size``, each split into ``parts`` slices
    loaded by all workers at once and joined by a thread of the main process (into pinned memory with CUDA)
    while the caller computes: a worker loading a whole batch leaves every pass's start waiting for it.
    With workers each sample's crop and flip are seeded by ``sample_seed(seed, epoch, index)``: the same for
    any number of workers, slices or processes, and after a mid-epoch resume. Without workers the caller's
    thread reads the samples in order with its RNG. The workers' base seed comes from a generator of its own,
    so that loading draws nothing from torch's global RNG. ``pin_memory``: join the batches into pinned memory,
    for a CUDA device (None: wherever CUDA is available; a run on the CPU of a GPU machine passes False and
    touches no CUDA)."""

    def __init__(self, dataset, batch_size, sampler=None, *, workers, drop_last=False, seed=0, parts=None,
                 pin_memory=None):
        self.dataset, self.sampler = dataset, sampler
        self.batch_sampler = BatchSampler(SequentialSampler(dataset) if sampler is None else sampler, batch_size,
                                          drop_last)
        parts = min(workers, batch_size // MIN_PART) if parts is None else parts
        self.parts = max(1, parts) if workers else 1
        self.reads_in_caller = not workers  # samples read (crops drawn from torch's RNG) as the caller iterates
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slices = _Slices(self.batch_sampler, self.parts) if workers else None
        self._joiner = None
        self.loader = DataLoader(_SeededSamples(dataset, seed) if workers else dataset,
                                 batch_sampler=self.batch_sampler if self._slices is None else self._slices,
                                 num_workers=workers, collate_fn=collate_samples,
                                 pin_memory=self.pin_memory and self.parts == 1,
                                 persistent_workers=workers > 0, worker_init_fn=init_worker,
                                 generator=torch.Generator().manual_seed(seed),
                                 prefetch_factor=PREFETCH_BATCHES if self.parts > 1 else None)
        self.owner = os.getpid()
        if workers:
            _shut_down_when_done(self)

    def shutdown(self):
        """Shut the persistent workers down (they start again with the next pass)."""
        if self._joiner is not None:
            self._joiner.stopping.set()  # (not joined: its thread may be waiting for a worker)
            self._joiner = None
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        if self._joiner is not None:  # a pass left early whose generator is still referenced
            self._joiner.stop()
        try:
            yield from self._batches()
        except Exception as err:
            # torch re-raises a worker's error from a frame that holds it: a reference cycle through the pass's
            # iterator, left to the garbage collector, which closes the iterator's queues before shutting its
            # workers down and so waits 5 s for each of them. The finished frames' locals are not needed.
            traceback.clear_frames(err.__traceback__)
            raise

    def _batches(self):
        with signals_deferred():  # the first pass forks the workers (utils/preemption.py)
            loaded = iter(self.loader)
        if self.parts == 1:
            return loaded
        device = torch.cuda.current_device() if self.pin_memory else None  # one per DDP process
        self._joiner = Background(_joined(loaded, self._slices.parts_per_batch(), self.pin_memory),
                                  READY_BATCHES, _join_thread_setup(device), name="sat-batch-joiner")
        return self._joiner


def _joined(loaded, parts_per_batch, pin_memory):
    """Each batch from the parts the DataLoader iterator ``loaded`` receives from the workers."""
    for num_parts in parts_per_batch:
        yield merge_batches([next(loaded) for _ in range(num_parts)], pin_memory)


def _join_thread_setup(device):
    def setup():
        torch.set_num_threads(1)  # for this thread's copies (a per-thread setting), as in the DataLoader's pin thread
        if device is not None:  # pinned memory is allocated in the context of the thread's device: the caller's
            torch.cuda.set_device(device)
    return setup


def build_loader(dataset, batch_size, *, train, workers, distributed=False, seed=0, drop_last=None, parts=None,
                 pin_memory=None, accum_steps=1):
    """BatchLoader over ``dataset``. ``train``: shuffled by a ResumableSampler (this process's share when
    ``distributed``; call ``loader.sampler.set_epoch(epoch[, start_batch])`` each epoch) and by default
    dropping the last partial batch (with ``accum_steps`` batches per optimizer step, the last partial step's).
    Otherwise in order, in this process (sharded evaluation loaders: DataLoader/eval_loader.py).
    ``pin_memory``: BatchLoader's."""
    drop_last = train if drop_last is None else drop_last
    sampler = None
    if train:  # one process: the same order as DistributedSampler's with one replica
        sampler = ResumableSampler(dataset, batch_size, num_replicas=None if distributed else 1,
                                   rank=None if distributed else 0, seed=seed,
                                   whole=batch_size * accum_steps if drop_last else None)
    return BatchLoader(dataset, batch_size, sampler, workers=workers, drop_last=drop_last, seed=seed, parts=parts,
                       pin_memory=pin_memory)
