"""Rebuilding a SAT model from a checkpoint: this project's files record their architecture; official
release files record none, so it is read off the weights' shapes (embed dim, depth, head classes)."""
import logging

import torch

from utils.checkpoint import clean_state_dict, load_state, read_checkpoint
from utils.errors import CheckpointError

from .build import build_model

_logger = logging.getLogger("sat")

# (embed dim, depth) -> architecture: DeiT-Tiny / Small / Base and the CPU demo size.
ARCH_BY_SHAPE = {(192, 12): "deit_sat_tiny_patch16_224", (384, 12): "deit_sat_small_patch16_224",
                 (768, 12): "deit_sat_base_patch16_224", (96, 6): "deit_sat_nano_patch16_224"}
PATCH_SIZE = 16


def weight_shapes(state_dict):
    """(embed dim, depth, classes, input size) of a SAT state dict, from its tensors' shapes."""
    if "pos_embed" not in state_dict or "head.weight" not in state_dict:
        return None
    embed_dim = int(state_dict["pos_embed"].shape[-1])
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    return embed_dim, depth, int(state_dict["head.weight"].shape[0]), grid * PATCH_SIZE


def check_finite_weights(state_dict, path):
    """CheckpointError naming the first tensors holding NaN or Inf."""
    bad = [key for key, value in state_dict.items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN/Inf weights in {len(bad)} tensor(s), first "
                              f"{', '.join(bad[:3])}")


def build_model_from_checkpoint(path, arch=None, num_classes=None, **overrides):
    """Rebuild the model a checkpoint holds and load its weights; returns ``(model, meta)`` (the file's
    metadata, with ``arch`` the architecture built).

    The architecture, classes and input size come from the file (this project's) or its shapes
    (official releases); ``arch`` / ``num_classes`` given for a file that fits another one -> one-line
    CheckpointError naming the one it fits.
    """
    ckpt = read_checkpoint(path)
    state_dict = clean_state_dict(ckpt["model"])
    check_finite_weights(state_dict, path)
    shapes = weight_shapes(state_dict)
    if shapes is None:
        raise CheckpointError(f"checkpoint {path} is not a SAT model (no pos_embed / head.weight)")
    recorded, fitted = ckpt.get("arch"), ARCH_BY_SHAPE.get(shapes[:2])
    if arch and fitted and arch != fitted and "embed_dim" not in overrides:
        raise CheckpointError(f"checkpoint {path} does not fit --arch {arch}: it "
                              f"{'records' if recorded else 'has the shapes of'} {recorded or fitted} "
                              f"(embed dim {shapes[0]}, depth {shapes[1]}); drop --arch")
    if num_classes is not None and num_classes != shapes[2]:
        raise CheckpointError(f"checkpoint {path} has {shapes[2]} classes, not --num-classes {num_classes}; "
                              "drop --num-classes")
    name = recorded or arch or fitted
    if name is None:
        raise CheckpointError(f"checkpoint {path}: embed dim {shapes[0]} and depth {shapes[1]} fit no registered "
                              "SAT architecture; pass --arch (and the model's options)")
    kwargs = dict(ckpt.get("model_kwargs") or {})
    kwargs.setdefault("img_size", ckpt.get("img_size") or shapes[3])
    kwargs.update(overrides)
    model = build_model(name, num_classes=shapes[2], **kwargs)
    if not recorded and not arch:
        _logger.info("checkpoint %s records no architecture: %s from its shapes (embed dim %d, depth %d, "
                     "%d classes)", path, fitted, *shapes[:3])
    return model, {**load_state(ckpt, path, model), "arch": name}
