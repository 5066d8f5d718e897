"""Checkpoints: atomic saving; reading this project's files and the official SAT release and loading their
weights into a model (``Model.build_model_from_checkpoint`` rebuilds the model they hold); the
training state of a run (optimizer, scheduler, scaler, RNG states): writing it (``TrainingCheckpoints``, the
checkpoints a training run writes) and resuming it (``resume_training``).

Official release files are legacy ``torch.save`` dicts ``{'model', 'best_thr', 'epoch'}`` whose keys carry
``module.`` and which hold the fixed smoothing kernel as ``weight``. This project's files add what rebuilds the
model (``arch``, ``num_classes``, ``img_size``, ``model_kwargs``, ``class_names``), the config and
``format_version`` (a file of a newer format than ``FORMAT_VERSION`` is refused); ``last.pth`` also the training
state. ``epoch`` counts completed epochs.
"""
import argparse
import errno
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from utils import distributed as dist_utils
from utils.config import FIELDS, RESUMED_LINE, config_dict, current_keys, resume_file, resumed_run, show_value
from utils.errors import CheckpointError, ConfigError
from utils.outputs import mode_as_opened

_logger = logging.getLogger("sat")

FORMAT_VERSION = 1
_IGNORED_KEYS = {"weight"}  # official files store the fixed 3x3 smoothing kernel as a model buffer


def save_checkpoint(state: Dict[str, Any], path) -> None:
    """Write ``state`` with ``torch.save`` atomically: temp file in the same folder, fsync, rename; a write that
    fails (a full disk) leaves the previous file as it was, removes the temp file and raises a one-line
    CheckpointError. Temp files of this name left by a killed process are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mode_as_opened(fd)  # as torch.save(path) would create it
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format_version=FORMAT_VERSION), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error_in(err)
        if cause is None:
            raise
        reason = "no space left on the device" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
        kept = f"the previous {path.name} is left as it was" if path.exists() else "nothing was written"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from None


def _os_error_in(err):
    """The OSError ``err`` is, or was raised from or while handling (torch's archive writer turns a full disk
    met half way through into a RuntimeError: "unexpected pos ..."); None if there is none."""
    for _ in range(5):
        if err is None or isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def plain_globals():
    """Values many checkpoints hold beside their tensors, which a safe load may rebuild (they run no code of
    the file): numpy scalars and dtypes (e.g. a best threshold saved as np.float64) and argparse.Namespace (the
    training arguments, as DeiT's main.py saves them)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, np.dtype, argparse.Namespace,
            *{type(np.dtype(code)) for code in np.typecodes["All"]}]


ZIP_HEADER = b"PK\x03\x04"  # torch.save's archive; the legacy format is a pickle (first byte 0x80)


def _unreadable(path, err):
    """What ``path`` is, given that torch.load(weights_only=True) failed on it with ``err``; never torch's
    advice to load it with weights_only=False (which runs whatever code an unknown file holds)."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_HEADER))
    text = str(err).strip()
    if not head:
        return "the file is empty"
    refused = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = f" ({refused.group(1).strip().split('. ')[0]})" if refused else ""
    holding = "holding more than tensors, plain containers and numbers"
    if head == ZIP_HEADER and refused and re.search(r"global|Can only build", refused.group(1)):
        return (f"a torch.save archive {holding}{reason}, which the safe load used here does not rebuild: save "
                "its weights alone, e.g. torch.save({'model': state_dict}, path)")
    if head == ZIP_HEADER:
        detail = text.split(". ")[0].removeprefix("PytorchStreamReader failed reading zip archive: ")
        return f"a torch.save archive cut short or damaged, as by an interrupted write or copy ({detail})"
    if head[:1] != b"\x80":
        return "not a torch.save file (neither a zip archive nor a pickle)"
    if "weights_only" in text:
        return f"a pickle that a safe load cannot read: not written by torch.save, or {holding}{reason}"
    return f"a pickle cut short or damaged ({type(err).__name__}{': ' + text.splitlines()[0] if text else ''})"


def _same_setting(old, new):
    """Whether a config value recorded in a checkpoint is the value now: equal, or paths naming the same file
    (``out/run`` now, ``/home/me/out/run`` recorded)."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and os.path.isabs(old) != os.path.isabs(new) and \
        os.path.abspath(old) == os.path.abspath(new)


