"""Checkpoints: atomic saving, and loading of this project's files and of the official SAT release.

Official release files are legacy ``torch.save`` dicts ``{'model', 'best_thr', 'epoch'}`` whose keys carry
``module.`` and which hold the fixed smoothing kernel as ``weight``. This project's files add what is
needed to rebuild the model (``arch``, ``num_classes``, ``img_size``, ``model_kwargs``, ``class_names``)
and, for resuming, the optimizer / scheduler / scaler / RNG states and the config. ``epoch`` always
counts completed epochs.
"""
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from utils.errors import CheckpointError

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_IGNORED_KEYS = {"weight"}  # official files store the fixed 3x3 smoothing kernel as a model buffer


def save_checkpoint(state: Dict[str, Any], path) -> None:
    """Write ``state`` with ``torch.save`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format_version=FORMAT_VERSION), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path) -> Dict[str, Any]:
    """Load a checkpoint file to CPU and check that it holds a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoint files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a torch.save file): {reason}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}  # a bare state dict
    raise CheckpointError(f"{path} is not a checkpoint: expected a state dict or a dict with a 'model' state dict")


def clean_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip DataParallel/DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _mismatch_report(path, state_dict, model) -> Optional[str]:
    own = model.state_dict()
    lines = []
    for key in sorted(set(own) | set(state_dict)):
        if key not in state_dict:
            lines.append(f"  {key}: missing in checkpoint (model {tuple(own[key].shape)})")
        elif key not in own:
            lines.append(f"  {key}: unexpected in checkpoint {tuple(state_dict[key].shape)}")
        elif own[key].shape != state_dict[key].shape:
            lines.append(f"  {key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}")
    if not lines:
        return None
    return f"checkpoint {path} does not fit the model ({len(lines)} keys differ):\n" + "\n".join(lines)


def load_checkpoint(path, model: torch.nn.Module, strict: bool = True) -> Dict[str, Any]:
    """Load the weights of an official SAT release file or of this project's checkpoint into ``model``.

    Returns the metadata (everything but the weights): ``epoch``, ``best_thr`` and, for this project's
    files, ``arch``, ``num_classes``, ``class_names``, optimizer state and so on.
    Raises :class:`CheckpointError` naming the file and each differing key.
    """
    return _load_weights(read_checkpoint(path), path, model, strict)


def _load_weights(ckpt: Dict[str, Any], path, model: torch.nn.Module, strict: bool = True) -> Dict[str, Any]:
    state_dict = clean_state_dict(ckpt["model"])
    for key in _IGNORED_KEYS & set(state_dict):
        if key not in model.state_dict():
            state_dict.pop(key)
    if strict:
        report = _mismatch_report(path, state_dict, model)
        if report:
            raise CheckpointError(report)
    model.load_state_dict(state_dict, strict=strict)
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    _logger.info("loaded %s (epoch %s)", path, meta.get("epoch"))
    return meta


def model_spec(model, arch: str, class_names=None, **model_kwargs) -> Dict[str, Any]:
    """What a checkpoint records so that evaluators can rebuild ``model`` without flags."""
    return {
        "arch": arch,
        "num_classes": model.num_classes,
        "img_size": int(model.patch_embed.img_size[0]),
        "model_kwargs": dict(model_kwargs),
        "class_names": list(class_names) if class_names is not None else None,
    }


def build_model_from_checkpoint(path, arch: Optional[str] = None, num_classes: Optional[int] = None, **overrides):
    """Rebuild the model a checkpoint was trained with and load its weights; returns ``(model, meta)``.

    ``arch`` / ``num_classes`` are needed only for files that do not record them (official releases);
    ``num_classes`` is then read off the head's shape.
    """
    from Model import build_model  # local import: Model imports utils

    ckpt = read_checkpoint(path)
    arch = arch or ckpt.get("arch")
    if not arch:
        raise CheckpointError(f"checkpoint {path} does not record its architecture: pass --arch")
    state_dict = clean_state_dict(ckpt["model"])
    if num_classes is None:
        num_classes = ckpt.get("num_classes")
    if num_classes is None and "head.weight" in state_dict:
        num_classes = int(state_dict["head.weight"].shape[0])
    kwargs = dict(ckpt.get("model_kwargs") or {})
    if ckpt.get("img_size"):
        kwargs.setdefault("img_size", ckpt["img_size"])
    kwargs.update(overrides)
    model = build_model(arch, num_classes=num_classes, **kwargs)
    return model, _load_weights(ckpt, path, model)
