"""`hmt inspect ADAPTER` and `hmt version`: what an adapter folder holds, and what hmt runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def inspect_command(
    adapter: Annotated[Path, typer.Argument(help="Folder written by HMTForCausalLM.save_pretrained.")],
) -> None:
    """Show what an adapter folder holds: its settings, backbone and parameter shapes."""
    from rich.console import Console
    from rich.table import Table

    from hmt.backbone import has_lora, saved_backbone
    from hmt.io import load_adapter_files

    config, tensors = load_adapter_files(adapter)
    table = Table(title=f"HMT adapter {adapter}")
    table.add_column("setting")
    table.add_column("value")
    for name, value in config.to_dict().items():
        table.add_row(name, str(value))
    for name, tensor in sorted(tensors.items()):
        table.add_row(f"tensor {name}", f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    table.add_row("parameters", f"{sum(t.numel() for t in tensors.values()):,}")
    weights = "fine-tuned backbone" if saved_backbone(adapter) else "LoRA" if has_lora(adapter) else "none"
    table.add_row("backbone weights", weights)
    Console().print(table)


def version_command() -> None:
    """Print the versions of hmt and of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    import hmt

    typer.echo(f"hmt {hmt.__version__}")
    for package in ("torch", "transformers", "safetensors", "accelerate", "peft"):
        try:
            typer.echo(f"{package} {version(package)}")
        except PackageNotFoundError:
            typer.echo(f"{package} not installed")
