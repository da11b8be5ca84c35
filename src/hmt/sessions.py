"""Sessions: a named memory saved on disk (state safetensors + JSON), tied to the model that made it.

A session is what `hmt read` leaves and `hmt ask`, `hmt chat` and the server continue: the memory of
everything read into it. It records the backbone and adapter it was made with and refuses another (a
memory written by one model is noise to another).

Writes are safe across processes: a change (load, read, save) holds the session's file lock
(`store.lock(name)`), and a save writes a new memory file, then the JSON record that names it — the one
rename that commits — then removes the old file, so a crash at any point leaves the session as it was
before or after the save, never a memory a step ahead of its record. `store.clean()` removes what
crashed saves left behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hmt.io import read_json, write_text_atomic
from hmt.memory import MemoryState
from hmt.version import __version__

STATE_SUFFIX = ".memory.safetensors"  # the memory file of sessions saved before files were versioned
INFO_SUFFIX = ".session.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STATE_FILE = re.compile(r"(?P<name>.+)\.memory(-[0-9a-f]{16})?\.safetensors")
INFO_FILE = re.compile(r"(?P<name>.+)\.session\.json")
TEMP_FILE = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp")  # left by a crash inside `atomic_path`


class ModelMismatch(ValueError):
    """A session made by another model; `fields` name what differs (backbone, adapter, config...)."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass
