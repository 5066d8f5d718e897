"""Building a SAT model: by architecture name (timm registry), or from a checkpoint (this project's or an
official release, its architecture read off the weights' shapes); the weights a checkpoint stores, and what it
records to rebuild the model (``model_spec``)."""
import logging
import math
import numbers
import os
import socket
from urllib.parse import urlparse

import timm
from timm.layers import to_2tuple

from DataLoader.eval_views import default_resize_size
from utils.checkpoint import check_finite_weights, clean_state_dict, load_state, read_checkpoint, require_file
from utils.errors import CheckpointError, ConfigError, first_line

from .losses import gaussian_kernel_3x3
from .sat import ARCH_ARGS, SATVisionTransformer  # importing sat registers the architectures

_logger = logging.getLogger("sat")


def list_archs():
    """Names of the registered SAT architectures."""
    return sorted(timm.list_models("deit_sat_*"))


def build_model(arch: str, num_classes: int = 1000, pretrained=False, *, spelling="flags",
                **overrides) -> SATVisionTransformer:
    """Build a SAT model by name.

    ``pretrained``: False (random init), True (the matching DeiT ImageNet-1k weights through timm's
    pretrained mechanism) or the path of a local DeiT / timm / SAT state dict. ``overrides`` are
    constructor arguments (``img_size``, ``num_spatial_blocks``, ``drop_path_rate``, ``attn_impl``...).
    ``spelling``: how errors name the options (SPELLINGS: the scripts' flags or torch.hub's arguments).
    """
    check_pretrained(arch, pretrained, spelling)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"{SPELLINGS[spelling]['num_classes'].format(repr(num_classes))}: the number of classes "
                          "must be a positive integer")
    if "img_size" in overrides:
        check_img_size(overrides["img_size"], overrides.get("patch_size", PATCH_SIZE), spelling)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **overrides)
    except OSError as err:  # hub / network / cache errors of the pretrained download
        if pretrained is not True:
            raise
        raise _hub_error(arch, err, spelling) from None


def check_pretrained(arch, pretrained=True, spelling="flags"):
    """A ConfigError for an unknown ``arch`` or one without DeiT weights, a CheckpointError for a ``pretrained``
    path that is no file, and with ``pretrained`` True a CheckpointError at once when the timm hub cannot serve
    them (training calls this before reading its data, so that an offline node or a mistyped path is said in
    seconds, not after the data scan)."""
    words = SPELLINGS[spelling]
    if arch not in list_archs():
        raise ConfigError(f"unknown arch {arch!r}; known: {', '.join(list_archs())}")
    if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
        try:  # a mistyped path (or a word such as 'none'): said before the data, with what the option takes
            require_file(os.fsdecode(pretrained), "pretrained weights")
        except CheckpointError as err:
            raise CheckpointError(f"{err} (expected a weights file, or {words['no_weights']} for random "
                                  f"initialisation)") from None
    if pretrained is not True:
        return
    if not timm.models.get_pretrained_cfg(arch).hf_hub_id:
        raise ConfigError(f"{arch} has no DeiT weights to start from: {words['no_weights']} (random "
                          f"initialisation) or {words['weights_file']} (a weights file)")
    try:
        _check_hub_reachable(arch)
    except OSError as err:
        raise _hub_error(arch, err, spelling) from None


def _hub_error(arch, err, spelling):
    words = SPELLINGS[spelling]
    return CheckpointError(f"could not get the DeiT weights of {arch} from the timm hub ({first_line(err)}); download "
                           f"them once with network access, or pass a local file ({words['weights_file']}) or "
                           f"{words['no_weights']}")


def checkpoint_weights(model):
    """The state dict saved in checkpoints: the official model class's parameter names and shapes,
    including its fixed smoothing kernel ``weight``, so that the official ``SAT`` loads it strictly."""
    return {**model.state_dict(), "weight": gaussian_kernel_3x3()}