def require_file(path, what="checkpoint"):
    """``path`` as a Path; a CheckpointError naming ``what`` when it is no file (missing, or a folder)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: " + (f"a folder, not a {what} file" if path.is_dir() else
                                                  "file not found"))
    return path


def read_checkpoint(path, what="checkpoint", mmap=False) -> Dict[str, Any]:
    """Load a checkpoint file to CPU and check that it holds a state dict: ``{'model': ...}`` (this project's
    and the official files), ``{'state_dict': ...}`` (as many PyTorch projects save them; returned under
    'model') or a bare state dict (also as .safetensors). ``what`` names the file in the errors (e.g.
    'pretrained weights'); ``mmap``: tensors stay in the file until read (a look at its metadata)."""
    path = require_file(path, what)
    kind = what if what == "checkpoint" else f"{what} file"
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if path.suffix == ".safetensors":  # e.g. timm's weights from the Hugging Face hub
                from safetensors.torch import load_file  # a dependency of timm
                ckpt = load_file(path, device="cpu")
            else:
                with torch.serialization.safe_globals(plain_globals()):
                    ckpt = torch.load(path, map_location="cpu", weights_only=True,
                                      mmap=mmap and zipfile.is_zipfile(path))  # (not files of torch < 1.6)
    except Exception as err:  # torch raises many types for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable {kind}: {_unreadable(path, err)}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("format_version"), int) and \
            ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this project (checkpoint format "
                              f"{ckpt['format_version']}; this one reads format {FORMAT_VERSION} and older): update "
                              "the code (git pull) to read it")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        meta = {key: value for key, value in ckpt.items() if key != "state_dict"}
        return {**meta, "model": ckpt["state_dict"]}
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}  # a bare state dict
    raise CheckpointError(f"{path} is not a {kind}: expected a state dict or a dict with a 'model' or "
                          f"'state_dict' state dict; {_holds(ckpt)}")


def _holds(obj):
    """What a loaded file that is no checkpoint holds, in a few words (for the refusal's line)."""
    if isinstance(obj, dict) and {"state", "param_groups"} <= set(obj):
        return "it holds an optimizer's state (state, param_groups), not model weights"
    if isinstance(obj, dict) and obj:
        keys = [repr(key) for key in obj]
        return f"it holds a dict of the keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
    return f"it holds {'an empty dict' if isinstance(obj, dict) else 'a ' + type(obj).__name__}"


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


def load_checkpoint(path, model: torch.nn.Module) -> Dict[str, Any]:
    """Load the weights of an official SAT release file or of this project's checkpoint into ``model``.

    Returns the metadata (everything but the weights): ``epoch``, ``best_thr`` and, for this project's
    files, ``arch``, ``num_classes``, ``class_names``, optimizer state and so on.
    Raises :class:`CheckpointError` naming the file, the number of differing keys and the first ones.
    """
    return load_state(read_checkpoint(path), path, model)


def load_state(ckpt: Dict[str, Any], path, model: torch.nn.Module) -> Dict[str, Any]:
    state_dict = clean_state_dict(ckpt["model"])
    for key in _IGNORED_KEYS & set(state_dict):
        if key not in model.state_dict():
            state_dict.pop(key)
    report = _mismatch_report(path, state_dict, model)
    if report:
        raise CheckpointError(report)
    model.load_state_dict(state_dict)
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    _logger.info("loaded %s%s", path, "" if meta.get("epoch") is None else f" (epoch {meta['epoch']})")
    return meta


def check_finite_weights(state_dict, path):
    """CheckpointError naming the first tensors holding NaN or Inf."""
    bad = [key for key, value in state_dict.items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN/Inf weights in {len(bad)} tensor(s), first "
                              f"{', '.join(bad[:3])}")


# -------------------------------------------------------------------------------- training state
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device="cpu"):
    """This process's RNG states (CPU, its GPU, numpy, random) in a form ``torch.load(weights_only=True)``
    accepts."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))


def resume_path(cfg, checkpoint_dir, say=True):
    """The checkpoint to resume from, or None (``--resume`` without a path and no last.pth yet; ``say``: log
    that the run starts from scratch)."""
    path = resume_file(cfg.resume, checkpoint_dir.parent)
    if cfg.resume == "auto" and not path.is_file():
        if say:
            _logger.info("--resume: no %s yet, starting from scratch", path)
        return None
    return path


# what a checkpoint needs to continue a run: last.pth holds them all (best*.pth: no optimizer, scheduler or best)
TRAINING_STATE = ("optimizer", "scheduler", "epoch", "config", "best")


class TrainingCheckpoints:
    """The checkpoints a training run writes into ``checkpoint_dir``: last.pth, the training state that
    :func:`restore` reads back (TRAINING_STATE, the RNG states and the position in the epoch), and at the end of
    each epoch the best*.pth that improved. Each holds ``weights()`` (Model.checkpoint_weights of the model,
    passed in: Model imports this module), ``spec`` (Model.model_spec) and the config. ``best``: the best
    checkpoints' records (utils/selection.py's update_best changes them); ``progress``: its 'saved' and
    'steps_done' say what last.pth holds (the line after an interruption, utils/run_folder.py). The main process
    writes; each save is collective (a failure is raised on every process)."""

    def __init__(self, checkpoint_dir, weights, spec, cfg, info, optimizer, scheduler, loss_scaler, steps_per_epoch,
                 best, progress):
        self.checkpoint_dir, self.path = Path(checkpoint_dir), Path(checkpoint_dir) / "last.pth"
        self.weights, self.spec, self.cfg, self.info = weights, spec, cfg, info
        self.optimizer, self.scheduler, self.loss_scaler = optimizer, scheduler, loss_scaler
        self.steps_per_epoch, self.best, self.progress = steps_per_epoch, best, progress

    def save_position(self, epoch, steps_done, meters):
        """last.pth in the middle of ``epoch``: its optimizer steps done and each process's RNG state and
        running sums, so that --resume continues exactly there (utils/preemption.StepCheckpoint's ``save``).
        Collective."""
        states = dist_utils.all_gather_object((rng_state(self.info.device), meters.state()))
        self._save_last(epoch, steps_done, saved=dict(saved=epoch, steps_done=steps_done),
                        steps_per_epoch=self.steps_per_epoch, rng_states=[rng for rng, _ in states],
                        epoch_meters=[sums for _, sums in states])
        self.progress.update(saved=epoch, steps_done=steps_done)
        return self.path

    def save_trained(self, epoch, stats, rng):
        """last.pth after the training of ``epoch`` when its evaluation failed: the epoch's statistics and each
        process's RNG state ``rng`` from before the evaluation, so that --resume evaluates it as the
        uninterrupted run would have. Collective."""
        return self._save_last(epoch, self.steps_per_epoch, rng_states=dist_utils.all_gather_object(rng),
                               epoch_stats=stats)

    def save_epoch(self, epoch, metrics, improved, metrics_log, record):
        """After ``epoch`` (0-based) and its evaluation ``metrics`` (None when not evaluated): the best*.pth
        that ``improved``, the metrics line ``record``, then last.pth, written last: a run killed before it
        redoes this epoch, and on resume MetricsLog drops the line written here (each epoch logged once).
        Collective."""
        rng_states = dist_utils.all_gather_object(rng_state(self.info.device))

        def write():
            state = self._state(epoch + 1, best_thr=metrics.get("best_threshold") if metrics else None)
            for name in improved:
                save_checkpoint(dict(state, selection=self.best[name]), self.checkpoint_dir / name)
            metrics_log.log_epoch(record)
            self._write_last(state, rng_states=rng_states)
            # said at once: a peer lost in run_on_main's collective after the write leaves this line to say it
            self.progress.update(saved=epoch + 1, steps_done=0)

        dist_utils.run_on_main(self.info.is_main, write)
        self.progress.update(saved=epoch + 1, steps_done=0)

    def _save_last(self, epoch, steps_done, saved=None, **position):
        """last.pth in ``epoch`` after ``steps_done`` of its optimizer steps; ``saved``: what ``progress`` then
        says last.pth holds, updated by the main process as soon as the file is written (before the collective
        that shares its success, which a lost peer breaks). Collective."""
        def write():
            self._write_last(self._state(epoch, steps_done=steps_done), **position)
            self.progress.update(saved or {})

        dist_utils.run_on_main(self.info.is_main, write)
        return self.path

    def _state(self, epoch, best_thr=None, steps_done=None):
        """What every checkpoint of the run holds: the weights after ``epoch`` epochs (and ``steps_done``
        optimizer steps of the next, in last.pth saved within an epoch), the config and the model's spec."""
        return {"model": self.weights(), "epoch": epoch,
                **({} if steps_done is None else {"epoch_step": steps_done}), "config": config_dict(self.cfg),
                **self.spec, "best_thr": best_thr}

    def _write_last(self, state, **position):
        """last.pth: ``state`` with the optimizer, schedule and scaler, the RNG states and the rest of the
        ``position`` in the epoch, and ``best``."""
        save_checkpoint({**state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "scaler": self.loss_scaler.state_dict(), **position, "best": self.best}, self.path)


@dataclass
class Resumed:
    """Where a run starts (a fresh run: the defaults): ``epoch`` epochs done and ``steps_done`` optimizer steps
    of the next; ``meters``: this process's running sums of those steps (None when the number of processes
    changed); ``best``: the best checkpoints' records; ``trained``: the statistics of epoch ``epoch + 1`` when
    last.pth was saved after its training because its evaluation failed (the evaluation runs again);
    ``changed``: (key, value in the checkpoint, value now) of the settings the resumed run changes."""
    epoch: int = 0
    steps_done: int = 0
    meters: Optional[Any] = None
    best: Dict[str, Any] = field(default_factory=dict)
    trained: Optional[Dict[str, Any]] = None
    changed: list = field(default_factory=list)

    def changed_line(self):
        """config.yaml's line on the settings this resume changes (utils/config.RESUMED_LINE); None if none."""
        if not self.changed:
            return None
        steps = f" and {self.steps_done} steps of epoch {self.epoch + 1}" if self.steps_done else ""
        changes = ", ".join(f"{key} {show_value(old)} -> {show_value(new)}" for key, old, new in self.changed)
        return (f"{RESUMED_LINE}after {self.epoch} epoch(s){steps}, trained with the values before: {changes}")


def resume_training(path, cfg, info, model, optimizer, scheduler, loss_scaler, steps_per_epoch, checkpoint_dir):
    """The :class:`Resumed` record of a run resumed from checkpoint ``path`` (None: a fresh start): its weights,
    optimizer, schedule and RNG states restored (:func:`restore`) on every process, its best checkpoints carried
    into ``checkpoint_dir`` when ``path`` is another folder's. Collective."""
    if path is None:
        return Resumed()
    meta = dist_utils.run_everywhere(restore, path, cfg, info, model, optimizer, scheduler, loss_scaler,
                                     steps_per_epoch)
    epoch, steps_done, trained = meta["epoch"], meta.get("epoch_step", 0), meta.get("epoch_stats")
    meters = resumed_meters(meta["epoch_meters"], info) if steps_done and not trained else None
    best = _carry_over(meta["best"], path, checkpoint_dir, epoch, "optimizer" in meta, cfg, info)
    return Resumed(epoch, steps_done, meters, best, trained, meta.get("changed", []))


def resumed_meters(saved, info):
    """This process's running sums of an epoch resumed in its middle: its own when as many processes saved them;
    else the main process takes all of them, so that the epoch's totals (summed over the processes) still count
    the steps done before the stop."""
    if len(saved) == info.world_size:
        return saved[info.rank]
    return {name: sum(sums[name] for sums in saved) for name in saved[0]} if info.is_main else None


def restore(path, cfg, info, model, optimizer, scheduler, loss_scaler, steps_per_epoch):
    """Load a checkpoint of this run into the training state; returns its metadata. From last.pth: all of it
    (weights, optimizer, schedule, RNG states, position in the epoch); from a best*.pth written by training:
    its weights and epoch and the schedule at that epoch, with fresh optimizer moments (it holds no optimizer
    state). A file that does not load: one line naming the newest checkpoint of its folder that does."""
    path = Path(path)
    warn = _logger.warning if info.is_main else (lambda *args: None)  # the same on every process: said once
    ckpt = _read_resumable(path, cfg)
    saved_steps = ckpt.get("steps_per_epoch")  # of a last.pth saved in the middle of an epoch
    if ckpt.get("epoch_step") and "epoch_stats" not in ckpt and saved_steps not in (None, steps_per_epoch):
        raise ConfigError(f"--resume {path}: saved after {ckpt['epoch_step']} of the {saved_steps} optimizer steps of "
                          f"epoch {ckpt['epoch'] + 1}, which now has {steps_per_epoch} (the training split, drop_last "
                          "or accum_steps differ): the rest of the epoch would repeat or leave out images; resume "
                          "with the run's data and settings (--resume without --config reads its config.yaml)")
    meta = load_state(ckpt, path, model)
    # this run's lr and weight decay (a flag may change them): the checkpoint's optimizer and schedule hold the old
    fresh_groups = [{"weight_decay": group["weight_decay"], "initial_lr": group["initial_lr"]}
                    for group in optimizer.param_groups]
    if all(key in meta for key in TRAINING_STATE):
        try:
            optimizer.load_state_dict(meta["optimizer"])
        except ValueError as err:  # parameter groups of another split than this run's optimizer
            raise CheckpointError(f"--resume {path}: its optimizer state does not fit this run's optimizer ({err}): "
                                  f"start a new run from its weights with --pretrained {path} in a new "
                                  "--output-dir") from None
        scheduler.load_state_dict(meta["scheduler"])
        loss_scaler.load_state_dict(meta.get("scaler"))
        apply_settings(optimizer, scheduler, fresh_groups)
    else:  # a best*.pth (_read_resumable refused other files)
        warn("resume from %s: its weights after epoch %d; it holds no optimizer state: AdamW's moments "
             "start again from zero", path, meta["epoch"])
        set_schedule(optimizer, scheduler, meta["epoch"] * steps_per_epoch)
        meta["best"] = best_of_run(path.parent, meta["epoch"])
    if _legacy_best(meta.get("best")):
        warn("resume: %s was written by an older version (one best record, no best_top1_loc.pth / "
             "best_gt_known_loc.pth): this run's evaluations select its best checkpoints again", path)
        meta["best"] = {}
    recorded, meta["changed"] = current_keys(meta["config"]), []
    for key, value in config_dict(cfg).items():
        if key not in recorded:
            if key in LEGACY_VALUES and value != LEGACY_VALUES[key]:
                warn("resume: %s is not in the checkpoint's config (a key added since; the version that wrote it "
                     "ran as %s), now %s", key, show_value(LEGACY_VALUES[key]), show_value(value))
            elif key not in LEGACY_VALUES and value != FIELDS[key].default:
                warn("resume: %s is not in the checkpoint's config (a key added since), now %s", key,
                     show_value(value))
        elif not _same_setting(recorded[key], value) and not (key == "output_dir" and  # the run goes on in its folder
                                                              resumed_run(path) == Path(value).resolve()):
            warn("resume: %s was %s in the checkpoint, now %s%s", key, show_value(recorded[key]), show_value(value),
                 _change_note(key, recorded[key], value))
            meta["changed"].append((key, recorded[key], value))
    states = meta.get("rng_states") or []
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
    else:
        if states:
            warn("resume: %d processes now, %d saved RNG states: re-seeding", info.world_size,
                 len(states))
        seed_everything(cfg.seed + info.rank + 1000 * meta["epoch"])
    steps_done = meta.get("epoch_step", 0)
    if "epoch_stats" in meta:
        where = f", and the training of epoch {meta['epoch'] + 1}, whose evaluation runs again"
    else:
        where = f", and {steps_done} optimizer steps of epoch {meta['epoch'] + 1}" if steps_done else ""
        if steps_done and len(meta["epoch_meters"]) != info.world_size:
            warn("resume: %d processes now, %d when saved in the middle of an epoch: the rest of epoch "
                 "%d is split differently (some samples may repeat or be left out)", info.world_size,
                 len(meta["epoch_meters"]), meta["epoch"] + 1)
    if meta["epoch"] >= cfg.epochs and not steps_done and "epoch_stats" not in meta:  # nothing left to train
        _logger.info("resumed from %s: %d epochs done, --epochs %d: no epoch left to train, the final test runs",
                     path, meta["epoch"], cfg.epochs)
    else:
        _logger.info("resumed from %s: %d of %d epochs done%s", path, meta["epoch"], cfg.epochs, where)
    return meta


def check_resumable(cfg, checkpoint_dir):
    """The checks of :func:`restore` that need neither data nor model, made before the run opens its log and
    reads its data: a --resume file that does not load, that is not a training checkpoint, of another model or
    batch size, or of more epochs than --epochs, is refused in one line with nothing written (it was refused once
    ImageNet had been listed)."""
    path = resume_path(cfg, checkpoint_dir, say=False)  # (said once the log is open)
    if path is not None:
        _read_resumable(path, cfg, mmap=True)


def _read_resumable(path, cfg, mmap=False):
    """The checkpoint ``path`` read for a resume with ``cfg``: one line when it does not load (naming the newest
    of its folder that does), when it is not a checkpoint of this project's training (last.pth or a best*.pth),
    when ``cfg`` changes what a resumed run keeps (:func:`check_unchanged`), or when it has more epochs done than
    ``cfg.epochs``."""
    try:
        ckpt = read_checkpoint(path, mmap=mmap)
    except CheckpointError as err:
        if not path.is_file():
            raise
        raise CheckpointError(f"--resume: {err}; {_instead(path)}") from None
    if not all(key in ckpt for key in TRAINING_STATE) and not {"epoch", "config", "selection"} <= set(ckpt):
        missing = [key for key in TRAINING_STATE if key not in ckpt]  # neither last.pth nor a best*.pth
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no {', '.join(missing)}); "
                              "to start from its weights use --pretrained PATH")
    if isinstance(ckpt.get("config"), dict) and "arch" in ckpt:  # a checkpoint of this project's training
        check_unchanged(ckpt["config"], cfg, path, optimizer_state="optimizer" in ckpt)
    if isinstance(ckpt.get("epoch"), int) and ckpt["epoch"] > cfg.epochs:  # before config.yaml says otherwise
        raise ConfigError(f"--resume {path}: {ckpt['epoch']} epochs done, more than --epochs {cfg.epochs}: a run is "
                          f"not shortened once trained; --epochs {ckpt['epoch']} runs its final test again, "
                          f"--overwrite (or a new --output-dir) trains {cfg.epochs} epoch(s) anew")
    return ckpt


