"""`validate` and `schema`: commands that read configuration files only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dstackctl.cli.output import warn
from dstackctl.errors import ExitCode

if TYPE_CHECKING:
    from dstackctl.config.issues import ConfigError
    from dstackctl.config.loader import LoadedConfig


def validate(
    configs: list[Path] = typer.Argument(
        ..., metavar="CONFIG", help="Service files to check.", show_default=False
    ),
    check_env: bool = typer.Option(
        False,
        "--check-env",
        help="Also require every variable taken from your environment (a bare `- NAME` in env, "
        "${{ secrets.NAME }}) to be set now, as `run` does.",
    ),
) -> int:
    """Check service files; print one line per file. Exit 0 when all are valid, 2 otherwise."""
    from dstackctl.config.issues import ConfigError
    from dstackctl.config.loader import load_service_file

    failed = 0
    for path in configs:
        try:
            loaded = load_service_file(path)
            missing_env = _missing_env(loaded)
            if check_env and missing_env:
                raise missing_env
        except ConfigError as exc:
            failed += 1
            count = len(exc.issues)
            typer.echo(f"{path}: invalid ({count} problem{'s' if count != 1 else ''})")
            for issue in exc.issues:
                typer.echo(f"  {issue}", err=True)
            continue
        for issue in loaded.warnings:
            warn(str(issue))
        for issue in missing_env.issues if missing_env else []:
            warn(f"{issue} (needed by `run`)")
        config = loaded.config
        probes = len(config.effective_probes())
        summary = [
            f"service {config.name}" if config.name else "service",
            f"{config.replicas} replica{'s' if config.replicas != 1 else ''}",
            f"{probes} probe{'s' if probes != 1 else ''}",
        ]
        if config.resources.gpu and config.resources.gpu.wants_gpus:
            summary.append(f"gpu {config.resources.gpu}")
        typer.echo(f"{path}: valid ({', '.join(summary)})")
    return ExitCode.USAGE if failed else ExitCode.OK


def _missing_env(loaded: LoadedConfig) -> ConfigError | None:
    from dstackctl.config.issues import ConfigError

    try:
        loaded.resolve_env(os.environ)
    except ConfigError as exc:
        return exc
    return None


def schema() -> None:
    """Print the JSON Schema of a service file, for YAML editors (yaml-language-server)."""
    from dstackctl.config.schema import service_json_schema

    typer.echo(json.dumps(service_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)
