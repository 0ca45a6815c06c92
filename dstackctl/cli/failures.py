"""The one place that turns an error into its sentence on stderr and its exit code. The Typer
app and the entry point's fast paths both report through it; kept free of typer."""

from __future__ import annotations

import sys

from dstackctl.errors import DstackctlError, ExitCode


def report(exc: BaseException) -> int:
    """Print what went wrong (never a traceback) and return the exit code it deserves."""
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("Interrupted.\n")
        return ExitCode.INTERRUPTED
    if isinstance(exc, DstackctlError):
        sys.stderr.write(f"error: {exc.message}\n")
        return int(exc.exit_code)
    sys.stderr.write(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)\n")
    return ExitCode.FAILED
