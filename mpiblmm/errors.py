"""Typed errors: the one place that says what a user mistake is.

A :class:`UserError` is raised for anything the user can fix (a bad spec key, a missing or
malformed file, a rank-deficient contrast).  The command-line layer turns it into a single
line on stderr and exit code 2 on every rank; it must never become a traceback.  Any other
exception is a bug and aborts the MPI job.
"""

from __future__ import annotations

import sys

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the file/key and the problem.

    Parameters
    ----------
    message
        What is wrong and, where it helps, what to do about it.
    where
        The file, key or row the message is about (e.g. ``"spec.json: contrasts[1].weights"``).
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(UserError):
    """The spec file or a file it names is malformed or inconsistent."""


class ContrastError(UserError):
    """A contrast cannot be tested (wrong length, rank-deficient matrix, ...)."""


def warn_unwritable(what: str, exc: OSError) -> None:
    """One line on stderr: ``what`` (an output of lines, not of results) cannot be written
    any more, and the job goes on without it."""
    try:
        print(f"mpiblmm: warning: cannot write {what} ({exc.strerror or exc}); the job goes on "
              "without it", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def not_utf8(path, exc: UnicodeDecodeError) -> "SpecError":
    """The error for a text file that is not UTF-8, naming the row of the first bad byte
    (a decoder's position counts bytes, often of a chunk only)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as first:
            bad = raw[first.start]
            row = raw[:first.start].count(b"\n") + 1
            return SpecError(f"row {row}: not UTF-8 text (byte 0x{bad:02x}); save the file as "
                             "UTF-8", str(path))
    except OSError:
        pass
    return SpecError(f"not UTF-8 text ({exc.reason}); save the file as UTF-8", str(path))

