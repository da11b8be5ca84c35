"""Running an experiment's typer app as a command: known errors print as one line, as `hmt` does."""

from __future__ import annotations

import typer


def tool(help_text: str) -> typer.Typer:
    """A typer app for one experiment: a single command, no completion, plain tracebacks."""
    return typer.Typer(
        help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )


def run(app: typer.Typer) -> None:
    """Run `app` as `hmt` runs its commands: a known error is one line on stderr and exit code 1."""
    from hmt.cli import run_app

    run_app(app)
