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


@app.command()
def analyze(
    file: Path = typer.Argument(..., help="A complete recording (.h5); results are added to it."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Head statistics from the first N samples only."),
    spatial: bool = typer.Option(True, "--spatial/--no-spatial",
                                 help="Spatial attention profiles over all samples (cached; reused when unchanged)."),
) -> None:
    """Compute derived per-head results and store them in the recording.

    Always: head statistics (entropy, confidence, CLS attention). Further analyses are options.
    """
    # Extending: add an option above (e.g. `--spatial`) and one step below; import lazily.
    from attnviz.analysis.head_stats import compute_and_store

    stats = compute_and_store(file, max_samples=max_samples)
    typer.echo(f"{file}: head statistics {', '.join(stats.as_dict())} from {stats.n_samples} sample(s)")
    if spatial:
        from attnviz.analysis.spatial import analyze_step

        for line in analyze_step(file):
            typer.echo(f"{file}: {line}")


@app.command()
def serve(
    files: Optional[list[Path]] = typer.Argument(None, help="Recordings or folders of them (default: sample_data/)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(8050, "--port", help="TCP port."),
    workers: int = typer.Option(4, "--workers", help="Worker threads of the waitress server."),
) -> None:
    """Open the dashboard over recordings (waitress server; debug off)."""
    from attnviz.app.server import serve as run_server

    run_server(files or [], host=host, port=port, workers=workers)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(8050, "--port", help="TCP port."),
    workers: int = typer.Option(4, "--workers", help="Worker threads of the waitress server."),
) -> None:
    """Open the dashboard on the bundled demo recordings (sample_data/*.h5)."""
    from attnviz.app.server import sample_data_files, serve as run_server

    run_server(sample_data_files(), host=host, port=port, workers=workers)


@app.command()
def report(
    file: Path = typer.Argument(..., help="A recording (.h5)."),
    out: Path = typer.Option(..., "--out", help="Output folder (created) for the images and index.html."),
    fmt: str = typer.Option("png", "--format", help="png or svg."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Samples for per-sample views, e.g. 0,3,10-12 "
                                          "(default: the first 3)."),
    views: Optional[str] = typer.Option(None, "--views", help="Comma-separated view names (default: all)."),
    width: int = typer.Option(900, "--width", help="Image width in pixels."),
    height: int = typer.Option(600, "--height", help="Image height in pixels."),
) -> None:
    """Export the dashboard's views as PNG/SVG images plus an index.html linking them."""
    from attnviz.report import write_report

    index = write_report(file, out, fmt=fmt, samples=samples, views=views, width=width, height=height)
    typer.echo(f"wrote {index}")


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
