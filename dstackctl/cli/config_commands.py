"""`validate` and `schema`: commands that read configuration files only."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def validate(
    configs: list[Path] = typer.Argument(
        None, metavar="CONFIG", help="Service files to check (default: .dstack.yml).", show_default=False
    ),
    check_env: bool = typer.Option(
        False,
        "--check-env",
        help="Also require every variable taken from your environment (a bare `- NAME` in env, "
        "${{ secrets.NAME }}) to be set now, as `run` does.",
    ),
) -> int:
    """Check service files; print one line per file. Exit 0 when all are valid, 2 otherwise.

    Without a file, checks .dstack.yml in the current folder, as dstack does."""
    from dstackctl.cli.validate_files import default_files, validate_files

    return validate_files(configs or default_files(), check_env)


def schema() -> None:
    """Print the JSON Schema of a service file, for YAML editors (yaml-language-server)."""
    from dstackctl.config.schema import service_json_schema

    typer.echo(json.dumps(service_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)
