"""The jobs' output folders and files. A folder that already holds a previous run's results: refused unless
``--overwrite``, and then only what the job itself writes is replaced, once the new run is complete
(``Staged``). Nothing else in the folder is touched, so a folder shared with other files (or with another job's
outputs) keeps them. One job at a time per folder (``FolderLock``); output paths checked before the work
(``check_output_folder``, ``check_output_file``); files written whole (``write_text_atomic``); an earlier job's
JSON outputs read back by the tools (``read_json``).
"""
import contextlib
import datetime
import errno
import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path

from .errors import ConfigError, DataError, writing_outputs

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

_logger = logging.getLogger("sat")

PARTIAL = ".partial"  # marks the outputs being written, until Staged.commit moves them in place
# What an evaluation (evaluator.py) writes into --output-dir besides log.txt and overlays/: --overwrite replaces
# them, and a training run does not start beside them (utils/run_folder.py)
EVALUATION_FILES = ("metrics.json", "per_image.csv", "wsol_curves.json", "wsol_curves.png")


def partial_name(name):
    """Where output ``name`` is written until it is complete: ``metrics.json`` -> ``metrics.partial.json``
    (the extension kept: image writers choose the format by it), ``overlays`` -> ``overlays.partial``."""
    path = Path(name)
    return str(path.with_name(f"{path.stem}{PARTIAL}{path.suffix}"))


def check_output_folder(output_dir):
    """A one-line ConfigError when ``output_dir`` is a file or lies inside one."""
    output_dir = Path(output_dir)
    if any(path.exists() and not path.is_dir() for path in (output_dir, *output_dir.parents)):
        raise ConfigError(f"--output-dir {output_dir}: a file, or inside one; expected a folder")


def check_output_file(path, overwrite, outputs):
    """A one-line ConfigError, before any work, for the COCO boxes file of --save-boxes when it cannot or may
    not be written there: a folder, a path under a file or under a folder this process may not write into, one of
    ``outputs`` (the job's own files), an existing file that is not a COCO detection file (a checkpoint, an input
    image, metrics: never replaced), or an earlier COCO file without ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--save-boxes {path}: a folder; expected the path of a JSON file")
    if path.resolve() in {Path(output).resolve() for output in outputs}:
        raise ConfigError(f"--save-boxes {path}: a file this job writes itself; choose another path")
    if path.exists():
        if not is_coco_detections(path):
            raise ConfigError(f"--save-boxes {path}: an existing file that is not a COCO detection file (never "
                              "replaced); choose another path")
        if not overwrite:
            raise ConfigError(f"--save-boxes {path}: holds earlier COCO boxes: --overwrite to replace them, or choose "
                              "another path")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise ConfigError(f"--save-boxes {path}: a parent of it is a file, not a folder")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save-boxes {path}: no permission to write into {existing}")


def finite_or_none(value):
    """``value`` as a results JSON holds it: a NaN or infinite float as None (JSON null; json.dumps would write
    NaN / Infinity, which strict JSON readers refuse), anything else as it is."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_json(path):
    """The JSON object of an earlier job's output file (metrics.json, results.json, ...); a one-line DataError naming
    the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_coco_detections(path):
    """Whether ``path`` is a JSON object with COCO's images, annotations and categories (what --save-boxes
    writes)."""
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):  # unreadable, not UTF-8 text, not JSON
        return False
    return isinstance(record, dict) and {"images", "annotations", "categories"} <= set(record)


def previous_outputs(output_dir, names, overwrite, what="run"):
    """Those of ``names`` (paths relative to ``output_dir``) that the folder holds; a one-line ConfigError
    when it holds any and ``overwrite`` is false, or when ``output_dir`` cannot be a folder."""
    check_output_folder(output_dir)
    found = [name for name in names if (Path(output_dir) / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{output_dir} holds a previous {what} ({', '.join(found)}): --overwrite to replace it, "
                          "or choose another --output-dir")
    return found


def _read_umask():
    mask = os.umask(0)  # (read at import: setting it to read it races with threads creating files)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def mode_as_opened(fd):
    """Give a file made by tempfile.mkstemp (private: 0600) the mode open() creates files with (0666 less the
    umask), so that a checkpoint or an export renamed in place is readable by the team as other outputs are. Only
    where the file system takes it: FAT and exFAT (a USB disk) refuse such a change with EPERM, which stopped every
    checkpoint write; a file system without modes (or a system without fchmod) keeps its own."""
    fchmod = getattr(os, "fchmod", None)  # (Windows before Python 3.13 has none)
    if fchmod is None:
        return
    try:
        fchmod(fd, 0o666 & ~UMASK)
    except OSError:
        pass


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed in place: a reader, or a job killed
    while writing, never leaves a half-written file. An OSError (a full disk) is one OutputError line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing_outputs(path):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def delete_outputs(output_dir, names):
    """Delete ``names`` (files or folders, relative to ``output_dir``) where they exist."""
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def removed_if_failed(*folders):
    """Context manager: when the block fails, remove each of ``folders`` and those of their parents that did not
    exist before it, where they are empty, so that a failed run leaves no new folder behind (one that existed, or
    one holding a file, stays)."""
    new = missing_folders(*folders)
    try:
        yield
    except BaseException:
        remove_empty(new)
        raise


def missing_folders(*folders):
    """The folders that creating each of ``folders`` (with its parents) would make, by their real paths, the
    deepest first."""
    new = set()
    for folder in folders:
        path, below = Path(folder).absolute(), []
        while not os.path.lexists(path) and path != path.parent:
            below.append(path.name)
            path = path.parent
        # the folders the path names, from where it exists on (its real place: ``new/../kept/sub`` named kept
        # itself as new, since new/.. did not exist, and a failure removed that empty folder of the user's)
        path = path.resolve()
        for name in reversed(below):
            path = path.parent if name == ".." else path / name
            if not os.path.lexists(path):
                new.add(path)
    return sorted(new, key=lambda p: len(p.parts), reverse=True)


def remove_empty(folders):
    """Remove each of ``folders`` that is empty (one holding a file, or not there, stays)."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:  # not empty, or not there
            pass