def model_spec(model, arch: str, class_names=None, **model_kwargs) -> dict:
    """What a checkpoint records so that evaluators can rebuild ``model`` without flags: the model's own
    ``num_spatial_blocks`` and the width, depth, heads and MLP ratio where they are not ``arch``'s (read off the
    model, so that a model built with other options rebuilds as it was), and ``model_kwargs`` given."""
    return {
        "arch": arch,
        "num_classes": model.num_classes,
        "img_size": int(model.patch_embed.img_size[0]),
        "model_kwargs": {**_structure_kwargs(model, arch), **model_kwargs},
        "class_names": list(class_names) if class_names is not None else None,
    }


def _structure_kwargs(model, arch):
    """The constructor options that shape ``model`` (num_spatial_blocks always; embed_dim, depth, num_heads,
    mlp_ratio, patch_size where they differ from ``arch``'s; img_size as (height, width) where not square), read
    off the model."""
    kwargs = {}
    if hasattr(model, "num_spatial_blocks"):
        kwargs["num_spatial_blocks"] = int(model.num_spatial_blocks)
    blocks = getattr(model, "blocks", None)
    if arch not in ARCH_ARGS or not blocks:
        return kwargs
    actual = {"embed_dim": int(model.embed_dim), "depth": len(blocks), "num_heads": int(blocks[0].attn.num_heads),
              "mlp_ratio": blocks[0].mlp.fc1.out_features / model.embed_dim}
    defaults = {"mlp_ratio": 4.0, **ARCH_ARGS[arch]}
    kwargs.update({key: value for key, value in actual.items() if value != defaults[key]})
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:  # the checkpoint's img_size is one side: a non-square input and the patch size
        if int(patch_embed.patch_size[0]) != defaults["patch_size"]:
            kwargs["patch_size"] = int(patch_embed.patch_size[0])
        if patch_embed.img_size[0] != patch_embed.img_size[1]:
            kwargs["img_size"] = [int(side) for side in patch_embed.img_size]
    return kwargs


# -------------------------------------------------------------------------------- from a checkpoint
# (embed dim, depth) -> architecture: DeiT-Tiny / Small / Base and the CPU demo size.
ARCH_BY_SHAPE = {(args["embed_dim"], args["depth"]): name for name, args in ARCH_ARGS.items()}
PATCH_SIZE = 16


def check_img_size(img_size, patch_size=16, spelling="flags"):
    """ConfigError unless the input size (an int or a pair) is a positive multiple of the patch size: the patch
    embedding drops the pixels past the last whole patch, so the map would not cover the whole input."""
    for size in to_2tuple(img_size):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < patch_size \
                or size % patch_size:
            raise ConfigError(f"{SPELLINGS[spelling]['img_size'].format(repr(img_size))}: the input size must be a "
                              f"positive integer multiple of the patch size {patch_size} (the localization map "
                              "covers whole patches)")


def weight_shapes(state_dict):
    """(embed dim, depth, classes, input size) of a SAT state dict, from its tensors' shapes."""
    if "pos_embed" not in state_dict or "head.weight" not in state_dict:
        return None
    embed_dim = int(state_dict["pos_embed"].shape[-1])
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    return embed_dim, depth, int(state_dict["head.weight"].shape[0]), grid * PATCH_SIZE


# How a caller gives the architecture and the number of classes, for the lines that say a checkpoint contradicts
# them: the scripts' flags, or torch.hub's entry point (hubconf.py) and keyword argument.
SPELLINGS = {
    "flags": {"arch": "--arch {}", "num_classes": "--num-classes {}", "fix_arch": "drop --arch",
              "fix_classes": "drop --num-classes", "no_weights": "--pretrained false",
              "weights_file": "--pretrained PATH", "img_size": "--img-size {}", "fix_img_size": "drop --img-size"},
    "hub": {"arch": "the entry point {}", "num_classes": "num_classes={}",
            "fix_arch": "load it with torch.hub's entry point {}", "fix_classes": "leave out num_classes=",
            "no_weights": "pretrained=False", "weights_file": "pretrained='PATH'", "img_size": "img_size={}",
            "fix_img_size": "leave out img_size="},
}
# How to build a model of other widths or depths: its options, which only Python and torch.hub take
OTHER_SHAPES = {"flags": "the scripts build the registered ones only; load it with torch.hub (an entry point, "
                         "checkpoint=PATH and the options, e.g. embed_dim=...) or in Python",
                "hub": "pass the model's options (embed_dim=..., depth=..., num_heads=...)"}


