"""A training run's folder (--output-dir): what a run writes there (``RUN_OUTPUTS``), whether a run may start
in it (``check_run_folder``: a previous run is continued with --resume or replaced with --overwrite, never
mixed), one folder that every node of a job reaches (``check_shared_folder``), the previous run's outputs deleted
once the new run can start (``replace_previous_run``), the image cache deleted once the run is complete
(``remove_image_cache``), and the lines that say how to go on after a run stopped (``interrupted_message``,
``how_to_continue``).
"""
import logging
import shlex
import shutil
import socket
import time
from pathlib import Path

from utils import distributed as dist_utils
from utils.errors import ConfigError, echoed
from utils.logger import open_log_file
from utils.outputs import EVALUATION_FILES, check_output_folder, delete_outputs
from utils.preemption import signals_deferred

IMAGE_CACHE = "image_cache"  # cache_images: one file per split (DataLoader/image_cache.py)
# What a run writes into --output-dir (--overwrite deletes them).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "results.json", "config.yaml", "log.txt", "tensorboard", "overlays",
               IMAGE_CACHE)
_logger = logging.getLogger("sat")


def check_run_folder(cfg, output_dir):
    """Whether this run may start in ``output_dir`` (one-line ConfigError, nothing touched, when not), as the main
    process finds it, on every process; returns the outputs of an earlier run there that this one replaces
    (--overwrite; deleted by ``replace_previous_run`` once this run can start). A folder holding a checkpoint or
    results.json holds a previous run: refused without --resume or --overwrite, with a plain --resume when it has
    no last.pth, and with --resume of another folder's checkpoint; what a start that failed before its first
    checkpoint left is reused as it is."""
    check_output_folder(output_dir)
    run = [f"checkpoints/{path.name}" for path in sorted((output_dir / "checkpoints").glob("*.pth"))]
    if (output_dir / "results.json").exists():
        run.append("results.json")
    outputs = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    run, outputs = dist_utils.all_gather_object((run, outputs))[0]
    elsewhere = cfg.resume not in (None, "auto") and \
        Path(cfg.resume).resolve().parent != (output_dir / "checkpoints").resolve()
    if elsewhere and run:  # another run's checkpoint into a folder holding a run: the two would mix
        raise ConfigError(f"--resume {cfg.resume}: {output_dir} holds another run ({', '.join(run)}): continue that "
                          "run in a new --output-dir, or this folder's own run with --resume alone")
    if cfg.resume == "auto" and run and "checkpoints/last.pth" not in run:  # not a start: nothing to continue
        best = "checkpoints/best.pth"
        continue_from = f"--resume {output_dir / best} continues from its weights, " if best in run else ""
        raise ConfigError(f"--resume: {output_dir} holds a previous run ({', '.join(run)}) but no "
                          f"checkpoints/last.pth: {continue_from}--overwrite starts again")
    evaluation = dist_utils.all_gather_object([name for name in EVALUATION_FILES if (output_dir / name).exists()])[0]
    if evaluation and not (cfg.resume is not None and run):  # a new run: not beside an evaluator's files
        raise ConfigError(f"{output_dir} holds an evaluator's outputs ({', '.join(evaluation)}): choose another "
                          "--output-dir")
    if cfg.resume is not None:
        return []
    if run and not cfg.overwrite:
        raise ConfigError(f"{output_dir} holds a previous run ({', '.join(run)}): --resume to continue it, "
                          "--overwrite to start again, or choose another --output-dir")
    return outputs if cfg.overwrite else []


def check_shared_folder(lock, info, wait=10.0):
    """Every process sees the main process's lock file (``lock``: the run's FolderLock) in its --output-dir: one
    folder shared by the nodes (a network file system), as the job needs: only the main process writes the
    checkpoints, and every process reads them (the final test's best.pth, --resume). A node with a folder of its
    own trained the whole run, then failed the final test (best.pth not found), and with --resume started afresh
    beside the resuming main process. The other processes look for up to ``wait`` seconds (a network file
    system may show the file late); a ConfigError on every process otherwise (said by the main one); nothing
    checked when the main process runs unlocked. Collective."""
    line = dist_utils.all_gather_object(lock.line if info.is_main else None)[0]
    seen = info.is_main or line is None or _shows(lock.path, line, wait)
    apart = [(rank, host, folder) for rank, (ok, host, folder) in enumerate(dist_utils.all_gather_object(
        (seen, socket.gethostname(), str(lock.path.parent)))) if not ok]
    if apart:
        rank, host, folder = apart[0]
        error = ConfigError(f"--output-dir {lock.path.parent}: rank {rank} (on {host}) does not find in its "
                            f"--output-dir {folder} the lock file that the main process holds ({lock.path}: "
                            f"{line}): every node must reach the run's folder (one shared file system), where "
                            "the main process writes the checkpoints that every process reads")
        raise error if info.is_main else echoed(error)


