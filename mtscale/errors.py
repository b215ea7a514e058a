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
