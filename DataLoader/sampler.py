"""The training sampler: each epoch's order depends only on (seed, epoch), is split over the processes as
DistributedSampler splits it, and can start a number of batches into the epoch, so that a run resumed
mid-epoch sees exactly the samples an uninterrupted run would still see, in the same order."""
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled with ``seed + epoch``; ``num_replicas=1, rank=0`` for one process)
    whose epoch can start at loader batch ``start_batch``: the first ``start_batch * batch_size`` indices
    of this process's share of the epoch are skipped. ``batch_size`` is the loader's (per process).
    ``whole``: this process's share is cut to a multiple of that many images (drop_last with gradient
    accumulation: the images of one optimizer step; None: kept whole)."""

    def __init__(self, dataset, batch_size, *, num_replicas=None, rank=None, seed=0, whole=None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.whole = batch_size, whole
        self.start_batch = 0

    def _share(self):
        """How many of this process's indices the epoch uses."""
        return self.num_samples // self.whole * self.whole if self.whole else self.num_samples

    def set_epoch(self, epoch, start_batch=0):
        """Epoch ``epoch`` (0-based), starting at its loader batch ``start_batch``."""
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_batch * self.batch_size:self._share()])

    def __len__(self):
        return max(0, self._share() - self.start_batch * self.batch_size)
