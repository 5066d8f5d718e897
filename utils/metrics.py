"""What both localization protocols share: counters summable across batches and processes, and
classification accuracy (Top-1 / Top-5, as the official ``utils/accuracy.py``'s ``accuracy``)."""
import numpy as np
import torch

from utils.box_ops import as_numpy


class CounterState:
    """Accumulator base: integer counter arrays named in ``COUNTERS``, summable across processes.

    ``state()`` / ``merge(state)`` combine accumulators; ``reduce(fn)`` replaces every counter by
    ``fn(counter)``, e.g. a DDP all-reduce (sum) of the array.
    """

    COUNTERS = ()

    def state(self):
        return {name: getattr(self, name).copy() for name in self.COUNTERS}

    def merge(self, state):
        for name in self.COUNTERS:
            getattr(self, name)[...] += as_numpy(state[name], np.int64)
        return self

    def reduce(self, fn):
        for name in self.COUNTERS:
            counter = getattr(self, name)
            counter[...] = as_numpy(fn(counter), np.int64).reshape(counter.shape)
        return self

    def _check_nonempty(self):
        if int(self.num_images) == 0:
            raise ValueError(f"{type(self).__name__}.compute(): no images were accumulated")


def topk_correct(scores, labels, ks=(1, 5)):
    """Per image, whether the label is among the top-k scores, for each k -> list of bool (B,)."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels).reshape(-1, 1)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1, largest=True, sorted=True).indices
    hits = (top == labels).cpu().numpy()
    return [hits[:, :k].any(axis=1) for k in ks]


class ClassAccumulator(CounterState):
    """Top-1 / top-5 classification hits (the wsolevaluation protocol reports those of its own view;
    ``cls`` those of the official view)."""

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
