"""The ``attnviz`` command line (typer).

Each command is a thin wrapper: parse options, call the library, print. Errors that are the user's
(:class:`~attnviz.errors.AttnvizError`) become one line ``error: ...`` with exit code 2 and no
traceback. Heavy imports (torch, transformers, Dash) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from attnviz.errors import AttnvizError, InputError

app = typer.Typer(
    name="attnviz",
    help="Visual analytics for the attention heads of transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Visual analytics for the attention heads of transformer models."""


def fail(message: str) -> None:
    """Print ``error: message`` to stderr and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def info(
    file: Path = typer.Argument(..., help="A recording (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Describe a recording: format, model, samples, heads, datasets and their size on disk."""
    from attnviz.store.info import describe, format_description

    d = describe(file)
    typer.echo(json.dumps(d, indent=2) if as_json else format_description(d))


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the typer app, turning user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except AttnvizError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # click's usage errors (bad option, missing argument) carry format_message()
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        raise


__all__ = ["app", "main", "fail", "InputError"]