def build_model_from_checkpoint(path, arch=None, num_classes=None, *, spelling="flags", **overrides):
    """Rebuild the model a checkpoint holds and load its weights; returns ``(model, meta)`` (the file's
    metadata, with ``arch`` the architecture built).

    The architecture, classes and input size come from the file (this project's) or its shapes
    (official releases); ``arch`` / ``num_classes`` given for a file that fits another one -> one-line
    CheckpointError naming the one it fits, with the options spelt as the caller gives them (``spelling``:
    a key of SPELLINGS).
    """
    words = SPELLINGS[spelling]
    ckpt = read_checkpoint(path)
    state_dict = clean_state_dict(ckpt["model"])
    check_finite_weights(state_dict, path)
    shapes = weight_shapes(state_dict)
    if shapes is None:
        raise CheckpointError(f"checkpoint {path} is not a SAT model (no pos_embed / head.weight)")
    if "loc_token" not in state_dict and state_dict["head.weight"].dim() == 2:  # a ViT's linear head, no SAT token
        raise CheckpointError(f"checkpoint {path} holds a plain ViT / DeiT's weights (a linear head, no spatial "
                              f"token loc_token), not SAT's; to start SAT from them: "
                              f"{'train.py ' if spelling == 'flags' else ''}{words['weights_file']}")
    recorded, fitted = ckpt.get("arch"), ARCH_BY_SHAPE.get(shapes[:2])
    if arch and fitted and arch != fitted and "embed_dim" not in overrides:
        raise CheckpointError(f"checkpoint {path} does not fit {words['arch'].format(arch)}: it "
                              f"{'records' if recorded else 'has the shapes of'} {recorded or fitted} "
                              f"(embed dim {shapes[0]}, depth {shapes[1]}); "
                              f"{words['fix_arch'].format(recorded or fitted)}")
    if num_classes is not None and num_classes != shapes[2]:
        raise CheckpointError(f"checkpoint {path} has {shapes[2]} classes, not "
                              f"{words['num_classes'].format(num_classes)}; {words['fix_classes']}")
    name = recorded or arch or fitted
    if arch and not recorded and not fitted and arch in ARCH_ARGS:
        built = {**ARCH_ARGS[arch], **overrides}
        if (built["embed_dim"], built["depth"]) != shapes[:2]:  # else: "153 keys differ" from the loader
            raise CheckpointError(f"checkpoint {path}: embed dim {shapes[0]} and depth {shapes[1]} fit no registered "
                                  f"SAT architecture, not {words['arch'].format(arch)} (embed dim "
                                  f"{built['embed_dim']}, depth {built['depth']}); {OTHER_SHAPES[spelling]}")
    if name is None:
        raise CheckpointError(f"checkpoint {path}: embed dim {shapes[0]} and depth {shapes[1]} fit no registered "
                              f"SAT architecture; {OTHER_SHAPES[spelling]}")
    kwargs = dict(ckpt.get("model_kwargs") or {})
    if "num_spatial_blocks" in kwargs and overrides.get("num_spatial_blocks", kwargs["num_spatial_blocks"]) != \
            kwargs["num_spatial_blocks"]:  # no tensor tells them apart: other blocks would compute its maps
        raise CheckpointError(f"checkpoint {path} was trained with num_spatial_blocks="
                              f"{kwargs['num_spatial_blocks']}, not num_spatial_blocks="
                              f"{overrides['num_spatial_blocks']!r}; leave out num_spatial_blocks=")
    if "img_size" in overrides:  # its patch grid must be the checkpoint's (else: "1 keys differ, first: pos_embed")
        patch = overrides.get("patch_size", kwargs.get("patch_size", PATCH_SIZE))
        check_img_size(overrides["img_size"], patch, spelling)
        height, width = to_2tuple(overrides["img_size"])
        positions = int(state_dict["pos_embed"].shape[1]) - 1
        side = math.isqrt(positions)
        if (height // patch) * (width // patch) != positions:
            given = words['img_size'].format(overrides['img_size'])
            if side * side == positions:
                raise CheckpointError(f"checkpoint {path} takes {side * patch} x {side * patch} inputs, not {given}; "
                                      f"{words['fix_img_size']}")
            raise CheckpointError(f"checkpoint {path} takes inputs of {positions} patches of {patch} pixels (not a "
                                  f"square), not {given}; give {words['img_size'].format('(height, width)')} as built")
    kwargs.setdefault("img_size", ckpt.get("img_size") or shapes[3])
    kwargs.update(overrides)
    model = build_model(name, num_classes=shapes[2], **kwargs)
    if not recorded and not arch:
        _logger.info("checkpoint %s records no architecture: %s from its shapes (embed dim %d, depth %d, "
                     "%d classes)", path, fitted, *shapes[:3])
    meta = load_state(ckpt, path, model)
    model.pretrained_cfg = {**model.pretrained_cfg, **_data_config(model, meta, shapes[2])}
    if hasattr(model, "default_cfg"):  # timm's alias of pretrained_cfg (it still said DeiT's 224 px, bicubic)
        model.default_cfg = model.pretrained_cfg
    return model, {**meta, "arch": name}


def _data_config(model, meta, num_classes):
    """pretrained_cfg keys of a checkpoint's model (torch.hub returns the model alone): its class names, and for
    a square input the official test view, Resize((R, R)) bilinear then CenterCrop(S) (R: the checkpoint's
    resize_size, else 256/224 of S), as timm's crop_mode 'squash', so that timm.data.resolve_data_config +
    create_transform give it (DeiT's cfg said 224 px, bicubic, a shorter-side resize)."""
    names = meta.get("class_names")
    out = {"num_classes": num_classes, "label_names": tuple(names) if names else None}
    height, width = (int(side) for side in model.patch_embed.img_size)
    if height != width:  # no official view of a non-square input: its size (DeiT's cfg said 224 x 224)
        return {**out, "input_size": (3, height, width), "fixed_input_size": True}
    resize = (meta.get("config") or {}).get("resize_size") or default_resize_size(height)
    crop_pct = height / resize
    if math.floor(height / crop_pct) != resize:  # (rounding: timm takes floor(S / crop_pct) as R)
        crop_pct = math.nextafter(crop_pct, 0)
    return {**out, "input_size": (3, height, width), "crop_pct": crop_pct, "crop_mode": "squash",
            "interpolation": "bilinear", "fixed_input_size": True}


def square_img_size(model, path) -> int:
    """The input side of a checkpoint's model for the scripts, whose views are square crops; a model built with a
    (height, width) input (in Python or torch.hub) -> one-line CheckpointError."""
    height, width = (int(side) for side in model.patch_embed.img_size)
    if height != width:
        raise CheckpointError(f"checkpoint {path} takes {height} x {width} inputs (height x width); the evaluators "
                              "and tools/predict.py take square crops only: use the model in Python "
                              "(docs/evaluation.md) or tools/export_onnx.py")
    return height


HUB_PROBE_TIMEOUT = 5.0  # seconds


def _check_hub_reachable(arch):
    """Raise OSError at once when the hub cannot serve ``arch``'s DeiT weights: not in the local cache, no
    proxy, no offline mode, and no TCP connection to the hub within HUB_PROBE_TIMEOUT (without network,
    the download's own retries take about a minute to fail). Otherwise leave it to timm."""
    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    if not repo:
        return
    try:  # an optional dependency of timm: only the hub's weights need it
        import huggingface_hub
    except ImportError:
        raise OSError("huggingface_hub is not installed: pip install huggingface_hub") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
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
