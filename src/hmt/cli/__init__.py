"""The `hmt` command: one module per command, each a typed function over the library.

Heavy imports happen inside the commands, so `hmt --help` is instant. Known errors print as one line.
"""

from __future__ import annotations

import os
import sys

import typer

from hmt.cli.bench import bench_command
from hmt.cli.eval import eval_command
from hmt.cli.harness import lm_eval_command
from hmt.cli.inspect import inspect_command, version_command
from hmt.cli.needle import needle_command
from hmt.cli.qa import qa_command, voice_command
from hmt.cli.serve import serve_command
from hmt.cli.session import ask_command, chat_command, generate_command, read_command
from hmt.cli.train import train_command

DEBUG_VARIABLE = "HMT_DEBUG"

app = typer.Typer(
    name="hmt",
    help="Hierarchical Memory Transformer: unbounded context at constant memory for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("eval")(eval_command)
app.command("train")(train_command)
app.command("needle")(needle_command)
app.command("qa")(qa_command)
app.command("voice")(voice_command)
app.command("read")(read_command)
app.command("ask")(ask_command)
app.command("chat")(chat_command)
app.command("generate")(generate_command)
app.command("serve")(serve_command)
app.command("bench")(bench_command)
app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)(lm_eval_command)
app.command("inspect")(inspect_command)
app.command("version")(version_command)


def main() -> None:
    """Entry point: known errors become one line on stderr (set HMT_DEBUG=1 for the traceback)."""
    run_app(app)


def run_app(command: typer.Typer) -> None:
    """Run a typer app; a known error becomes `error: ...` on stderr and exit code 1 (HMT_DEBUG=1 shows
    the traceback). The experiments' commands run through it too."""
    try:
        command()
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, OSError) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        typer.echo(f"(set {DEBUG_VARIABLE}=1 to see the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
