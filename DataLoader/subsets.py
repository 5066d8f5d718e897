"""Few-shot subsets: N images per class, chosen reproducibly from a seed."""
import numpy as np

from utils.errors import ConfigError


def few_shot(items, images_per_class, seed=0):
    """The items of ``images_per_class`` images per class (all of a smaller class), in dataset order.

    The choice depends only on the item list and ``seed`` (not on workers or processes).
    """
    if images_per_class < 1:
        raise ConfigError(f"images per class must be at least 1, got {images_per_class}")
    by_class = {}
    for position, item in enumerate(items):
        by_class.setdefault(item.label, []).append(position)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_class):
        positions = by_class[label]
        chosen += [positions[i] for i in rng.permutation(len(positions))[:images_per_class]]
    return [items[position] for position in sorted(chosen)]
