"""torch.hub entry points, one per registered SAT architecture.

    model = torch.hub.load("path/to/this/repo", "deit_sat_small_patch16_224", source="local", num_classes=200)
    model = torch.hub.load("path/to/this/repo", "deit_sat_small_patch16_224", source="local",
                           checkpoint="output/cub/checkpoints/best.pth")

``pretrained`` is what ``Model.build_model`` takes: False (random init), True (DeiT ImageNet-1k weights through
timm) or the path of a local DeiT / timm state dict. ``checkpoint`` loads SAT weights from a local file written
by train.py or released by the official code (official files record neither the architecture nor the number
of classes: the entry point gives the first, the head's shape the second). Other keyword arguments are
constructor options (``num_classes``, ``img_size``, ``num_spatial_blocks``, ``attn_impl``, ...).
"""
from Model import build_model as _build_model
from Model import build_model_from_checkpoint as _build_model_from_checkpoint
from Model import sat as _sat

dependencies = ["torch", "timm"]


def _entry_point(arch):
    def entry_point(pretrained=False, checkpoint=None, **kwargs):
        if checkpoint is not None:
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
