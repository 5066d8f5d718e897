"""User-facing errors: one line that names the file/field and what was expected.

Entry scripts wrap ``main`` with :func:`run_cli`; any :class:`SATError` is then printed as an ``error: ...``
line on stderr (a list of mismatches adds one line per item) and the process exits with status 2, without
a traceback.
"""
import contextlib
import errno
import os
import re
import sys
import traceback


class SATError(Exception):
    """Base class of errors caused by user input (files, flags, configs). ``echo``: raised by a process that
    only received it from the one that met it (several processes stop on one's error), which prints it alone."""

    echo = False


def echoed(err: SATError) -> SATError:
    """``err`` marked as another process's error (see ``SATError.echo``)."""
    err.echo = True
    return err


def restated(err: SATError, message: str) -> SATError:
    """An error of ``err``'s type saying ``message`` (``err`` with what to do next), an echo where ``err`` was."""
    new = type(err)(message)
    new.echo = err.echo
    return new


class DataError(SATError):
    """A dataset file, annotation or image is missing or malformed."""


class CheckpointError(SATError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class ConfigError(SATError):
    """A config file or command-line option is invalid."""


class OutputError(SATError):
    """An output file cannot be written (a full disk, a folder without write permission)."""


def first_line(err):
    """The first line of an error's text (its type without one), at most 200 characters: what a one-line error
    keeps of a backend's multi-line message."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 200 else line[:200].rsplit(" ", 1)[0] + " ..."


def output_error(err: OSError, path=None) -> OutputError:
    """The one-line OutputError of an OSError met while writing an output: the file (the error's, else
    ``path``: a full disk's error names none) and the reason."""
    reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    if err.errno is None and " requested and " in reason:  # numpy's short write ("50176 requested and 6112 written")
        reason += " (a short write: the disk or quota is probably full)"
    where = err.filename or path
    if isinstance(where, bytes):  # (TensorBoard's writer names its file in bytes)
        where = os.fsdecode(where)
    return OutputError(f"could not write {where}: {reason}" if where else f"could not write: {reason}")


@contextlib.contextmanager
def writing_outputs(path=None):
    """Context manager: an OSError raised while writing outputs (``path``, when the error names no file)
    becomes its one-line :func:`output_error`."""
    try:
        yield
    except OSError as err:
        raise output_error(err, path) from None


def out_of_memory(err) -> bool:
    """Whether ``err`` is a failed allocation: torch's OutOfMemoryError (a GPU's memory) or the CPU allocator's
    refusal (a RuntimeError)."""
    import torch  # (loaded by every script already)

    return isinstance(err, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(err)


# torch's words for a DataLoader worker that ended without raising (killed by a signal, or crashed)
_WORKER_ENDED = re.compile(r"DataLoader worker \(pid(?:\(s\))? [^)]*\) (?:is killed by signal|exited unexpectedly)")


def resources_message(err, memory_advice="a smaller batch needs less: see --help"):
    """The one line for an error of the machine's limits, else None; each printed a traceback and no cause. Out of
    memory: torch's first line (what was asked for, what is free; from a DataLoader worker its own line, not
    'Caught RuntimeError in DataLoader worker process 0.') and ``memory_advice``. A data loading worker that ended
    without raising (killed: most often by the kernel's out-of-memory killer; another signal or exit status:
    torch's words alone), seen by torch or by the main process receiving a batch the worker had put in shared
    memory."""
    if out_of_memory(err):
        return f"out of memory (torch: {first_line(user_message(err) or err)}; {memory_advice})"
    ended = isinstance(err, RuntimeError) and _WORKER_ENDED.search(str(err))
    # a batch in shared memory whose worker ended before handing it over: its socket is gone
    handing_over = isinstance(err, ConnectionError) and any(
        frame.f_code.co_name == "rebuild_storage_fd" for frame, _ in traceback.walk_tb(err.__traceback__))
    if not (ended or handing_over):
        return None
    said = first_line(err) if ended else f"{type(err).__name__} receiving a batch: {first_line(err)}"
    if handing_over or "signal: Killed" in said or said.endswith("exited unexpectedly"):  # (SIGKILL, or its end)
        said += ("; a killed worker was most often killed by the kernel's out-of-memory killer, which dmesg "
                 "names: fewer --workers need less host memory")
    return f"a data loading worker ended (torch: {said})"


def user_message(err) -> str:
    """The error's own message; for one re-raised from a DataLoader worker (whose text carries the
    worker's traceback), only the original message line."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(f"{type(err).__name__}: ", 1)[-1]
    return text


def line_buffered_stdout():
    """Make stdout write each line as it is printed. Into a file or a pipe (a SLURM job's ``slurm-%j.out``,
    ``> job.out 2>&1``) Python buffers stdout in 8 KB blocks but not stderr: a script's report lines came after
    the ``error:`` line they led to, its warnings apart from its results, and ``tail -f`` showed them at exit."""
    stream = sys.stdout
    if getattr(stream, "line_buffering", True) or not hasattr(stream, "reconfigure"):
        return
    try:
        stream.reconfigure(line_buffering=True)
    except (OSError, ValueError):  # (a closed or detached stream: nothing to order)
        pass


def run_cli(main, argv=None):
    """Run ``main(argv)`` with stdout line-buffered (:func:`line_buffered_stdout`); turn :class:`SATError` into an
    ``error:`` message and exit status 2 (the process that met an error shared by several prints it, not each of
    them), and so an error of the machine's limits (:func:`resources_message`)."""
    line_buffered_stdout()
    try:
        result = main(argv)
    except SATError as err:
        if not err.echo:
            print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        message = resources_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return result