class SessionInfo:
    """What a session records beside its memory."""

    model: dict[str, Any]  # the identity of the model that made it (`model_identity`)
    tokens: int = 0  # tokens read into it
    sources: list[str] = field(default_factory=list)  # what was read, in order (file names, "chat", ...)
    created: str = ""
    updated: str = ""
    hmt_version: str = __version__
    state_file: str = ""  # the memory file this record names ("": NAME.memory.safetensors)

    @classmethod
    def from_dict(cls, data: Any, name: str) -> SessionInfo:
        """A record read from JSON, refused (ValueError naming the session) unless every field has its
        type."""
        kinds = {"model": dict, "tokens": int, "sources": list, "created": str, "updated": str,
                 "hmt_version": str, "state_file": str}  # fmt: skip
        if not isinstance(data, dict) or "model" not in data:
            raise ValueError(f"session {name!r} has no valid record: it is not an hmt session")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        wrong = [k for k, kind in kinds.items() if k in data and not isinstance(data[k], kind)]
        if unknown or wrong or not all(isinstance(s, str) for s in data.get("sources", [])):
            raise ValueError(
                f"session {name!r} has a damaged record (unknown fields {unknown}, wrong types {wrong}): "
                "read the text into a new session"
            )
        if isinstance(data.get("tokens", 0), bool):
            raise ValueError(f"session {name!r} has a damaged record (tokens is not a number)")
        return cls(**data)


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
    """Sessions in a folder: NAME.session.json (the record) naming NAME.memory-ID.safetensors (the
    memory), both written atomically; .NAME.lock serialises changes across processes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _info_path(self, name: str) -> Path:
        check_name(name)
        return self.directory / f"{name}{INFO_SUFFIX}"

    def exists(self, name: str) -> bool:
        return self._info_path(name).exists()

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(INFO_SUFFIX) for p in self.directory.glob(f"*{INFO_SUFFIX}"))

    def check_writable(self) -> None:
        """Refuse (PermissionError naming the folder) a sessions folder that cannot be created or written,
        before any work is spent on a session to save there."""
        import tempfile

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as err:
            raise PermissionError(
                f"cannot write sessions into {self.directory} ({err.strerror or err}): choose another "
                "--sessions folder"
            ) from None

    def lock(self, name: str) -> Any:
        """The session's lock across processes (a `filelock.FileLock`, one per file and reentrant in this
        process; `lock.acquire(timeout=0)` tries without waiting): hold it around a load, change and
        save so that no other writer's change is lost."""
        from filelock import FileLock

        check_name(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f".{name}.lock", thread_local=False, is_singleton=True)

    def save(self, name: str, state: MemoryState, info: SessionInfo) -> None:
        """Write (or replace) a session: a new memory file, then the record naming it, then the old
        memory file is removed. Holds the session's lock while it writes."""
        info_path = self._info_path(name)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        state_file = f"{name}.memory-{secrets.token_hex(8)}.safetensors"
        with self.lock(name):
            previous = self._state_file_or_none(name)
            state.detach().to("cpu").save(self.directory / state_file)
            record = replace(info, created=info.created or now, updated=now,
                             tokens=int(state.tokens.sum()), state_file=state_file)  # fmt: skip
            write_text_atomic(info_path, json.dumps(asdict(record), indent=2) + "\n")
            if previous is not None and previous != state_file:
                (self.directory / previous).unlink(missing_ok=True)
        info.created, info.updated, info.tokens, info.state_file = (
            record.created, record.updated, record.tokens, record.state_file,
        )  # fmt: skip

    def load(
        self, name: str, identity: dict[str, Any], device: Any = None, model: Any = None
    ) -> tuple[MemoryState, SessionInfo]:
        """A session's memory and record, refused unless it was made by the model `identity` describes;
        with `model`, the memory is also checked against it and put on its device (`model.fit_state`)."""
        for attempt in range(3):  # a save by another process may remove the file just named: read again
            info = self.info(name)
            different = sorted(k for k in identity if info.model.get(k) != identity[k])
            if different:
                details = "; ".join(
                    f"{k}: session {info.model.get(k)!r}, now {identity[k]!r}" for k in different
                )
                raise ModelMismatch(
                    f"session {name!r} was made with another model ({details}); use the backbone and "
                    "adapter it was made with, or read the text into a new session",
                    different,
                )
            path = self.directory / (info.state_file or f"{name}{STATE_SUFFIX}")
            if path.is_file() or attempt == 2:
                break
        try:
            state = MemoryState.load(path, device=device)
            if model is not None:
                state = model.fit_state(state)
        except FileNotFoundError:
            raise ValueError(f"session {name!r} has lost its memory file: read the text again") from None
        except ValueError as err:
            raise ValueError(
                f"session {name!r} holds an unusable memory: {_without_path(err, path)}"
            ) from None
        return state, info

    def info(self, name: str) -> SessionInfo:
        """A session's record (FileNotFoundError naming the folder's sessions when there is none)."""
        info_path = self._info_path(name)
        if not info_path.exists():
            known = ", ".join(self.names()) or "none"
            raise FileNotFoundError(
                f"no session {name!r} in {self.directory} (sessions there: {known}); create it with hmt read"
            )
        try:
            data = read_json(info_path)
        except ValueError:
            raise ValueError(f"session {name!r} has a corrupt record (not JSON): delete it") from None
        return SessionInfo.from_dict(data, name)

    def delete(self, name: str) -> None:
        info_path = self._info_path(name)
        with self.lock(name):
            if not info_path.exists():
                raise FileNotFoundError(f"no session {name!r} in {self.directory}")
            state_file = self._state_file_or_none(name)
            info_path.unlink()
            if state_file is not None:
                (self.directory / state_file).unlink(missing_ok=True)

    def clean(self) -> list[str]:
        """Remove what crashed saves left (temporary files, memory files no record names), skipping
        sessions another process is changing. Returns the removed files' names."""
        if not self.directory.is_dir():
            return []
        removed = []
        for path in sorted(self.directory.iterdir()):
            temp = TEMP_FILE.fullmatch(path.name)
            if temp:  # a temporary file of a memory file or of a record
                owner = STATE_FILE.fullmatch(temp["target"]) or INFO_FILE.fullmatch(temp["target"])
            else:  # a memory file (records are never removed here)
                owner = STATE_FILE.fullmatch(path.name)
            if owner is None or not NAME_PATTERN.fullmatch(owner["name"]) or not path.is_file():
                continue
            name = owner["name"]
            lock = self.lock(name)
            try:
                lock.acquire(timeout=0)
            except TimeoutError:  # another process is changing it (filelock.Timeout is a TimeoutError)
                continue
            try:
                # a memory file is stale unless the record names it (a damaged record: keep all)
                if not temp and self.exists(name) and path.name == self._state_file(name):
                    continue
                path.unlink(missing_ok=True)
                removed.append(path.name)
            except ValueError:
                continue
            finally:
                lock.release()
        return removed

    def _state_file_or_none(self, name: str) -> str | None:
        try:
            return self._state_file(name) if self.exists(name) else None
        except ValueError:  # a damaged record: its files are left for the user
            return None

    def _state_file(self, name: str) -> str:
        """The memory file the session's record names."""
        return self.info(name).state_file or f"{name}{STATE_SUFFIX}"


def _without_path(err: Exception, path: Path) -> str:
    """An error's message with the file's path left out (the server must not show its folders)."""
    return str(err).replace(str(path), "its memory file")


def check_name(name: str) -> str:
    """A session name that is safe as a file name: letters, digits, '.', '_', '-' (not first), <= 128."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"session names take letters, digits, '.', '_' and '-' (up to 128, starting with a letter or "
            f"digit), got {name!r}"
        )
    return name
