"""The one family of nas's own errors.

Every error nas raises for something the user can act on (a flag, a study file, a storage URL, a
data file, a stored trial) is a NasError, and its message is the one line to show. A command
catches NasError (and KeyboardInterrupt) and prints that line; anything else is a bug, in nas or in
a library, and rises with its traceback. A library function turns a third-party failure into a
NasError only where the user can act on it: a file it can't read, a storage it can't reach.

The one deliberate exception outside the family is nas.storage.outage.StorageUnavailable, a
SystemExit: it must pass through Optuna's trial loop and a worker's heartbeat thread, which record
or swallow any Exception, and end the process with its line.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class NasError(Exception):
    """A problem the user can act on; str() is the one line a command shows for it."""


class UsageError(NasError):
    """A command-line value that argparse could not check by itself (a list it parses, a path that
    must be a directory), found wrong by library code."""


class OutputError(NasError):
    """A file or directory nas was asked to write that cannot be written: no such directory, no
    permission, a full disk, a file where a directory should be."""


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Run the block that writes `what` (a path, or words naming it); an OSError in it becomes an
    OutputError that says what could not be written and why, in one line."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {what}: {exc.strerror or exc}") from exc
