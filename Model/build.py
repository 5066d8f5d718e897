"""Building a SAT model by architecture name (timm registry)."""
import timm

from utils.errors import CheckpointError, ConfigError

from . import sat  # noqa: F401  (registers the architectures)
from .sat import SATVisionTransformer


def list_archs():
    """Names of the registered SAT architectures."""
    return sorted(timm.list_models("deit_sat_*"))


def build_model(arch: str, num_classes: int = 1000, pretrained=False, **overrides) -> SATVisionTransformer:
    """Build a SAT model by name.

    ``pretrained``: False (random init), True (the matching DeiT ImageNet-1k weights through timm's
    pretrained mechanism) or the path of a local DeiT / timm / SAT state dict. ``overrides`` are
    constructor arguments (``img_size``, ``num_spatial_blocks``, ``drop_path_rate``, ``attn_impl``...).
    """
    if arch not in list_archs():
        raise ConfigError(f"unknown arch {arch!r}; known: {', '.join(list_archs())}")
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **overrides)
    except OSError as err:  # hub / network / cache errors of the pretrained download
        if pretrained is not True:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"could not get the DeiT weights of {arch} from the timm hub ({reason}); download "
                              "them once with network access, or pass a local file (--pretrained PATH) or "
                              "--pretrained false") from None
