"""torch.hub entry points, one per registered SAT architecture.

    model = torch.hub.load("path/to/this/repo", "deit_sat_small_patch16_224", source="local", num_classes=200)
    model = torch.hub.load("path/to/this/repo", "deit_sat_small_patch16_224", source="local",
                           checkpoint="output/cub/checkpoints/best.pth")

``pretrained`` is what ``Model.build_model`` takes: False (random init), True (DeiT ImageNet-1k weights through
timm) or the path of a local DeiT / timm state dict. ``checkpoint`` loads SAT weights from a local file written
by train.py or released by the official code (official files record neither the architecture nor the number
of classes: the entry point gives the first, the head's shape the second). Other keyword arguments are
constructor options (``num_classes``, ``img_size``, ``num_spatial_blocks``, ``attn_impl``, ...).

The repository's top-level packages are ``Model``, ``utils`` and ``DataLoader``: a module of one of those names
already imported from elsewhere (e.g. your project's ``utils``) is refused in one line, and once loaded these
names are SAT's in ``sys.modules`` (a later ``import utils`` gets SAT's).
"""
import os as _os
import sys as _sys

_REPO = _os.path.dirname(_os.path.realpath(__file__))


def _check_no_foreign_modules():
    """ImportError naming the module and its folder when Model, utils or DataLoader is already imported from outside
    this repository (importing ours would then fail on it or mix the two)."""
    for name in ("Model", "utils", "DataLoader"):
        module = _sys.modules.get(name)
        if module is None:
            continue
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if where is None or not _os.path.realpath(where).startswith(_REPO + _os.sep):
            raise ImportError(f"torch.hub: a module named {name!r} is already imported from {where or 'elsewhere'}, "
                              f"not from {_REPO}; SAT's hubconf.py needs its own top-level {name!r} package: load "
                              "SAT in a process that has not imported a module of that name (or rename yours)")


_check_no_foreign_modules()

from Model import build_model as _build_model  # noqa: E402
from Model import build_model_from_checkpoint as _build_model_from_checkpoint  # noqa: E402
from Model import sat as _sat  # noqa: E402
from utils.errors import ConfigError as _ConfigError  # noqa: E402

dependencies = ["torch", "timm"]


def _entry_point(arch):
    def entry_point(pretrained=False, checkpoint=None, **kwargs):
        if checkpoint is not None:
            if pretrained is not False and pretrained is not None:  # None: no weights, as build_model reads it
                raise _ConfigError(f"{arch}: pretrained={pretrained!r} and checkpoint= both given; a checkpoint "
                                   "holds all the weights: pass one of the two")
            return _build_model_from_checkpoint(checkpoint, arch=arch, spelling="hub", **kwargs)[0]
        return _build_model(arch, pretrained=pretrained, spelling="hub", **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = arch
    entry_point.__doc__ = (f"{getattr(_sat, arch).__doc__}\n\nArguments: pretrained=False | True | DeiT weights file, "
                           "checkpoint=None | SAT checkpoint file, constructor options (num_classes, img_size, ...).")
    return entry_point


deit_sat_tiny_patch16_224 = _entry_point("deit_sat_tiny_patch16_224")
deit_sat_small_patch16_224 = _entry_point("deit_sat_small_patch16_224")
deit_sat_base_patch16_224 = _entry_point("deit_sat_base_patch16_224")
deit_sat_nano_patch16_224 = _entry_point("deit_sat_nano_patch16_224")
