"""User-facing errors: one line that names the file/field and what was expected.

Entry scripts wrap ``main`` with :func:`run_cli`; any :class:`SATError` is then printed as a single
``error: ...`` line on stderr and the process exits with status 2, without a traceback.
"""
import sys


class SATError(Exception):
    """Base class of errors caused by user input (files, flags, configs)."""


class DataError(SATError):
    """A dataset file, annotation or image is missing or malformed."""


class CheckpointError(SATError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class ConfigError(SATError):
    """A config file or command-line option is invalid."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; turn :class:`SATError` into a one-line message and exit status 2."""
    try:
        result = main(argv)
    except SATError as err:
        message = " ".join(str(err).split("\n")) if "\n" not in str(err).strip() else str(err).strip()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return result
