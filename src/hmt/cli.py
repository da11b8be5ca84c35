"""The `hmt` command: thin typer commands over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="hmt",
    help="Hierarchical Memory Transformer: unbounded context at constant memory for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEBUG_VARIABLE = "HMT_DEBUG"


@app.command()
def version() -> None:
    """Print the versions of hmt and of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    import hmt

    typer.echo(f"hmt {hmt.__version__}")
    for package in ("torch", "transformers", "safetensors"):
        try:
            typer.echo(f"{package} {package_version(package)}")
        except PackageNotFoundError:
            typer.echo(f"{package} not installed")


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="Folder written by HMTForCausalLM.save_pretrained.")],
) -> None:
    """Show what an adapter folder holds: its settings, backbone and parameter shapes."""
    from rich.console import Console
    from rich.table import Table

    from hmt.config import HMTConfig
    from hmt.io import ADAPTER_NAME, CONFIG_NAME, load_tensors
    from hmt.model import ADAPTER_FORMAT

    config_path = adapter / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {adapter} is not an HMT adapter folder")
    config = HMTConfig.from_json_file(config_path)
    tensors, _ = load_tensors(adapter / ADAPTER_NAME, ADAPTER_FORMAT)
    table = Table(title=f"HMT adapter {adapter}")
    table.add_column("setting")
    table.add_column("value")
    for name, value in config.to_dict().items():
        table.add_row(name, str(value))
    for name, tensor in sorted(tensors.items()):
        table.add_row(f"tensor {name}", f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    table.add_row("parameters", f"{sum(t.numel() for t in tensors.values()):,}")
    Console().print(table)


def main() -> None:
    """Entry point: known errors become one line on stderr (set HMT_DEBUG=1 for the traceback)."""
    try:
        app()
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        typer.echo(f"(set {DEBUG_VARIABLE}=1 to see the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
