"""Sessions: a named memory saved on disk (state safetensors + JSON), tied to the model that made it.

A session is what `hmt read` leaves and `hmt ask`, `hmt chat` and the server continue: the memory of
everything read into it. It records the backbone and adapter it was made with and refuses another (a
memory written by one model is noise to another).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hmt import __version__
from hmt.io import read_json, write_text_atomic
from hmt.memory import MemoryState

STATE_SUFFIX = ".memory.safetensors"
INFO_SUFFIX = ".session.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class SessionInfo:
    """What a session records beside its memory."""

    model: dict[str, Any]  # the identity of the model that made it (`model_identity`)
    tokens: int = 0  # tokens read into it
    sources: list[str] = field(default_factory=list)  # what was read, in order (file names, "chat", ...)
    created: str = ""
    updated: str = ""
    hmt_version: str = __version__


def model_identity(model: Any, backbone_name: str, adapter: Path | None) -> dict[str, Any]:
    """The backbone (name, kind and shape) and the adapter (folder and a hash of its files) a memory
    belongs to."""
    config = model.backbone.config
    return {
        "backbone": backbone_name,
        "backbone_type": config.model_type,
        "vocab_size": model.vocab_size,
        "embedding_dim": model.embedding_dim,
        "layers": getattr(config, "num_hidden_layers", None),
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_sha256": adapter_hash(adapter) if adapter is not None else None,
        "hmt_config": {k: v for k, v in model.config.to_dict().items() if k != "hmt_version"},
    }


def adapter_hash(adapter: Path) -> str:
    """sha256 over what an adapter folder's files hold (tensors by name; JSON as data; other files as
    bytes), the fine-tuned backbone excluded: the same weights give the same hash wherever they are."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(adapter).iterdir() if p.is_file()):
        digest.update(path.name.encode())
        if path.suffix == ".safetensors":  # its header's order is not fixed: hash the tensors themselves
            with safe_open(str(path), framework="pt") as tensors:
                for name in sorted(tensors.keys()):
                    tensor = tensors.get_tensor(name).contiguous()
                    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        elif path.suffix == ".json":
            data = read_json(path)
            if isinstance(data, dict):
                data.pop("hmt_version", None)  # a new hmt reading the same weights is the same model
            digest.update(json.dumps(data, sort_keys=True).encode())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


class SessionStore:
    """Sessions in a folder: NAME.memory.safetensors and NAME.session.json, both written atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.directory / f"{name}{STATE_SUFFIX}", self.directory / f"{name}{INFO_SUFFIX}"

    def exists(self, name: str) -> bool:
        return self._paths(name)[1].exists()

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(INFO_SUFFIX) for p in self.directory.glob(f"*{INFO_SUFFIX}"))

    def save(self, name: str, state: MemoryState, info: SessionInfo) -> None:
        """Write (or replace) a session: the memory first, then the JSON that names it complete."""
        state_path, info_path = self._paths(name)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        info.created = info.created or now
        info.updated = now
        info.tokens = int(state.tokens.sum())
        state.detach().to("cpu").save(state_path)
        write_text_atomic(info_path, json.dumps(asdict(info), indent=2) + "\n")

    def load(
        self, name: str, identity: dict[str, Any], device: Any = None
    ) -> tuple[MemoryState, SessionInfo]:
        """A session's memory and record, refused unless it was made by the model `identity` describes."""
        state_path, info_path = self._paths(name)
        if not info_path.exists():
            known = ", ".join(self.names()) or "none"
            raise FileNotFoundError(
                f"no session {name!r} in {self.directory} (sessions there: {known}); create it with hmt read"
            )
        data = read_json(info_path)
        try:
            info = SessionInfo(**data)
        except TypeError:
            raise ValueError(f"{info_path} is not an hmt session record") from None
        different = sorted(k for k in identity if info.model.get(k) != identity[k])
        if different:
            details = "; ".join(f"{k}: session {info.model.get(k)!r}, now {identity[k]!r}" for k in different)
            raise ValueError(
                f"session {name!r} was made with another model ({details}); use the backbone and adapter it "
                "was made with, or read the text into a new session"
            )
        return MemoryState.load(state_path, device=device), info

    def delete(self, name: str) -> None:
        state_path, info_path = self._paths(name)
        if not info_path.exists():
            raise FileNotFoundError(f"no session {name!r} in {self.directory}")
        info_path.unlink()
        state_path.unlink(missing_ok=True)


def check_name(name: str) -> str:
    """A session name that is safe as a file name: letters, digits, '.', '_', '-' (not first), <= 128."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"session names take letters, digits, '.', '_' and '-' (up to 128, starting with a letter or "
            f"digit), got {name!r}"
        )
    return name
