"""Strict reading of the MATLAB annotation files of Stanford Dogs and Stanford Cars (scipy.io)."""
import numpy as np

from utils.errors import DataError


def read_mat(path, names, expected):
    """{name: value} of the variables ``names`` of a .mat file, squeezed (a 1xN cell is a length-N array).

    A missing or unreadable file, or a missing variable, raises DataError naming the file and ``expected``.
    """
    import scipy.io  # about a second to import: only when a MATLAB file is read

    try:
        content = scipy.io.loadmat(path, squeeze_me=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (expected {expected})") from None
    except (scipy.io.matlab.MatReadError, OSError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        # (scipy 1.9 raises IndexError on some files that are not MATLAB files)
        raise DataError(f"{path}: not a readable MATLAB file ({err.__class__.__name__}: {err}; "
                        f"expected {expected})") from None
    missing = [name for name in names if name not in content]
    if missing:
        raise DataError(f"{path}: no variable {missing[0]!r} (expected {expected})")
    return {name: np.atleast_1d(content[name]) for name in names}


def struct_fields(value, fields, path, variable):
    """The columns ``fields`` of a MATLAB struct array as {field: 1-D array}; DataError when one is absent."""
    names = value.dtype.names or ()
    missing = [field for field in fields if field not in names]
    if missing:
        raise DataError(f"{path}: variable {variable!r} has no field {missing[0]!r} "
                        f"(expected a struct array with fields {', '.join(fields)})")
    return {field: np.atleast_1d(value[field]).ravel() for field in fields}


def entry_text(value, path, where, what):
    """A MATLAB char array entry as str; DataError naming ``where`` otherwise."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"{path} {where}: expected {what} as text, got {_show(value)}")


def entry_number(value, path, where, what):
    """A scalar numeric MATLAB entry as float; DataError naming ``where`` otherwise."""
    array = np.asarray(value)
    if array.size == 1 and array.dtype.kind in "iuf" and np.isfinite(array).all():
        return float(array.reshape(()))
    raise DataError(f"{path} {where}: expected {what} as a number, got {_show(value)}")


def entry_integer(value, path, where, what):
    """A scalar integral MATLAB entry (labels, flags) as int; DataError naming ``where`` otherwise."""
    number = entry_number(value, path, where, what)
    if number != int(number):
        raise DataError(f"{path} {where}: expected {what} as an integer, got {number:g}")
    return int(number)


def _show(value):
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text[:80]
