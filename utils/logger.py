"""Run logging on rank 0: console + ``<output-dir>/log.txt``, one JSON line per epoch in
``<output-dir>/metrics.jsonl`` and TensorBoard events in ``<output-dir>/tensorboard``.
Other ranks log their warnings and errors to the console and, marked ``[rank N]``, to log.txt: the error of
one process that stops a multi-process job is there too."""
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from utils.errors import SATError, output_error, user_message, writing_outputs
from utils.outputs import finite_or_none, write_text_atomic

FORMAT = "%(asctime)s %(levelname)s %(message)s"
# ``extra=`` of a record for log.txt alone (a long table that would scroll the console's summary away)
LOG_FILE_ONLY = {"log_file_only": True}


# a progress bar whose stderr is no terminal (a SLURM job's file, a pipe) writes a line this often, the first after
# as long: a minute-long loop shows nothing there, an ImageNet epoch one line a minute instead of one per batch
FILE_BAR_SECONDS = 60


class _BarLines:
    """The stream of a progress bar written to a file: each redraw as a line of its own, not carriage returns
    that pile every update of a run onto one line (and the bar's clearing, spaces, as nothing)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def redrawn_in_place(stream):
    """Whether ``stream`` shows a carriage return as a redraw: a terminal, or a Jupyter notebook's output (whose
    stream says it is no terminal)."""
    return getattr(stream, "isatty", lambda: False)() or any(cls.__module__.startswith("ipykernel.")
                                                             for cls in type(stream).__mro__)


def progress_bar(iterable=None, **kwargs):
    """``tqdm`` on stderr, redrawn in place at the terminal's width, cleared when done (the log line that follows
    says it); where stderr is a file or a pipe, a plain (ASCII) line every ``FILE_BAR_SECONDS``."""
    kwargs = {"dynamic_ncols": True, "leave": False, **kwargs}
    if not redrawn_in_place(sys.stderr):
        kwargs.update(file=_BarLines(sys.stderr), ascii=True, mininterval=FILE_BAR_SECONDS,
                      maxinterval=FILE_BAR_SECONDS, delay=max(kwargs.get("delay", 0), FILE_BAR_SECONDS))
    return tqdm(iterable, **kwargs)


# The root logger's level before setup_logging set it, given back by close_logging (None: not set by us).
_level_before = None


def close_logging():
    """Remove and close the handlers added by :func:`setup_logging` (others are left alone) and give the root
    logger back the level it had before (a run from Python code, or a test, leaves the process's logging as it
    found it)."""
    global _level_before
    for handler in _run_handlers():
        logging.getLogger().removeHandler(handler)
        handler.close()
    if _level_before is not None:
        logging.getLogger().setLevel(_level_before)
        _level_before = None


def log_error(err):
    """Write an error into log.txt, where the run has one: a SATError's one line (utils.errors.user_message;
    an echo of another process's is written by that one), any other exception with its traceback. The terminal
    gets it from run_cli (or Python)."""
    if getattr(err, "echo", False):
        return
    if isinstance(err, SATError):
        record = logging.LogRecord("sat", logging.ERROR, __file__, 0, "error: %s", (user_message(err),), None)
    else:
        record = logging.LogRecord("sat", logging.ERROR, __file__, 0, "error: %s: %s", (type(err).__name__, err),
                                   (type(err), err, err.__traceback__))
    for handler in _run_handlers():
        if isinstance(handler, RunLogFile):
            handler.handle(record)


def _run_handlers():
    return [handler for handler in logging.getLogger().handlers if getattr(handler, "_sat_run", False)]


class RunLogFile(logging.FileHandler):
    """``log.txt``. A line that cannot be written (a full disk) is left out of it without a traceback on the
    terminal, which shows every line already."""

    def handleError(self, record):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)

    def close(self):
        """Close the file; lines still buffered that cannot be written (the disk is full) are left out: closing
        raised their OSError, whose traceback replaced the job's own one-line error."""
        try:
            super().close()
        except OSError:
            pass


class PendingLog(logging.Handler):
    """The records meant for log.txt while it may not be written yet (``setup_logging(log_file=False)``):
    :func:`open_log_file` writes them there; a run that stops before that leaves no trace in the folder."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(output_dir, is_main=True, rank=0, log_file=True):
    """Configure the root logger for this process and return the 'sat' logger; replaces the handlers
    of an earlier call (several runs in one process, e.g. tests). ``log_file=False``: the main process's
    log.txt is opened later, by :func:`open_log_file` (the folder still holds a previous run's log)."""
    global _level_before
    close_logging()
    root = logging.getLogger()
    _level_before = root.level
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(FORMAT if is_main else f"[rank {rank}] {FORMAT}", "%H:%M:%S"))
    console.addFilter(lambda record: not getattr(record, "log_file_only", False))
    _add(console)
    if is_main:
        if log_file:
            open_log_file(output_dir)
        else:
            _add(PendingLog())
    elif log_file:  # (not while the main process may still replace a previous run's log)
        open_log_file(output_dir, f"[rank {rank}] {FORMAT}")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    return logging.getLogger("sat")


