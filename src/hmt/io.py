"""Files: atomic writes, careful reads of the safetensors files hmt writes, and adapter folders."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hmt.config import HMTConfig

CONFIG_NAME = "hmt_config.json"
ADAPTER_NAME = "hmt_adapter.safetensors"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes without error.

    A crash mid-write therefore leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(folder: str | Path, results: str, overwrite: bool) -> Path:
    """Before a long run: `folder` must be (or become) a writable folder, and `folder/results` must not
    exist unless `overwrite`. Returns the results path; errors name the problem and the fix."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file, not a folder: choose a folder")
    path = folder / results
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: choose another --out or pass --overwrite")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write results into {folder} ({err.strerror or err}): choose another --out"
        ) from None
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """A JSON file hmt wrote, or a ValueError naming the file when it is missing, truncated or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from err


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors as safetensors, atomically, with string metadata naming what the file is."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by `save_tensors`, refusing missing, corrupt or foreign files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    found = metadata.get("format")
    if found != expected_format:
        raise ValueError(
            f"{path} is not an {expected_format} file (its format tag is {found!r}); "
            f"point to a file written by hmt"
        )
    return tensors, metadata


# ---- adapter files ------------------------------------------------------------------------------

ADAPTER_FORMAT = "hmt-adapter"
SHIPPED_ADAPTER = "smollm2-135m-hmt"  # inside the package: HMT parameters + LoRA for the default backbone


def save_adapter_files(directory: str | Path, config: HMTConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write `hmt_adapter.safetensors` and `hmt_config.json` into `directory`, each atomically."""
    directory = Path(directory)
    metadata = {
        "format": ADAPTER_FORMAT,
        "hmt_version": str(config.hmt_version),
        "backbone_type": str(config.backbone_type),
    }
    save_tensors(directory / ADAPTER_NAME, tensors, metadata)
    write_text_atomic(directory / CONFIG_NAME, config.to_json())


def load_adapter_files(directory: str | Path) -> tuple[HMTConfig, dict[str, torch.Tensor]]:
    """The config and HMT parameters of an adapter folder, refusing a folder that is not one."""
    from hmt.config import HMTConfig

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: {directory} is not an HMT adapter folder (written by save_pretrained)"
        )
    config = HMTConfig.from_json_file(config_path)
    tensors, _ = load_tensors(directory / ADAPTER_NAME, ADAPTER_FORMAT)
    return config, tensors


def shipped_adapter() -> Path | None:
    """The adapter shipped for the default backbone, or None if this installation has none."""
    from importlib.resources import files

    path = Path(str(files("hmt.adapters") / SHIPPED_ADAPTER))
    return path if (path / CONFIG_NAME).is_file() else None