def _legacy_best(best):
    """Whether ``best`` is the record of the versions before the three best checkpoints: {'epoch', 'score',
    'threshold'} of best.pth alone, not {file name: selection record}."""
    return isinstance(best, dict) and "score" in best and not any(str(key).endswith(".pth") for key in best)


# keys that make the parameter groups an optimizer's state is of: kept on resume from a file holding one
OPTIMIZER_KEYS = ("trainable", "decay_tokens")
# the value a key had in the versions that wrote checkpoints before the key existed (their config lacks it)
LEGACY_VALUES = {"decay_tokens": False,  # the tokens and position embeddings were not decayed
                 "drop_last": True}  # the training loader dropped the last, partial batch
# keys a run keeps when resumed: the model's shape and meaning, and the global batch (the schedule counts its
# optimizer steps; last.pth's position in an epoch is one of them); and OPTIMIZER_KEYS (not from a best*.pth)
FIXED_ON_RESUME = ("arch", "img_size", "num_spatial_blocks", "batch_size", "images_per_class") + OPTIMIZER_KEYS


def _change_note(key, old, new):
    """What a resumed run's changed setting does beyond itself: ``workers`` from or to 0 changes how the random
    crops and flips are drawn (loader workers: from (seed, epoch, image); 0: the main process's RNG), so the run
    no longer equals the uninterrupted one (docs/training.md, preemption)."""
    if key == "workers" and isinstance(old, int) and isinstance(new, int) and (old == 0) != (new == 0):
        return ("; the random crops and flips are drawn differently with --workers 0 than with workers, so the "
                "resumed run will differ from the uninterrupted one (resume with --workers %s to continue it exactly)"
                % ("0" if old == 0 else "1 or more"))
    return ""


