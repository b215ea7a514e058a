"""User-facing errors. Each message is one line naming the input, where, what was found and
what was expected; the CLI prints it without a traceback and exits non-zero."""

from __future__ import annotations


class MtscaleError(Exception):
    """Base of every error the CLI reports as one line."""


class ConfigError(MtscaleError, ValueError):
    """A bad configuration value or key; the message names the dotted field."""


class BadInputError(MtscaleError):
    """A raw input file that cannot be ingested.

    >>> str(BadInputError("a.skeleton", 12, "found 24 joints", "25"))
    'a.skeleton:12: found 24 joints, expected 25'

    ``index``: the record's position inside a file holding many (a ``.pkl`` annotation, an
    ``.npz`` row), recorded in the skip report; None for a file that is one record.
    """

    def __init__(self, path: str, line: int | None, found: str, expected: str | None = None, *,
                 index: int | None = None):
        self.path, self.line, self.found, self.expected = str(path), line, found, expected
        self.index = index
        where = self.path if line is None else f"{self.path}:{line}"
        msg = f"{where}: {found}" + (f", expected {expected}" if expected else "")
        super().__init__(msg)


class StoreError(MtscaleError):
    """A store that is missing, damaged, or written with an unknown schema version."""


class NonFiniteLossError(MtscaleError):
    """Training produced a non-finite loss; the message names the step and the batch's samples."""

    @classmethod
    def of_batch(cls, where: str, loss: float, rows: list[int], whose: str = "") -> NonFiniteLossError:
        """The one message of pre-training and fine-tuning: ``where`` (step / epoch and micro-batch),
        the loss, and the batch's store rows (``whose``: e.g. "on rank 1 ")."""
        more = " ..." if len(rows) > 16 else ""
        return cls(f"{where}: loss is {loss}, expected a finite value; the batch {whose}held sample rows "
                   f"{rows[:16]}{more} (check the data with `mtscale verify`, or lower train.lr)")


USER_OS_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "EISDIR", "ENOTDIR"}
"""File-system failures a user fixes (permissions, a read-only or full disk, a missing path),
reported as one line rather than a traceback."""


def user_os_error(e: OSError) -> str | None:
    """``e`` as one line (``path: reason``) when it is a file-system failure a user fixes, else None."""
    import errno

    name = errno.errorcode.get(e.errno or -1, "")
    if name not in USER_OS_ERRNOS:
        return None
    where = e.filename if e.filename is not None else "output"
    hint = {"ENOSPC": "free disk space, then run the same command again to resume",
            "EDQUOT": "free quota, then run the same command again to resume",
            "EROFS": "a writable location", "EACCES": "a location you may write", "EPERM": "a location you may write"}
    return f"{where}: {e.strerror or name}" + (f", expected {hint[name]}" if name in hint else "")
