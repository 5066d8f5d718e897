"""Stop signals. In training, SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption, see
``sbatch --signal``) ask for ``last.pth`` at the next optimizer step and a clean stop; the job then continues
with ``--resume``. In the evaluators and the final test a signal stops at once (StopAtOnce); helper processes
leave signals to their parent."""
import contextlib
import logging
import shlex
import signal
import sys
import threading

import torch

from utils.distributed import all_reduce_max

_logger = logging.getLogger("sat")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
HELD_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)  # the stop signals and Ctrl-C: what helpers and cleanups ignore


class Preempted(BaseException):
    """Training stopped on a signal after saving its state. ``exit_status`` is 128 + the signal number,
    the status of a process that signal ended, so that job scripts do not take the run as finished. A
    BaseException, as KeyboardInterrupt: raised from a signal handler (:class:`StopAtOnce`), it must pass
    through the ``except Exception`` of the code it lands in (a checkpoint reader, a logging handler)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_status = 128 + signum


class StepCheckpoint:
    """Mid-epoch checkpoints and clean stops. Called by the engine after each optimizer step as
    ``on_step`` (bind the 0-based ``epoch`` with functools.partial): every ``save_every_steps`` optimizer
    steps of the run (not at an epoch's last step: the end-of-epoch checkpoint follows) and when a stop
    signal has arrived, ``save(epoch, steps_done, meters)`` writes last.pth with the position in the epoch
    (collective) and returns its path; after a signal, :class:`Preempted` is raised. With several
    processes, agreeing on a signal costs an all-reduce and a host sync, so they look for one every
    ``check_every`` steps (and at each periodic save); one process looks at every step. ``resume``: the command
    that continues the run, for the line of a stop (default: :func:`resume_command` of this process's argv)."""

    def __init__(self, stop, save, *, steps_per_epoch, save_every_steps=None, check_every=1, device="cpu",
                 world_size=1, resume=None):
        self.stop, self.save = stop, save
        self.steps_per_epoch, self.save_every_steps, self.check_every = steps_per_epoch, save_every_steps, check_every
        self.device, self.world_size = device, world_size
        self.resume = resume or resume_command(distributed=world_size > 1)

    def __call__(self, epoch, steps_done, meters):
        step = epoch * self.steps_per_epoch + steps_done  # optimizer steps of the run
        due = bool(self.save_every_steps) and step % self.save_every_steps == 0 and steps_done < self.steps_per_epoch
        look = self.world_size == 1 or due or step % self.check_every == 0
        signum = self.stop.received_by_any(self.device, self.world_size) if look else 0
        if due or signum:
            path = self.save(epoch, steps_done, meters)
        if signum:
            raise Preempted(f"stopped by {signal_name(signum)} at epoch {epoch + 1}, optimizer step {steps_done}/"
                            f"{self.steps_per_epoch}: {path} saved; resume with: {self.resume}", signum)

    def end_of_epoch(self, epoch, path):
        """After the end-of-epoch last.pth: raise :class:`Preempted` if a stop signal arrived (collective)."""
        signum = self.stop.received_by_any(self.device, self.world_size)
        if signum:
            raise Preempted(f"stopped by {signal_name(signum)} after epoch {epoch + 1}: {path} saved; resume "
                            f"with: {self.resume}", signum)


class StopSignals:
    """Context manager: while active, the signals of ``STOP_SIGNALS`` are recorded instead of ending
    the process; :meth:`received_by_any` tells whether to stop."""

    def __init__(self):
        self.received = 0  # the first signal number received by this process, 0 for none
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def received_by_any(self, device="cpu", world_size=1):
        """The stop signal received by this process or, with several processes, by any of them (the
        highest number); 0 for none. A collective call when ``world_size > 1``."""
        if world_size == 1:
            return self.received
        return int(all_reduce_max(torch.tensor([self.received], device=device)).item())


class StopAtOnce(StopSignals):
    """:class:`StopSignals` whose signal raises :class:`Preempted` at once, with the line ``message(signal
    name)``: for work that saves nothing and that ``--resume`` redoes (the final test), so that the job ends at
    once with the command that continues it (a plain SIGTERM ends it without a word). Each process acts on its
    own signal, with no agreement: every process must receive it (SLURM and torchrun send it to all)."""

    active = []  # the instances entered, innermost last (see :func:`work_complete`)

    def __init__(self, message):
        super().__init__()
        self.message = message
        self.complete = False

    def __enter__(self):
        StopAtOnce.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        StopAtOnce.active.remove(self)
        return super().__exit__(*exc)

    def _handle(self, signum, frame):
        if self.complete:  # the work is kept: a signal now would only say, falsely, that nothing was
            self.received = self.received or signum
            return
        raise Preempted(self.message(signal_name(signum)), signum)


def work_complete():
    """Said by a job about to keep its results (e.g. moving its outputs in place): from now on a stop signal
    no longer stops the :class:`StopAtOnce` blocks around it, so that the job ends as finished."""
    for stop in StopAtOnce.active:
        stop.complete = True


@contextlib.contextmanager
def exit_when_stopped(is_main, interrupted):
    """A job's end on :class:`Preempted` (its line) or Ctrl-C (the line ``interrupted()``): logged by the main
    process, then SystemExit with the status of a stopped process (128 + the signal, 130), not a traceback."""
    try:
        yield
    except Preempted as stop:
        if is_main:
            _logger.warning("%s", stop)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:
        if is_main:
            _logger.warning("%s", interrupted())
        raise SystemExit(130) from None


@contextlib.contextmanager
def stopped_as_said(message, is_main=True):
    """For a job that keeps nothing until it ends (an evaluation, predictions, an export): a stop signal raises
    at once, so that its cleanup runs, and the job ends with the line ``message; stopped by SIGTERM`` (Ctrl-C:
    ``message; interrupted``) and the status of a stopped process (:func:`exit_when_stopped`)."""
    with exit_when_stopped(is_main, lambda: f"{message}; interrupted"), \
            StopAtOnce(lambda name: f"{message}; stopped by {name}"):
        yield


def leave_stops_to_the_parent(*_):
    """In a helper process (a loader worker, a box process): SIGTERM, SIGUSR1 and Ctrl-C's SIGINT are ignored.
    SLURM and torchrun send them to the whole process group; a helper they killed made its parent fail with
    "worker killed" (PyTorch raises it wherever the parent is, even while it replaces its outputs) instead of
    stopping as it should. The parent shuts its helpers down; they end by themselves when it dies."""
    for signum in HELD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # (one pending, blocked by signals_deferred, is dropped)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


@contextlib.contextmanager
def signals_held():
    """Stop signals and Ctrl-C ignored while the block runs: a few renames that keep outputs, or the cleanup
    after a stop (a second Ctrl-C, or the launcher's forwarded copy of the first, must not leave half of it)."""
    if threading.current_thread() is not threading.main_thread():  # (only the main thread handles signals)
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred():
    """Stop signals and Ctrl-C received while the block runs are acted on (their handlers called, as if sent
    again) once it ends: for a block that forks helper processes (a loader's first pass starts its workers).
    A handler that raises (KeyboardInterrupt, :class:`StopAtOnce`'s Preempted) would otherwise run in the hooks
    Python calls after a fork, where an exception is printed ("Exception ignored in: ... _releaseLock") and
    dropped: the signal was lost. The signals are also blocked in the children forked here until they leave
    them to their parent (:func:`leave_stops_to_the_parent`): a loader worker is ended by a SIGTERM that arrives
    before that (PyTorch's handler of its own, set first), and by Ctrl-C, and the job failed with "DataLoader
    worker ... killed by signal" instead of stopping as it should."""
    if threading.current_thread() is not threading.main_thread():  # (only the main thread handles signals)
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in HELD_SIGNALS}
    blocked = _block(HELD_SIGNALS)  # (for the children: a signal sent now reaches another thread of this process)
    try:
        yield
    finally:
        _block(HELD_SIGNALS, blocked)  # one pending here is recorded first
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):  # each to the handler restored (the first that raises ends this)
            signal.raise_signal(signum)


def _block(signums, previous=None):
    """Block ``signums`` in this thread (``previous``: restore that mask instead); the mask before."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    if previous is None:
        return signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    return signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals():
    """For a script whose run is complete: a stop signal while the interpreter exits (its garbage collection can
    take seconds) must not end it with the status of a stopped run (143), which job scripts take as a reason to
    requeue it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def resume_command(argv=None, distributed=False, launcher=""):
    """The command line that continues this run: the same arguments with ``--resume`` (from the run's
    last.pth) instead of any ``--resume PATH`` / ``--overwrite``; for several processes, to be started by
    the same launcher (``launcher``: DistInfo.launcher, naming srun when it started them)."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip_value = [], False
    for arg in argv:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = arg == "--resume"
        if arg in ("--resume", "--overwrite") or arg.startswith("--resume="):
            continue
        kept.append(arg)
    command = shlex.join([*kept, "--resume"])
    if not distributed:
        return f"python {command}"
    return f"the same launcher ({'srun' if launcher.startswith('srun') else 'torchrun, srun ...'}) with {command}"


def signal_name(signum):
    return signal.Signals(signum).name
