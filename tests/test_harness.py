"""lm-evaluation-harness: the `hmt` model against the library's own reading, and `hmt lm-eval` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, tiny_tokenizer, word_text

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from hmt import HMTConfig, HMTForCausalLM
from hmt.evaluate import EvalConfig, run_eval
from hmt.harness import HMTLM, write_document_task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """An HMT model (segments of 8 tokens, so a few words span several) and its tokenizer."""
    import transformers as tf

    backbone = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    config = HMTConfig(segment_length=8, num_sensory=2, cache_size=6)
    return HMTForCausalLM(backbone, config), tiny_tokenizer()


def harness(tiny, batch_size=1) -> HMTLM:
    model, tokenizer = tiny
    return HMTLM(model=model, tokenizer=tokenizer, batch_size=batch_size)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


PAIRS = [
    (word_text(1, 30), " memory recall"),
    (word_text(1, 30), " the token"),  # the same context: read once
    (word_text(2, 5), " long"),
    (word_text(3, 60), " context model reads a"),
]


def one_call(tiny, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-probability and greedy flag from one read of context + continuation."""
    model, tokenizer = tiny
    lm = HMTLM(model=model, tokenizer=tokenizer)
    context_ids, target = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + target])
    with torch.no_grad():
        out = model(ids, return_logits=True)
    n = len(target)
    logprob = -float(out.token_losses[0, -n:].double().sum())
    greedy = bool((out.logits[0, -n - 1 : -1].argmax(-1) == torch.tensor(target)).all())
    return logprob, greedy


def test_loglikelihood_reads_the_context_into_memory_then_scores_the_continuation(tiny):
    got = harness(tiny).loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        expected, expected_greedy = one_call(tiny, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_loglikelihood_batched_equals_one_at_a_time_and_reads_each_context_once(tiny, monkeypatch):
    single = harness(tiny).loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    calls = []
    original = HMTForCausalLM.forward

    def counting(self, input_ids, *args, **kwargs):
        calls.append(kwargs.get("state") is None)
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(HMTForCausalLM, "forward", counting)
    batched = harness(tiny, batch_size=3).loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(single, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert calls.count(True) == 1  # three distinct contexts, one batch of context reads
    assert calls.count(False) == 2  # four continuations in batches of three


def test_empty_context_is_the_prefix_token(tiny):
    lm = harness(tiny)
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [("", "memory recall")]), disable_tqdm=True)
    assert logprob < 0


def test_rolling_loglikelihood_equals_hmt_eval_token_losses(tiny):
    model, tokenizer = tiny
    documents = [word_text(7, 120), word_text(8, 45), word_text(9, 200)]
    lm = harness(tiny, batch_size=2)
    got = lm.loglikelihood_rolling(
        requests("loglikelihood_rolling", [(d,) for d in documents]), disable_tqdm=True
    )
    for document, total in zip(documents, got, strict=True):
        stream = torch.tensor([lm.prefix_token_id, *tokenizer(document)["input_ids"]])
        result = run_eval(model, stream, EvalConfig(modes=("hmt",), segments_per_call=2))["hmt"]
        assert result.tokens_scored == len(stream) - 1  # every token once, the first after the prefix
        assert total == pytest.approx(-float(result.token_losses[result.token_mask].double().sum()), abs=1e-3)


def test_generate_until_stops_at_the_task_strings_and_batches(tiny):
    model, tokenizer = tiny
    contexts = [word_text(4, 40), word_text(5, 9), word_text(6, 70)]
    settings = {"until": ["reads"], "max_gen_toks": 12, "do_sample": False}
    args = [(c, settings) for c in contexts]
    single = harness(tiny).generate_until(requests("generate_until", args), disable_tqdm=True)
    batched = harness(tiny, batch_size=3).generate_until(requests("generate_until", args), disable_tqdm=True)
    assert single == batched
    for context, text in zip(contexts, single, strict=True):
        assert "reads" not in text
        ids = torch.tensor([tokenizer(context)["input_ids"]])
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        row = greedy.sequences[0].tolist()
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        assert text == tokenizer.decode(row, skip_special_tokens=True).split("reads")[0]


