"""Generation: greedy output is the argmax of reading the growing text, across segment boundaries."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import ARCHS, ATOL, random_ids, tiny_hmt


def count_cached_steps(monkeypatch) -> list[int]:
    """Record every token read through the segment's KV cache."""
    from hmt.generation import SegmentCache

    calls: list[int] = []
    step = SegmentCache.step

    def counted(self, token, active):
        calls.append(int(active.sum()))
        return step(self, token, active)

    monkeypatch.setattr(SegmentCache, "step", counted)
    return calls


def greedy_by_rereading(model, prompt: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """The reference: each next token is the argmax after one forward call over the whole text so far."""
    text = prompt
    for _ in range(steps):
        logits = model(text, **kwargs).state.next_token_logits
        text = torch.cat([text, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return text[:, prompt.shape[1] :]


MODES = ["hmt", "rmt", "sliding", "backbone", "memory_off", "hmt+sink"]


@pytest.mark.parametrize("arch_mode", [(arch, "hmt") for arch in ARCHS] + [("llama", m) for m in MODES[1:]])
def test_greedy_equals_the_argmax_of_reading_the_growing_text(arch_mode, monkeypatch):
    arch, mode = arch_mode
    mode, _, sink = mode.partition("+")
    model = tiny_hmt(arch, mode=mode, attention_sink=bool(sink))
    cached_steps = count_cached_steps(monkeypatch)
    prompt = random_ids(1, 11)
    with torch.no_grad():
        expected = greedy_by_rereading(model, prompt, 20)  # 31 tokens: segments 2, 3 and 4 close meanwhile
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert out.sequences.tolist() == expected.tolist()
    assert len(cached_steps) >= 14  # tokens inside a segment go through the KV cache, not a forward call
    with torch.no_grad():
        read = model(torch.cat([prompt, out.sequences], dim=1)).state
    for name, tensor in read.tensors().items():
        torch.testing.assert_close(getattr(out.state, name), tensor, atol=ATOL, rtol=0, msg=name)


def test_generation_continues_a_state_and_a_conversation():
    model = tiny_hmt("llama")
    document, question = random_ids(1, 37, seed=2), random_ids(1, 5, seed=3)
    with torch.no_grad():
        state = model(document).state
        expected = greedy_by_rereading(model, torch.cat([document, question], 1), 6)
    first = model.generate(question, state=state, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert first.sequences.tolist() == expected.tolist()
    follow_up = random_ids(1, 4, seed=4)
    second = model.generate(
        follow_up, state=first.state, max_new_tokens=3, do_sample=False, eos_token_id=None
    )
    with torch.no_grad():
        whole = torch.cat([document, question, first.sequences, follow_up], 1)
        assert second.sequences.tolist() == greedy_by_rereading(model, whole, 3).tolist()
    assert state.tokens.item() == 37  # the caller's state is not changed


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_hmt("gpt2")
    long_prompt, short_prompt = random_ids(1, 13, seed=5), random_ids(1, 6, seed=6)
    ids = torch.cat([long_prompt, torch.cat([torch.zeros(1, 7, dtype=torch.long), short_prompt], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate([long_prompt, short_prompt]):
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        got = batched.state.select([row])
        assert torch.equal(got.pending_tokens(0), alone.state.pending_tokens(0))
        torch.testing.assert_close(
            got.memories[0, got.memory_mask[0]], alone.state.memories[0], atol=ATOL, rtol=0
        )


def test_eos_stops_a_row_and_pads_it_while_the_other_goes_on():
    model = tiny_hmt("llama")
    prompts = torch.cat([random_ids(1, 9, seed=7), random_ids(1, 9, seed=8)])
    free = model.generate(prompts, max_new_tokens=10, do_sample=False, eos_token_id=None)
    stop_id = int(free.sequences[0, 3])
    out = model.generate(prompts, max_new_tokens=10, do_sample=False, eos_token_id=stop_id, pad_token_id=0)
    first_stop = free.sequences[0].tolist().index(stop_id)
    assert out.sequences[0, : first_stop + 1].tolist() == free.sequences[0, : first_stop + 1].tolist()
    assert (out.sequences[0, first_stop + 1 :] == 0).all()
    assert out.state.tokens[0].item() == 9 + first_stop + 1  # the stop token is read, the padding is not
    if stop_id not in free.sequences[1].tolist():
        assert out.sequences[1].tolist() == free.sequences[1].tolist()


def test_sampling_uses_transformers_processors_and_the_seed():
    model = tiny_hmt("llama")
    prompt = random_ids(1, 6)
    settings = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(0)
    first = model.generate(prompt, **settings).sequences
    torch.manual_seed(0)
    again = model.generate(prompt, **settings).sequences
    assert torch.equal(first, again)
    top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1).sequences
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False).sequences
    assert torch.equal(top1, greedy)  # top-k of 1 leaves sampling no choice


def test_repetition_penalty_changes_greedy_output():
    model = tiny_hmt("llama")
    prompt = random_ids(1, 6)
    plain = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None).sequences
    penalised = model.generate(
        prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, repetition_penalty=50.0
    ).sequences
    assert len(set(penalised[0].tolist())) >= len(set(plain[0].tolist()))
    assert not torch.equal(plain, penalised)


def test_streamer_sees_the_prompt_then_each_token():
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny_hmt("llama")
    prompt, recorder = random_ids(1, 5), Recorder()
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=recorder)
    assert recorder.puts[0] == prompt.tolist() and recorder.ended
    assert [p[0] for p in recorder.puts[1:]] == out.sequences[0].tolist()


def test_bad_generation_arguments_are_named():
    model = tiny_hmt("llama")
    prompt = random_ids(1, 5)
    with pytest.raises(ValueError, match="unknown generation arguments \\['temprature'\\]"):
        model.generate(prompt, temprature=0.5)
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(prompt, num_beams=2)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        model.generate(prompt, stop_strings=["\n"])
    with pytest.raises(ValueError, match="causal recall query"):
        tiny_hmt("llama", recall_query="paper").generate(prompt, max_new_tokens=2)


def test_min_new_tokens_and_no_repeat_ngram_size_are_carried_out():
    model = tiny_hmt("llama").eval()
    prompt = random_ids(1, 6, seed=2)
    first = int(model.generate(prompt, max_new_tokens=1, do_sample=False).sequences[0, 0])
    assert model.generate(prompt, max_new_tokens=8, eos_token_id=first).sequences.shape[1] == 1
    held = (
        model.generate(prompt, max_new_tokens=8, eos_token_id=first, min_new_tokens=4).sequences[0].tolist()
    )
    assert len(held) >= 4 and first not in held[:3]
    text = (
        prompt[0].tolist()
        + model.generate(prompt, max_new_tokens=30, no_repeat_ngram_size=2).sequences[0].tolist()
    )
    bigrams = list(itertools.pairwise(text))
    assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize(
    "settings",
    [
        {"output_scores": True},
        {"return_dict_in_generate": True},
        {"max_length": 50},
        {"num_return_sequences": 2},
    ],
)
def test_generation_settings_it_does_not_carry_out_are_refused(settings):
    from transformers import GenerationConfig

    model = tiny_hmt("llama")
    with pytest.raises(ValueError, match=r"not supported|do not support"):
        model.generate(random_ids(1, 4), **settings)
    with pytest.raises(ValueError, match=r"not supported|do not support"):
        model.generate(random_ids(1, 4), generation_config=GenerationConfig(**settings))


def test_generation_forms_each_segments_query_once_and_answers_the_same(monkeypatch):
    """Reading a segment and building its cache need the same recall query: generation keeps it."""
    from contextlib import nullcontext

    model = tiny_hmt("llama", segment_length=8, summary_length=3)
    prompt = random_ids(1, 13)
    queries_run = []
    original = model._backbone_states
    model._backbone_states = lambda seqs, lengths: queries_run.append(len(seqs)) or original(seqs, lengths)
    settings = {"max_new_tokens": 20, "do_sample": False, "eos_token_id": None}
    kept = model.generate(prompt, **settings)
    with_memo = sum(queries_run)
    queries_run.clear()
    monkeypatch.setattr(type(model), "remembering_queries", lambda self: nullcontext())
    again = model.generate(prompt, **settings)
    assert torch.equal(kept.sequences, again.sequences)
    torch.testing.assert_close(kept.state.memories, again.state.memories, atol=ATOL, rtol=0)
    assert with_memo < sum(queries_run)  # 20 tokens after 13 cross segments at 16, 24 and 32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_segment_closes_through_the_cache_without_a_forward_call(arch, monkeypatch):
    """The token that fills a segment and the r write slots after it are read through the KV cache: the
    forward pass runs once (the prompt), and the state equals reading everything in one call, also for rows
    of a batch that close at different steps."""
    model = tiny_hmt(arch, memory_tokens=3, attention_sink=True)
    prompts = [random_ids(1, 13, seed=5), random_ids(1, 6, seed=6)]
    ids = torch.cat([prompts[0], torch.cat([torch.zeros(1, 7, dtype=torch.long), prompts[1]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    forward_calls = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, *a, **k: forward_calls.append(1) or forward(self, *a, **k)
    )
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert len(forward_calls) == 1  # 30 new tokens close several segments in each row
    monkeypatch.setattr(type(model), "forward", forward)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            read = model(torch.cat([prompt, out.sequences[row : row + 1]], dim=1)).state
        got = out.state.select([row])
        assert int(got.segments[0]) == int(read.segments[0]) >= 3
        torch.testing.assert_close(got.memories[0, got.memory_mask[0]], read.memories[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got.next_token_logits, read.next_token_logits, atol=ATOL, rtol=0)
        assert torch.equal(got.pending_tokens(0), read.pending_tokens(0))
