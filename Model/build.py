"""Building a SAT model by architecture name (timm registry)."""
import os
import socket
from urllib.parse import urlparse

import huggingface_hub
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
        if pretrained is True:
            _check_hub_reachable(arch)
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **overrides)
    except OSError as err:  # hub / network / cache errors of the pretrained download
        if pretrained is not True:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"could not get the DeiT weights of {arch} from the timm hub ({reason}); download "
                              "them once with network access, or pass a local file (--pretrained PATH) or "
                              "--pretrained false") from None


HUB_PROBE_TIMEOUT = 5.0  # seconds


def _check_hub_reachable(arch):
    """Raise OSError at once when the hub cannot serve ``arch``'s DeiT weights: not in the local cache, no
    proxy, no offline mode, and no TCP connection to the hub within HUB_PROBE_TIMEOUT (without network,
    the download's own retries take about a minute to fail). Otherwise leave it to timm."""
    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    if not repo or huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, name), str)
           for name in ("model.safetensors", "pytorch_model.bin")):
        return
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT):
        pass
