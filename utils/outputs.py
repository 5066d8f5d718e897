"""An output folder that already holds a previous run's results: refused unless ``--overwrite``, and then
only what the job itself writes is deleted, once the new run is ready to replace it. Nothing else in the
folder is touched, so a folder shared with other files (or with another job's outputs) keeps them.
"""
import shutil
from pathlib import Path

from .errors import ConfigError


def previous_outputs(output_dir, names, overwrite, what="run"):
    """Those of ``names`` (paths relative to ``output_dir``) that the folder holds; a one-line ConfigError
    when it holds any and ``overwrite`` is false."""
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