def _shows(path, line, wait):
    """Whether the file at ``path`` holds ``line``, looked at until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if path.read_text(encoding="utf-8", errors="replace").strip() == line:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def replace_previous_run(output_dir, names, info, deleted=None):
    """The main process deletes ``names`` (of RUN_OUTPUTS) from ``output_dir``, calls ``deleted`` and starts
    log.txt; every process waits for it (and stops if it failed). A stop signal meanwhile waits for the deletion
    and ``deleted`` (it left half of the previous run, said to be kept); the other processes' wait stays open to
    signals (a launcher's SIGTERM)."""
    def replace():
        with signals_deferred():
            delete_outputs(output_dir, names)
            if deleted is not None:
                deleted()
        open_log_file(output_dir)
        _logger.info("--overwrite: deleted the previous run's %s in %s", ", ".join(names), output_dir)

    dist_utils.run_on_main(info.is_main, replace)


def remove_old_image_cache(output_dir, replaced, cache_images, info):
    """--overwrite (``replaced``: the previous run's outputs, the main process's finding, alike on every process):
    where any process makes an image cache (``cache_images`` is each node's own choice), the main process deletes
    the previous run's image_cache/ now, before the new caches are made there (once the new run had started it
    deleted the new ones, which the final test then failed to open); returns ``replaced`` less it. The processes
    decide together: a collective on the caching nodes alone mismatched every later one (a traceback at the
    start). Collective."""
    if IMAGE_CACHE not in replaced or not any(dist_utils.all_gather_object(bool(cache_images))):
        return replaced
    dist_utils.run_on_main(info.is_main, delete_outputs, output_dir, [IMAGE_CACHE])
    return [name for name in replaced if name != IMAGE_CACHE]


def remove_image_cache(output_dir, cache_images, info):
    """After the final test: the main process deletes ``output_dir``'s image cache (a finished run does not need it
    again) once every process is done reading its own. ``cache_images`` is each node's own choice (a per-node key):
    the processes decide together, so that all or none of them meet in this collective (a barrier on the nodes
    with the cache alone ended a complete run with 'another process of the job ended'). Collective."""
    cached = any(dist_utils.all_gather_object(bool(cache_images)))  # also the wait for every process's last read
    if cached and info.is_main:
        shutil.rmtree(Path(output_dir) / IMAGE_CACHE, ignore_errors=True)


def how_to_continue(checkpoint_dir, resumed_from, resume):
    """The command that continues a run stopped by a file it could not write: ``resume`` (from last.pth);
    before the run has a last.pth, from the checkpoint it was resumed from (``resumed_from``: its copy in the run's
    folder when there is one), or, for a run started afresh, the same command with --overwrite."""
    if (checkpoint_dir / "last.pth").exists():
        return f"resume with: {resume}"
    if resumed_from is not None:
        copy = checkpoint_dir / Path(resumed_from).name
        return f"resume with: {resume} {shlex.quote(str(copy if copy.exists() else resumed_from))}"
    return f"start again with: {restart_command(resume)}"


def restart_command(resume):
    """The command that starts the run afresh: ``resume`` with --overwrite in place of --resume."""
    return f"{resume.removesuffix('--resume')}--overwrite"


def interrupted_message(cfg, progress, resume, cause="interrupted"):
    """One line after Ctrl-C (or a stop signal in the final test): where training stopped, what is saved, and the
    command that resumes it (as after SIGTERM / SIGUSR1 during the epochs)."""
    where = "before training started" if progress["epoch"] is None else (
        "in the final test" if progress["epoch"] >= cfg.epochs else f"in epoch {progress['epoch'] + 1}/{cfg.epochs}")
    if progress.get("previous_kept"):  # --overwrite had not yet replaced the previous run: nothing to resume
        return f"{cause} {where}; the previous run in {cfg.output_dir} is as it was; start again with: " \
               f"{restart_command(resume)}"
    last = Path(cfg.output_dir) / "checkpoints" / "last.pth"
    held = [f"{progress['saved']} finished epoch(s)"] if progress["saved"] else []
    if progress.get("steps_done"):  # a mid-epoch save (save_every_steps)
        held.append(f"{progress['steps_done']} optimizer steps of epoch {progress['saved'] + 1}")
    if held:
        saved = f"{last} holds {' and '.join(held)}"
    elif last.exists():
        saved = f"{last} holds the last saved position"
    else:
        saved = "no checkpoint yet"
    return f"{cause} {where}; {saved}; resume with: {resume}"
