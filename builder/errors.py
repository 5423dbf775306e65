"""User-facing errors: one type, carrying the message, the process exit code and the data of what failed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INVALID_INPUT = 2
EXIT_VERIFICATION_FAILED = 3
# 128 + SIGINT, as shells report a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class ModelpackError(Exception):
    """A failure the user can fix; the CLI prints the message without a traceback."""

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        # A name that is not UTF-8 reaches Python as lone surrogates, which no terminal or JSON text can hold: shown
        # escaped, so that the message about it can always be printed.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class SpecError(ModelpackError):
    """The spec file is missing, malformed or invalid."""


class SourceError(ModelpackError):
    """The base model or adapter checkpoint cannot be packaged as the spec asks."""


class OutputError(ModelpackError):
    """The output folder cannot be written or replaced: it overlaps a source, is held by another build, is not a
    bundle that --force may replace, or its filesystem refuses the write (full, read-only, permissions, name).

    path: what was refused (the destination, or the file or folder a failed write named); errno: the OSError's code
    when the filesystem refused the write (errno.ENOSPC, errno.EACCES, ...), None for a refusal of modelpack's own.
    """

    def __init__(self, message: str, *, path: Path | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class BundleError(ModelpackError):
    """An existing bundle is incomplete or was changed after it was built."""


class RegistryError(ModelpackError):
    """A registry cannot be used: unreachable, refused the credentials (401/403), has no such tag or digest, or a
    reference is malformed (exit 2; a refused artifact is a VerificationError)."""


class VerificationError(ModelpackError):
    """The built bundle failed a verification check, or could not be checked.

    report: the verification report (report.VerificationReport) when the checks ran and some failed; None when the
    bundle was refused before any check ran (its files, digest or signature) or a check could not run. A Mapping
    here because this module sits below the report's types.
    """

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, *, report: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.report = report