def open_log_file(output_dir, line_format=FORMAT):
    """Start writing ``<output_dir>/log.txt`` (appending), first with the records kept until now."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    handler = RunLogFile(Path(output_dir) / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter(line_format))
    for pending in [h for h in _run_handlers() if isinstance(h, PendingLog)]:
        logging.getLogger().removeHandler(pending)
        for record in pending.records:
            handler.handle(record)
    _add(handler)


UNKNOWN_COMMIT = "commit unknown (not a git checkout, or git not available)"


def code_version(root=Path(__file__).resolve().parents[1]):
    """The git commit of the code at ``root`` ('git 1a2b3c4d5e6f', '+ uncommitted changes' when tracked files
    differ from it), or UNKNOWN_COMMIT (a copy without .git, no git, or git refusing the folder)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return UNKNOWN_COMMIT
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN_COMMIT
    return f"git {head.stdout.strip()}{' + uncommitted changes' if changed else ''}"


def log_environment(device):
    """Into log.txt alone: the command, the code's commit, the versions of Python and of the packages the
    numbers depend on, and the device: what a result needs to be reproduced or compared (config.yaml holds the
    settings, not where they ran). Nothing on the processes that log no INFO (all but the first): no git runs."""
    log = logging.getLogger("sat")
    if not log.isEnabledFor(logging.INFO):
        return
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    from utils.cv import cv2

    log.info("command: %s", shlex.join([Path(sys.executable).name, *sys.argv]), extra=LOG_FILE_ONLY)
    hardware = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN " \
        f"{torch.backends.cudnn.version()}" if getattr(device, "type", device) == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    log.info("environment: code %s; Python %s, torch %s, torchvision %s, timm %s, numpy %s, Pillow %s, OpenCV %s; "
             "%s", code_version(), platform.python_version(), torch.__version__, torchvision.__version__,
             timm.__version__, numpy.__version__, PIL.__version__, cv2.__version__, hardware, extra=LOG_FILE_ONLY)


def _add(handler):
    handler._sat_run = True
    logging.getLogger().addHandler(handler)


def quiet_event_writer_errors():
    """Let TensorBoard's writer thread fail quietly on an OSError (a full disk): it keeps the error for the job's
    thread, which raises it again (MetricsLog: one line), then re-raises it, and Python printed its traceback too
    (``Exception in thread Thread-1``, some 30 lines) below the job's one-line error. Other threads' errors are
    printed as before. Returns the hook it replaced (None: in place already), which MetricsLog.close puts back."""
    previous = threading.excepthook
    if getattr(previous, "_sat_quiet_events", False):
        return None

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook._sat_quiet_events = True
    threading.excepthook = hook
    return previous


class MetricsLog:
    """``metrics.jsonl`` (one object per epoch, key ``epoch`` = completed epochs) and TensorBoard.

    ``start_epoch``: the number of epochs already done (a resumed run); lines of later epochs, left by
    a run killed after logging but before its checkpoint, are dropped so that each epoch appears once.
    """

    def __init__(self, output_dir, start_epoch=0, tensorboard=True):
        self.path = Path(output_dir) / "metrics.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and record.get("epoch", math.inf) <= start_epoch:
                    kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))  # (rewritten in place, a full disk or a kill lost the lines)
        self.writer = self.hook_before = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only

            self.events = Path(output_dir) / "tensorboard"
            self.hook_before = quiet_event_writer_errors()
            try:
                with writing_outputs(self.events):  # (writes its first event: a full disk's error names no file)
                    self.writer = SummaryWriter(str(self.events), purge_step=start_epoch + 1)
            except BaseException:
                self.close(quiet=True)
                raise

    def log_epoch(self, record):
        """Append ``record`` (must hold 'epoch'); scalars also go to TensorBoard at step = epoch."""
        record = {key: finite_or_none(value) for key, value in record.items()}
        with writing_outputs(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            with writing_outputs(self.events):  # (the writer thread's error, raised here, names no file)
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(key.replace(".", "/"), value, record["epoch"])
                self.writer.flush()

    def close(self, quiet=False):
        """Close TensorBoard's writer. An event its thread could not write (a full disk, a folder removed) is
        raised again here: a warning line, or nothing with ``quiet`` (the job stops on that error already; its
        traceback from the job's ``finally`` replaced the one-line error)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError as err:
                if not quiet:
                    logging.getLogger("sat").warning("TensorBoard: %s", output_error(err))
        if self.hook_before is not None:  # (the writer thread is done: the process's hook as it was)
            threading.excepthook, self.hook_before = self.hook_before, None
