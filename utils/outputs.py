"""An output folder that already holds a previous run's results: refused unless ``--overwrite``, and then
only what the job itself writes is replaced, once the new run is complete (``Staged``). Nothing else in the
folder is touched, so a folder shared with other files (or with another job's outputs) keeps them.
"""
import os
import shutil
from pathlib import Path

from .errors import ConfigError

PARTIAL = ".partial"  # marks the outputs being written, until Staged.commit moves them in place


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


def previous_outputs(output_dir, names, overwrite, what="run"):
    """Those of ``names`` (paths relative to ``output_dir``) that the folder holds; a one-line ConfigError
    when it holds any and ``overwrite`` is false, or when ``output_dir`` cannot be a folder."""
    check_output_folder(output_dir)
    found = [name for name in names if (Path(output_dir) / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{output_dir} holds a previous {what} ({', '.join(found)}): --overwrite to replace it, "
                          "or choose another --output-dir")
    return found


def delete_outputs(output_dir, names):
    """Delete ``names`` (files or folders, relative to ``output_dir``) where they exist."""
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


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

    def commit(self, output_dir, previous=()):
        """Delete the names of ``previous`` (the earlier run's, in ``output_dir``) that no staged output replaces,
        then move every staged output that was written in place of its final path (a folder there is replaced
        whole)."""
        delete_outputs(output_dir, [name for name in previous if Path(output_dir) / name not in self.paths])
        for final, staged in self.paths.items():
            if not staged.exists():
                continue
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(staged, final)

    def discard(self):
        """Delete what was staged (after a failure: the previous outputs stay as they were)."""
        for staged in self.paths.values():
            delete_outputs(staged.parent, [staged.name])
