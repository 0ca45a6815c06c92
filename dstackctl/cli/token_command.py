"""`token`: print the bearer token of a service with `auth: true`."""

from __future__ import annotations

import typer

from dstackctl.cli.output import service_names
from dstackctl.errors import ExitCode


def token(name: str = typer.Argument(..., help="Service name.", autocompletion=service_names)) -> int:
    """Print the bearer token of a service with `auth: true`: send it as the header
    `Authorization: Bearer TOKEN` to the service's endpoint.

    Exit 1 when NAME is no service, or its auth is off. The token is made when the service
    first runs with auth on and kept (0600, in the store) across redeploys and stops."""
    from dstackctl.service_token import token_of_service
    from dstackctl.store import Store

    typer.echo(token_of_service(Store(), name))
    return ExitCode.OK


def register(app: typer.Typer) -> None:
    app.command()(token)
