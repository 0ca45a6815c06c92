"""`validate`: check service files. Kept free of typer so the fast path can use it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dstackctl.errors import ExitCode
from dstackctl.wording import count_of, replicas_of

DEFAULT_CONFIG = ".dstack.yml"

if TYPE_CHECKING:
    from dstackctl.config.issues import ConfigError
    from dstackctl.config.loader import LoadedConfig


def validate_files(paths: list[Path], check_env: bool) -> int:
    """Print one line per file (the problems go to stderr); 0 when all are valid, else 2."""
    from dstackctl.config.issues import ConfigError
    from dstackctl.config.loader import load_service_file

    failed = 0
    for path in paths:
        try:
            loaded = load_service_file(path)
            missing_env = _missing_env(loaded)
            if check_env and missing_env:
                raise missing_env
        except ConfigError as exc:
            failed += 1
            count = len(exc.issues)
            _out(f"{path}: invalid ({count_of(count, 'problem')})")
            for issue in exc.issues:
                _err(f"  {issue}")
            continue
        for issue in loaded.warnings:
            _err(f"warning: {issue}")
        for issue in missing_env.issues if missing_env else []:
            _err(f"warning: {issue} (needed by `run`)")
        _out(f"{path}: valid ({_summary(loaded)})")
    return ExitCode.USAGE if failed else ExitCode.OK


def fast_validate(args: list[str]) -> int | None:
    """`validate` without loading typer (~50 ms). None: let typer handle it (help, no file,
    an option this small parser does not know), so that typer reports usage errors."""
    check_env = "--check-env" in args
    paths = [arg for arg in args if arg != "--check-env"]
    if any(arg.startswith("-") for arg in paths):
        return None
    return validate_files([Path(arg) for arg in paths] or default_files(), check_env)


def default_files() -> list[Path]:
    """.dstack.yml in the current folder, as dstack reads it when no file is given."""
    from dstackctl.errors import UsageError

    if Path(DEFAULT_CONFIG).is_file():
        return [Path(DEFAULT_CONFIG)]
    raise UsageError(f"which file? give it (validate FILE...), or run this where a {DEFAULT_CONFIG} is")


def _summary(loaded: LoadedConfig) -> str:
    config = loaded.config
    probes = len(config.effective_probes())
    parts = [
        f"service {config.name}" if config.name else "service",
        replicas_of(*config.replica_span),
        count_of(probes, "probe"),
    ]
    if config.resources.gpu and config.resources.gpu.wants_gpus:
        parts.append(f"gpu {config.resources.gpu}")
    if config.auth:
        parts.append(f"auth on: `dstackctl token {config.name or 'NAME'}` prints the bearer token")
    return ", ".join(parts)


def _missing_env(loaded: LoadedConfig) -> ConfigError | None:
    from dstackctl.config.issues import ConfigError

    try:
        loaded.resolve_env(os.environ)
    except ConfigError as exc:
        return exc
    return None


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