class Staged:
    """New outputs written beside their final paths (:func:`partial_name`) and moved in place together by
    :meth:`commit`, so that a run that fails before it leaves the previous outputs as they were."""

    def __init__(self):
        self.paths = {}  # final path -> staged path

    def path(self, final):
        """Where to write the output whose final path is ``final`` (a file or a folder)."""
        final = Path(final)
        self.paths[final] = Path(partial_name(final))
        return self.paths[final]

    def write_json(self, final, value, indent=None):
        """Write ``value`` as JSON (and a newline) at the staged path of ``final``; an OSError becomes the one line
        naming ``final`` (a full disk's error names no file)."""
        with writing_outputs(final):
            self.path(final).write_text(json.dumps(value, indent=indent) + "\n", encoding="utf-8")

    def commit(self, output_dir, previous=()):
        """Delete the names of ``previous`` (the earlier run's, in ``output_dir``) that no staged output replaces,
        then move every staged output that was written in place of its final path (a folder there is replaced
        whole: renamed aside, the new one renamed in, then the old one deleted, so that no moment leaves half
        of it)."""
        from utils.preemption import signals_held  # (torch: imported by the jobs, not for this module alone)
        with signals_held():  # a few deletions and renames: a Ctrl-C waits for them
            self._commit(output_dir, previous)

    def _commit(self, output_dir, previous):
        delete_outputs(output_dir, [name for name in previous if Path(output_dir) / name not in self.paths])
        replaced = []  # earlier folders, moved aside: a folder is swapped by two renames, deleted after
        for final, staged in self.paths.items():
            if not staged.exists():
                continue
            if final.is_dir() and not final.is_symlink():
                aside = final.with_name(f".{final.name}.replaced")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
                replaced.append(aside)
            os.replace(staged, final)
        for aside in replaced:
            shutil.rmtree(aside)

    def discard(self):
        """Delete what was staged (after a failure: the previous outputs stay as they were)."""
        for staged in self.paths.values():
            delete_outputs(staged.parent, [staged.name])


