"""The bodies of the `hmt` commands: console output and files around the library calls."""

import warnings
from pathlib import Path


def prepare_command() -> None:
    """Before a command loads a model: silence transformers' per-load bars and info logs (commands show
    their own progress) and flush subnormal floats to zero (CPU speed; see `hmt.train.flush_denormals`)."""
    from transformers.utils import logging as hf_logging

    from hmt.train import flush_denormals

    flush_denormals()

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # peft still asks for the renamed `is_gradient_checkpointing`; the notice is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def refuse_existing(results: Path, overwrite: bool) -> None:
    """Never replace a report the user already has unless they asked to."""
    if results.exists() and not overwrite:
        raise FileExistsError(f"{results} exists: choose another --out or pass --overwrite")
