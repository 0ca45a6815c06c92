"""The Typer application and the one place that turns errors into exit codes."""

from __future__ import annotations

import sys

import typer

from dstackctl import __version__
from dstackctl.cli import config_commands, deploy_commands, failures, service_commands, token_command
from dstackctl.cli.output import state
from dstackctl.errors import DstackctlError, ExitCode

app = typer.Typer(
    name="dstackctl",
    help="Run dstack services with probes on this machine's Docker engine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
deploy_commands.register(app)
service_commands.register(app)
config_commands.register(app)
token_command.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dstackctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of unexpected errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run dstack services with probes on this machine's Docker engine."""
    state.debug = debug


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def _debug_first(argv: list[str] | None) -> list[str] | None:
    """`--debug` is the app's option; accept it after the command too (`dstackctl ps --debug`)."""
    if argv is None or "--debug" not in argv:
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(arg for arg in argv[:end] if arg != "--debug"), *argv[end:]]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; never lets a traceback out without --debug."""
    argv = _debug_first(argv if argv is not None else sys.argv[1:])
    state.as_json = False  # set by the commands that take --json
    try:
        result = app(args=argv, standalone_mode=False, prog_name="dstackctl")
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return ExitCode.INTERRUPTED
    except typer.TyperException as exc:  # usage errors: typer prints them with a hint
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", ExitCode.USAGE))
    except (DstackctlError, KeyboardInterrupt) as exc:
        return failures.report(exc)
    except Exception as exc:
        if state.debug:
            raise
        return failures.report(exc)
    return result if isinstance(result, int) else ExitCode.OK