def check_unchanged(saved, cfg, path, optimizer_state=True):
    """ConfigError when ``cfg`` changes a key of FIXED_ON_RESUME that the checkpoint's config ``saved`` records
    (and the seed of a few-shot subset, which picks its images), before its weights are loaded (another arch
    said as such, not as keys that differ); ``optimizer_state``: whether the file holds one to restore."""
    fixed = [key for key in FIXED_ON_RESUME if optimizer_state or key not in OPTIMIZER_KEYS]
    unrecorded = {key: value for key, value in LEGACY_VALUES.items()  # the value of the version that wrote it
                  if key in fixed and key not in saved and hasattr(cfg, key)}
    saved = {**unrecorded, **saved}
    changed = [key for key in fixed if key in saved and saved[key] != getattr(cfg, key)]
    if saved.get("images_per_class") and "seed" in saved and saved["seed"] != cfg.seed:
        changed.append("seed")
    if changed:
        reasons = {"the model": {"arch", "img_size", "num_spatial_blocks"},
                   "the schedule counts steps of that batch": {"batch_size"},
                   "the epochs are steps over that few-shot subset": {"images_per_class", "seed"},
                   "the optimizer's state is of those parameter groups": set(OPTIMIZER_KEYS)}
        why = "; ".join(reason for reason, keys in reasons.items() if keys & set(changed))
        values = ", ".join(f"{key} {show_value(saved[key])} (now {show_value(getattr(cfg, key))}" +
                           (f"; not in its config: the version that wrote it had no such key, give "
                            f"--{'' if saved[key] else 'no-'}{key.replace('_', '-')})" if key in unrecorded else ")")
                           for key in changed)
        raise ConfigError(f"--resume {path}: the run was trained with {values}, which a resumed run keeps ({why}): "
                          "resume with those values (--resume without --config reads the run's own config.yaml), or "
                          f"start a new run from its weights (all but the classifier head, which starts anew) with "
                          f"--pretrained {path} in a new --output-dir")