def _sync(fd):
    """fsync ``fd``; a file system that does not offer it (EINVAL, ENOTSUP) is not an error."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


class FolderLock:
    """An exclusive lock on an output folder while a job (``job``: the script's name) writes into it
    (``<folder>/.lock``, removed when the job ends): a second job started into the same folder (one job submitted
    twice, an evaluation into a folder a run is writing) is refused with one line naming the holder, instead of
    both writing the same files. A POSIX record lock: the system releases it when the process ends, even
    killed (the file a killed job leaves is free), and NFS shares it between nodes. Where the file system has
    no locks, the job runs unlocked with a warning."""

    NAME = ".lock"

    def __init__(self, folder, job):
        self.path, self.job, self.fd = Path(folder) / self.NAME, job, None
        self.line = None  # what this lock wrote into its file (None: unlocked)
        self.created = []  # the folders it made, deepest first: removed at the end when the job left them empty

    def acquire(self):
        """Take the lock (creating the folder; nothing when this lock holds it already); a ConfigError when
        another process holds it or the folder cannot be written. Returns self."""
        if self.fd is not None:
            return self
        check_output_folder(self.path.parent)
        self.created = missing_folders(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--output-dir {self.path.parent}: cannot be created ({err.strerror or err})") from None
        for _ in range(10) if fcntl is not None else ():  # a lock file removed meanwhile: try the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise ConfigError(f"--output-dir {self.path.parent}: cannot write its lock file {self.path} "
                                  f"({err.strerror or err})") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "a job that has not said which"
                os.close(fd)
                if err.errno == errno.ESTALE:  # NFS: removed on the server since it was opened
                    continue
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    _logger.warning("%s: the file system offers no lock (%s): nothing keeps a second job from "
                                    "writing into this folder at the same time", self.path, err.strerror or err)
                    return self
                raise ConfigError(f"--output-dir {self.path.parent}: another job is writing into it ({holder}; "
                                  f"{self.path}): wait for it to end, or choose another --output-dir") from None
            if self._is_current(fd):
                since = datetime.datetime.now().isoformat(timespec="seconds")
                line = f"{self.job}, pid {os.getpid()} on {socket.gethostname()} since {since}"
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{line}\n".encode())
                    _sync(fd)  # seen at once by the other nodes of a job (utils/run_folder.py's check_shared_folder)
                except OSError as err:  # a full disk, a quota: one line (closing frees the lock); the empty file
                    self.path.unlink(missing_ok=True)  # and the folders made for it go (still this lock's: held)
                    os.close(fd)
                    remove_empty(self.created)
                    reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or err)
                    raise ConfigError(f"--output-dir {self.path.parent}: cannot write its lock file {self.path} "
                                      f"({reason})") from None
                self.fd, self.line = fd, line
                return self
            os.close(fd)  # the file of a job that has just ended and removed it: lock the one at the path now
        if fcntl is not None:
            _logger.warning("%s: kept changing while it was being locked: this job runs unlocked", self.path)
        return self

    def _is_current(self, fd):
        """Whether ``fd`` is the file at the lock's path (not one removed since it was opened)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        """Remove the lock file (when it is still this lock's), then free the lock: in that order, a job that
        opened the file meanwhile finds it removed and takes the new one. The folders the lock made go too when
        they are empty (a job refused at its start leaves no empty output folder)."""
        if self.fd is not None:
            if self._is_current(self.fd):
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:  # a folder no longer writable (the error that ended the job says so): the file
                    pass         # stays, unlocked (closing frees the lock), and the next job takes it
            os.close(self.fd)
            self.fd, self.line = None, None
            remove_empty(self.created)  # (a folder holding the job's outputs or another job's lock file stays)
            self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
