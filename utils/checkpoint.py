"""Checkpoints: atomic saving, and reading / loading of this project's files and of the official SAT release
(``Model.build_model_from_checkpoint`` rebuilds the model a file holds).

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
    """One line: how many keys differ between the checkpoint and the model, and the first few."""
    own = model.state_dict()
    differ = []
    for key in sorted(set(own) | set(state_dict)):
        if key not in state_dict:
            differ.append(f"{key} missing")
        elif key not in own:
            differ.append(f"{key} unexpected")
        elif own[key].shape != state_dict[key].shape:
            differ.append(f"{key} {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}")
    if not differ:
        return None
    return f"checkpoint {path} does not fit the model ({len(differ)} keys differ, first: {'; '.join(differ[:3])})"


def load_checkpoint(path, model: torch.nn.Module, strict: bool = True) -> Dict[str, Any]:
    """Load the weights of an official SAT release file or of this project's checkpoint into ``model``.

    Returns the metadata (everything but the weights): ``epoch``, ``best_thr`` and, for this project's
    files, ``arch``, ``num_classes``, ``class_names``, optimizer state and so on.
    Raises :class:`CheckpointError` naming the file, the number of differing keys and the first ones.
    """
    return load_state(read_checkpoint(path), path, model, strict)


def load_state(ckpt: Dict[str, Any], path, model: torch.nn.Module, strict: bool = True) -> Dict[str, Any]:
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