def apply_settings(optimizer, scheduler, groups):
    """Put this run's weight decay and base learning rate (``groups``: each parameter group's, as the optimizer
    was built with them) into a restored optimizer and schedule, at the step the schedule restored: a resumed
    run with another --lr or --weight-decay uses them from its first step (the same numbers when unchanged)."""
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update(fresh)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # as LambdaLR takes them
    set_schedule(optimizer, scheduler, scheduler.last_epoch)


def set_schedule(optimizer, scheduler, steps):
    """Put a LambdaLR schedule (and the optimizer's learning rates) where ``steps`` optimizer steps leave it."""
    lrs = [base * factor(steps) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": steps, "_step_count": steps + 1,
                               "_last_lr": lrs})
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def best_of_run(checkpoint_dir, epoch):
    """The ``best`` record of the best*.pth files in ``checkpoint_dir`` saved up to ``epoch`` (each file's
    ``selection``), for a run resumed from one of them."""
    best = {}
    for path in sorted(Path(checkpoint_dir).glob("best*.pth")):
        try:
            meta = read_checkpoint(path)
        except CheckpointError:
            continue
        if isinstance(meta.get("selection"), dict) and meta.get("epoch", epoch + 1) <= epoch:
            best[path.name] = meta["selection"]
    return best


def carry_best(best, source_dir, checkpoint_dir, copy=True):
    """The best checkpoints of a run resumed from another folder (``source_dir``) into ``checkpoint_dir``:
    each file of ``best`` ({name: selection record}) that ``checkpoint_dir`` lacks is copied from ``source_dir``
    when the file there is the one recorded (the final test reads best.pth in the run's own folder). Returns
    (``best`` without the files found nowhere, so that this run's evaluations select them again, the names
    copied, the names dropped); with ``copy`` false, only what a copy would return."""
    source_dir, checkpoint_dir = Path(source_dir), Path(checkpoint_dir)
    kept, copied, dropped = {}, [], []
    for name, record in best.items():
        target, source = checkpoint_dir / name, source_dir / name
        if target.is_file():
            kept[name] = record
            continue
        try:
            found = read_checkpoint(source).get("selection") if source.is_file() else None
        except CheckpointError:
            found = None
        if found != record:
            dropped.append(name)
            continue
        if copy:
            copy_checkpoint(source, target)
        kept[name] = record
        copied.append(name)
    return kept, copied, dropped


