"""The ask path (`hmt.ask.ask`, `HMTForCausalLM.ask`): the turn read as its own segment, then again
opening the answer's segment, then the answer generated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import word_text
from hmt.ask import PLAIN_STOPS, PLAIN_TURN, ask, ask_turn, encode

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = {"max_new_tokens": 12, "do_sample": False}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """An HMT model on the tiny Llama whose vocabulary is the tiny tokenizer's (small segments)."""
    import transformers as tf

    from hmt import HMTConfig, HMTForCausalLM

    torch.manual_seed(0)
    backbone = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = HMTConfig(segment_length=8, num_sensory=2, cache_size=4, memory_tokens=1, recall_temperature=None,
                       sharpen_recall_after=None)  # fmt: skip
    return HMTForCausalLM(backbone, config).eval()


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not getattr(tokenizer, "chat_template", None)
    return tokenizer


@pytest.fixture
def document(model, tokenizer):
    """The memory after reading a short document (several segments)."""
    with torch.no_grad():
        return model(encode(tokenizer, word_text(5, 40))[None], score=False).state


def assert_same_state(got, expected):
    for name, tensor in expected.tensors().items():
        torch.testing.assert_close(getattr(got, name), tensor, atol=0, rtol=0, msg=name)


def test_ask_is_the_question_as_its_own_segment_then_generation_after_it(model, tokenizer, document):
    question = "what does the memory recall?"
    answer = ask(model, tokenizer, question, document, **GREEDY)
    turn = ask_turn(tokenizer, question)
    ids = encode(tokenizer, turn.text)
    with torch.no_grad():
        read = model(ids[None], state=document, end_segment=True, score=False).state
    by_hand = model.generate(
        ids[None], state=read, tokenizer=tokenizer, stop_strings=list(turn.stops), **GREEDY
    )
    assert answer.sequences.tolist() == by_hand.sequences.tolist()
    assert_same_state(answer.state, by_hand.state)
    assert answer.output.sequences is answer.sequences and answer.output.state is answer.state
    new = answer.sequences.shape[1]
    # the turn is read twice (its own segment, then opening the answer's), then every answer token
    assert int(answer.state.tokens) == int(document.tokens) + 2 * ids.numel() + new
    assert int(document.tokens) == len(encode(tokenizer, word_text(5, 40)))  # the caller's state is unchanged


def test_the_model_method_is_the_ask_path(model, tokenizer, document):
    question = "and the segment?"
    direct = ask(model, tokenizer, question, document, **GREEDY)
    method = model.ask(tokenizer, question, state=document, **GREEDY)
    assert method.text == direct.text
    assert method.sequences.tolist() == direct.sequences.tolist()
    assert_same_state(method.state, direct.state)
    fresh = model.ask(tokenizer, question, max_new_tokens=4, do_sample=False)  # no state: an empty memory
    assert fresh.sequences.shape[1] <= 4 and int(fresh.state.tokens) > 0


@pytest.mark.parametrize("messages", ["", "   \n", []])
def test_an_empty_question_is_refused(model, tokenizer, messages):
    with pytest.raises(ValueError, match=r"empty"):
        ask(model, tokenizer, messages, max_new_tokens=2)
    with pytest.raises(ValueError):
        model.ask(tokenizer, messages, max_new_tokens=2)


def test_without_a_chat_template_plain_question_turns_cut_at_the_next_question(model, tokenizer, monkeypatch):
    turn = ask_turn(tokenizer, "  who wrote it? ")
    assert turn.text == PLAIN_TURN.format(message="who wrote it?") == "\n\nQuestion: who wrote it?\nAnswer:"
    assert turn.stops == PLAIN_STOPS == ("\nQuestion:",)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "who?"}]  # fmt: skip
    assert ask_turn(tokenizer, chat).text == "\n\nQuestion: hi\nAnswer:\n\nQuestion: who?\nAnswer:"

    calls = []
    written = encode(tokenizer, " a long context\nQuestion: and more")

    def fake_generate(ids, **kwargs):  # the model writes the next question after its answer
        calls.append((ids, kwargs))
        return SimpleNamespace(sequences=written[None], state=kwargs["state"])

    monkeypatch.setattr(model, "generate", fake_generate)
    answer = ask(model, tokenizer, "who wrote it?", max_new_tokens=12)
    assert answer.text == "a long context"
    ids, kwargs = calls[0]
    assert tokenizer.decode(ids[0]) == PLAIN_TURN.format(message="who wrote it?")
    assert kwargs["stop_strings"] == ["\nQuestion:"] and kwargs["tokenizer"] is tokenizer


def test_extra_stop_strings_end_the_answer(model, tokenizer, document):
    free = ask(model, tokenizer, "what reads?", document, max_new_tokens=16, do_sample=False)
    assert len(free.text) >= 4, free.text
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    cut = ask(
        model, tokenizer, "what reads?", document, stop_strings=[stop], max_new_tokens=16, do_sample=False
    )
    assert cut.text == free.text.split(stop)[0].strip()
    assert cut.sequences.shape[1] <= free.sequences.shape[1]


def test_a_chat_template_is_used_when_the_tokenizer_has_one(model, tokenizer, monkeypatch):
    tokenizer.chat_template = TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who wrote it?"}]
    turn = ask_turn(tokenizer, messages)
    expected = "\n<|system|>be brief\n<|user|>who wrote it?\n<|assistant|>"
    assert turn.text == expected and turn.stops == ()
    assert ask_turn(tokenizer, "who wrote it?").text == "\n<|user|>who wrote it?\n<|assistant|>"

    read, generate = [], model.generate
    monkeypatch.setattr(
        model, "generate", lambda ids, **kwargs: read.append((ids, kwargs)) or generate(ids, **kwargs)
    )
    answer = ask(model, tokenizer, messages, **GREEDY)
    ids, kwargs = read[0]
    assert tokenizer.decode(ids[0]) == expected and kwargs["stop_strings"] is None
    assert int(answer.state.tokens) == 2 * ids.shape[1] + answer.sequences.shape[1]
