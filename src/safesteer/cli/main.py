"""`safesteer` console script: one sub-command per pipeline stage.

Every stage module registers its commands through a ``register(app)`` function; errors of type
:class:`~safesteer.errors.SafesteerError` become one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import typer

from safesteer import __version__
from safesteer.errors import SafesteerError

app = typer.Typer(
    name="safesteer",
    help=(
        "Inference-time safety alignment for frozen language models.\n\n"
        "Pipeline: data -> extract -> train-sae -> encode -> probe -> map -> atoms -> evaluate -> report "
        "(or all at once: run)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safesteer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """safesteer command line."""


def _register_all() -> None:
    # Each import adds the commands of one stage. Keep this list in pipeline order.
    for module in (
        "data",
        "extract",
        "sae",
        "probes",
        "dist",
        "evaluate",
        "pipeline",
        "serve",
        "export",
        "bench",
    ):
        try:
            mod = __import__(f"safesteer.cli.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name == f"safesteer.cli.{module}":
                continue  # stage not built yet
            raise
        mod.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int):
            return rv
    except SafesteerError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:  # pragma: no cover
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors (typer may vendor click, so match by behaviour)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        if type(exc).__name__ == "Abort":
            typer.echo("aborted", err=True)
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