def test_bad_arguments_are_clear_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="integer --batch_size"):
        HMTLM(model=model, tokenizer=tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="not supported by the hmt model"):
        harness(tiny).generate_until(requests("generate_until", [("a", {"num_beams": 4})]), disable_tqdm=True)
    paper = HMTForCausalLM(model.backbone, model.config.replace(recall_query="paper", summary_length=None))
    with pytest.raises(ValueError, match="causal recall query"):
        HMTLM(model=paper, tokenizer=tokenizer)


@pytest.fixture
def fresh_lm_eval_logging():
    """lm-eval's CLI gives its logger a handler on the stderr of the moment (captured here): drop it
    after each in-process run, as a new process would."""
    import logging

    yield
    logger = logging.getLogger("lm_eval")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def write_local_tasks(folder, documents: list[str]) -> None:
    """A rolling-perplexity task, a multiple-choice task and a generation task over local JSON files."""
    choices = [{"text": d[:60], "gold": 0, "choices": [" memory", " token"]} for d in documents]
    (folder / "choices.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choices))
    write_document_task(folder, "local_rolling", documents)
    (folder / "local_choice.yaml").write_text(
        f"""task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choices.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""
    )
    (folder / "local_generate.yaml").write_text(
        f"""task: local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choices.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: " memory"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )


def test_hmt_lm_eval_runs_local_tasks_offline(
    fresh_lm_eval_logging, monkeypatch, capsys, tmp_path, tiny_model_dir
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_local_tasks(tasks, [word_text(i, 150) for i in range(3)])
    out = tmp_path / "results"
    model_args = f"backbone={tiny_model_dir},adapter=none,segment_length=16,num_sensory=4,dtype=fp32"
    # no --device: lm-eval then asks for cuda:0, which without a GPU means the CPU (as its hf model does)
    code, stdout, err = run_cli(
        monkeypatch, capsys, "lm-eval", "--model", "hmt", "--model_args", model_args,
        "--tasks", "local_rolling,local_choice,local_generate", "--include_path", str(tasks),
        "--batch_size", "2", "--output_path", str(out),
    )  # fmt: skip
    assert code == 0, err
    written = list(out.rglob("results*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"]
    assert results["local_rolling"]["word_perplexity,none"] > 1
    assert 0 <= results["local_choice"]["acc,none"] <= 1
    assert "exact_match,none" in results["local_generate"]
    assert "local_rolling" in stdout  # lm-eval's table


def test_hmt_lm_eval_errors_are_one_line(
    fresh_lm_eval_logging, monkeypatch, capsys, tmp_path, tiny_model_dir
):
    write_local_tasks(tmp_path, [word_text(1, 20)])
    model_args = f"backbone={tiny_model_dir},adapter=none,segment_length=16,num_sensory=4"
    common = ("lm-eval", "--model", "hmt", "--model_args", model_args, "--include_path", str(tmp_path))
    code, _, err = run_cli(monkeypatch, capsys, *common, "--batch_size", "auto", "--tasks", "local_rolling")
    assert code == 1
    assert "error: the hmt model takes an integer --batch_size" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, *common, "--tasks", "no_such_task")
    assert code == 1 and "error: Tasks not found: no_such_task" in err and "Traceback" not in err


def test_write_document_task_keeps_existing_files_and_checks_its_name(tmp_path):
    task = write_document_task(tmp_path, "essays_test", ["one text", "  ", "another"])
    lines = (tmp_path / "essays_test.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["one text", "another"]
    assert "output_type: loglikelihood_rolling" in task.read_text()
    with pytest.raises(FileExistsError, match=r"essays_test\.jsonl exists"):
        write_document_task(tmp_path, "essays_test", ["new"])
    assert len((tmp_path / "essays_test.jsonl").read_text().splitlines()) == 2
    write_document_task(tmp_path, "essays_test", ["new"], overwrite=True)
    assert len((tmp_path / "essays_test.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="identifier"):
        write_document_task(tmp_path, "my-task", ["text"])
    with pytest.raises(ValueError, match="empty"):
        write_document_task(tmp_path, "blank", [" "])


def test_registering_hmt_keeps_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("hmt") is HMTLM
    assert get_model("dummy").__name__ == "DummyLM"  # `hmt lm-eval --model hf ...` still works
