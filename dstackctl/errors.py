"""Exit codes and the errors that carry them; the CLI turns these into one sentence each."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_READY = 3
    INTERRUPTED = 130


class DstackctlError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(DstackctlError):
    exit_code = ExitCode.USAGE


class NoSuchService(DstackctlError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no service named {name}; `dstackctl ps -a` lists them", ExitCode.FAILED)