def _carry_over(best, path, checkpoint_dir, epochs_done, full_state, cfg, info):
    """The ``best`` record a resumed run continues with. Resumed from another folder's checkpoint ``path``, the
    run moves into ``checkpoint_dir``: its best checkpoints are copied there (those not found are selected again
    by this run's evaluations, with a warning), and ``path`` as last.pth when it holds the training state
    (``full_state``), so that a plain --resume continues the run there. A run with no epoch left to train and no
    best.pth is refused (one line): its final test would have nothing to test. Collective."""
    def carry():
        carried, _, _ = carry_best(best, Path(path).parent, checkpoint_dir, copy=False)
        if "best.pth" not in carried and epochs_done >= cfg.epochs:  # refused before anything is copied
            raise ConfigError(f"--resume {path}: {epochs_done} epochs done and --epochs {cfg.epochs}, so none is "
                              f"left to train, and {checkpoint_dir} has no best.pth for the final test: raise "
                              f"--epochs above {epochs_done}")
        carried, copied, dropped = carry_best(best, Path(path).parent, checkpoint_dir)
        last = checkpoint_dir / "last.pth"
        if full_state and not last.exists():
            copy_checkpoint(path, last)
            copied.append(f"{Path(path).name} (as last.pth)")
        if copied:
            _logger.info("--resume: copied %s from %s into %s", ", ".join(copied), Path(path).parent, checkpoint_dir)
        if dropped:
            _logger.warning("--resume: %s not found beside %s: this run's evaluations select %s again",
                            ", ".join(f"{name} (epoch {best[name]['epoch']})" for name in dropped), path,
                            "it" if len(dropped) == 1 else "them")
        return carried

    return dist_utils.all_gather_object(dist_utils.run_on_main(info.is_main, carry))[0]


def copy_checkpoint(source, target):
    """Copy checkpoint ``source`` to ``target`` atomically (a temp file renamed); a one-line CheckpointError
    when it cannot be written."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.copy.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not copy {source} to {target}: {err.strerror or err}") from None


def _instead(path):
    """What to resume from when ``path`` does not load: the newest checkpoint of its folder that does and
    that training wrote (at the same epoch: one with the optimizer state, else best.pth), or starting again."""
    found = []
    for other in Path(path).parent.glob("*.pth"):
        try:
            meta = read_checkpoint(other) if other != path else {}
        except CheckpointError:
            continue
        if "epoch" in meta and "config" in meta:
            found.append((meta["epoch"], "optimizer" in meta, other.name == "best.pth", other))
    if not found:
        return (f"no other checkpoint in {Path(path).parent} loads: start again (the command without --resume, "
                "with --overwrite if --output-dir holds a run)")
    epoch, full, _, newest = max(found)
    state = "" if full else ", its weights only: it holds no optimizer state, whose moments start again"
    return f"the newest checkpoint in {newest.parent} that loads is {newest} (epoch {epoch}{state}): continue " \
           f"from it with --resume {newest}"
