"""Ask-path evaluation (hmt.qa) on a tiny random Llama over the tiny tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ATOL, run_cli, tiny_tokenizer
from hmt.ask import ask
from hmt.facts import FactMaker, answer_found
from hmt.qa import QA_ROWS, QAConfig, ask_full_row, read_into_memory, reading_mode, run_qa

TEXT = " ".join(
    f"the model reads a long context {i % 7}. memory of the segment recall token." for i in range(60)
)
MAX_NEW = 4


@pytest.fixture(scope="module")
def maker() -> FactMaker:
    tokenizer = tiny_tokenizer()
    haystack = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    return FactMaker(tokenizer, haystack, "test")


@pytest.fixture(scope="module")
def pair(maker):
    """A tiny random Llama over the tiny tokenizer's vocabulary, and HMT around it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(maker.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    backbone = LlamaForCausalLM(config).eval()
    model = HMTForCausalLM(backbone, HMTConfig(segment_length=32, num_sensory=4, cache_size=16)).eval()
    return model, backbone


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tasks": ("fact", "qa4")}, "tasks must be among"),
        ({"tasks": ()}, "tasks must be among"),
        ({"rows": ("hmt", "rmt")}, "rows must be among"),
        ({"rows": ()}, "rows must be among"),
        ({"lengths": (32,)}, "lengths must be >= 64"),
        ({"lengths": ()}, "lengths must be >= 64"),
        ({"depths": (50.0,)}, "depths are fractions"),
        ({"depths": ()}, "depths are fractions"),
        ({"trials": 0}, "trials and max_new_tokens"),
        ({"max_new_tokens": 0}, "trials and max_new_tokens"),
        ({"num_facts": 1}, "num_facts must be 2-8"),
        ({"num_facts": 9}, "num_facts must be 2-8"),
        ({"num_facts": 3, "asked": 4}, "num_facts must be 2-8"),
        ({"asked": 0}, "num_facts must be 2-8"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        QAConfig(**settings)


def test_defaults_are_valid():
    config = QAConfig()
    assert config.rows == QA_ROWS and config.tasks == ("fact",)


def _key(sample):
    return (tuple(sample.context.tolist()), sample.question, sample.values, sample.evidence, sample.distance)


def test_samples_are_seeded_per_cell(maker):
    config = QAConfig(tasks=("fact", "qa1", "multikey"), lengths=(256, 320), depths=(0.0, 0.5), trials=2)
    grid = config.samples(maker)
    assert list(grid) == [(t, n, d) for t in config.tasks for n in config.lengths for d in config.depths]
    assert all(len(samples) == 2 for samples in grid.values())
    for (task, length, _), samples in grid.items():
        assert all(s.task == task and s.context.numel() == length for s in samples)
    again = config.samples(maker)  # what every row reads: the same samples each time
    assert {k: [_key(s) for s in v] for k, v in grid.items()} == {
        k: [_key(s) for s in v] for k, v in again.items()
    }
    other = QAConfig(tasks=config.tasks, lengths=config.lengths, depths=config.depths, trials=2, seed=1)
    assert [_key(s) for s in other.samples(maker)["fact", 256, 0.0]] != [
        _key(s) for s in grid["fact", 256, 0.0]
    ]
    assert _key(grid["fact", 256, 0.0][0]) != _key(grid["fact", 256, 0.0][1])  # trials differ


def test_reading_mode_is_restored(pair):
    model, _ = pair
    with pytest.raises(RuntimeError), reading_mode(model, "sliding"):
        assert model.mode == "sliding"
        raise RuntimeError
    assert model.mode == "hmt"


def test_reading_in_chunks_gives_the_same_memory(pair, maker, monkeypatch):
    import hmt.reading

    model, _ = pair
    context = QAConfig(lengths=(160,), depths=(0.5,), trials=1).samples(maker)["fact", 160, 0.5][0].context
    whole = read_into_memory(model, context)
    monkeypatch.setattr(hmt.reading, "READ_CHUNK", 48)  # not a multiple of the segment length
    chunked = read_into_memory(model, context)
    assert int(chunked.tokens) == int(whole.tokens) == 160
    torch.testing.assert_close(chunked.memories, whole.memories, atol=ATOL, rtol=0)
    assert torch.equal(chunked.recent_ids, whole.recent_ids) and torch.equal(
        chunked.pending_ids, whole.pending_ids
    )


def test_run_qa_scores_every_row_on_the_same_samples(pair, maker):
    model, backbone = pair
    config = QAConfig(tasks=("fact",), lengths=(128,), depths=(0.5,), trials=1, max_new_tokens=MAX_NEW)
    calls = []
    report = run_qa(
        model, backbone, maker.tokenizer, maker, config, window=128, progress=lambda *a: calls.append(a)
    )
    assert set(report) == {"config", "full_window", "rows", "summary"}
    assert report["full_window"] == 128 and report["config"]["rows"] == QA_ROWS
    assert list(report["rows"]) == list(QA_ROWS) and list(report["summary"]) == list(QA_ROWS)
    assert calls == [(row, 1, 1) for row in QA_ROWS]
    (sample,) = config.samples(maker)["fact", 128, 0.5]
    for row, cells in report["rows"].items():
        (cell,) = cells
        assert (cell["task"], cell["length"], cell["depth"]) == ("fact", 128, 0.5)
        assert 0 <= cell["accuracy"] <= 1 and cell["seconds_per_trial"] >= 0
        (trial,) = cell["trials"]
        assert trial["question"] == sample.question and trial["expected"] == list(sample.values)
        assert trial["distance"] == sample.distance and trial["depth"] == round(sample.depth, 3)
        assert trial["correct"] == answer_found(trial["answer"], sample.values)
        assert cell["accuracy"] == float(trial["correct"])
        assert trial["in_full_window"] == (sample.distance + 64 < 128)
        assert report["summary"][row] == {"fact@128": cell["accuracy"]}
    assert model.mode == "hmt"  # the sliding row gave the default back

    # The hmt and sliding rows answer as ask does after reading the context by hand.
    for row in ("hmt", "sliding"):
        with reading_mode(model, row):
            state = read_into_memory(model, sample.context)
            reply = ask(
                model, maker.tokenizer, sample.question, state, max_new_tokens=MAX_NEW, do_sample=False
            )
        assert report["rows"][row][0]["trials"][0]["answer"] == reply.text, row


def test_the_full_row_sees_the_end_of_the_context_within_its_window(pair, maker, monkeypatch):
    _, backbone = pair
    (sample,) = QAConfig(lengths=(192,), depths=(1.0,), trials=1).samples(maker)["fact", 192, 1.0]
    seen = []
    generate = backbone.generate

    def record(ids, **kw):
        seen.append(ids)
        return generate(ids, **kw)

    monkeypatch.setattr(backbone, "generate", record)
    answer = ask_full_row(backbone, maker.tokenizer, sample, 128, MAX_NEW)
    assert isinstance(answer, str)
    (ids,) = seen
    assert ids.shape[1] <= 128 - MAX_NEW
    text = maker.tokenizer.decode(ids[0])
    assert sample.evidence in text and text.rstrip().endswith("Answer:")  # the fact (at depth 1) and the turn
    assert sample.question in text
    with pytest.raises(ValueError, match="leaves no room"):
        ask_full_row(backbone, maker.tokenizer, sample, 40, MAX_NEW)


# --- `hmt qa` ---------------------------------------------------------------------------------------------


def qa_args(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    (tmp_path / "hay.txt").write_text(TEXT)
    return [
        "qa", "--backbone", str(tiny_model_dir), "--adapter", "none", "--data", str(tmp_path / "hay.txt"),
        "--split", "train", "--lengths", "256", "--depths", "50", "--trials", "1", "--rows", "hmt,sliding,full",
        "--max-new-tokens", "3", "--segment-length", "32", "--num-sensory", "4", "--dtype", "fp32",
        "--device", "cpu", "--out", str(tmp_path / "qa"), *extra,
    ]  # fmt: skip


def test_qa_command_writes_results_and_a_table(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, stdout, err = run_cli(monkeypatch, capsys, *qa_args(tiny_model_dir, tmp_path, "--answers"))
    assert code == 0, err
    assert "what each row answered" in stdout and "ask path" in stdout and "results.json" in stdout
    report = json.loads((tmp_path / "qa" / "results.json").read_text())
    assert list(report["rows"]) == ["hmt", "sliding", "full"]
    assert report["full_window"] == 128  # the tiny backbone's own window
    assert report["config"]["lengths"] == [256] and report["config"]["depths"] == [0.5]
    assert report["data"]["split"] == "train" and report["data"]["tokens"] > 256
    assert report["adapter"] is None and report["model_config"]["segment_length"] == 32
    questions = {row: cells[0]["trials"][0]["question"] for row, cells in report["rows"].items()}
    assert len(set(questions.values())) == 1  # every row asked the same
    for row, cells in report["rows"].items():
        (cell,) = cells
        assert (cell["task"], cell["length"], cell["depth"]) == ("fact", 256, 0.5)
        assert 0 <= cell["accuracy"] <= 1 and report["summary"][row] == {"fact@256": cell["accuracy"]}
        (trial,) = cell["trials"]
        assert trial["correct"] == answer_found(trial["answer"], tuple(trial["expected"]))
    code, _, err = run_cli(monkeypatch, capsys, *qa_args(tiny_model_dir, tmp_path))  # refuses to overwrite
    assert code == 1 and "overwrite" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--tasks", "fact,qa9"), "tasks must be among fact, multikey, qa1, qa2, qa3"),
        (("--rows", "hmt,rmt"), "rows must be among"),
        (("--depths", "middle"), "--depths takes comma-separated percentages"),
        (("--split", "validation"), "--split must be one of train, test"),
    ],
)
def test_qa_command_errors_are_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path, extra, message):
    code, _, err = run_cli(monkeypatch, capsys, *qa_args(tiny_model_dir, tmp_path, *extra))
    assert code == 1 and err.startswith("error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "qa" / "results.json").exists()
