"""Continuous batching: every row decodes as `generate` would alone, whoever else is in the batch."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import random_ids, tiny_hmt
from hmt.batching import Batch, Row


def alone(model, prompt, state, **settings):
    out = model.generate(prompt[None], state=state, **settings)
    return out.sequences[0].tolist(), out.state


def run_until_done(batch: Batch, joining: dict[int, list[tuple[Row, object]]]) -> list[Row]:
    """Step the batch; at step k the rows in joining[k] join. Returns every finished row."""
    finished, step = [], 0
    while batch.rows or any(k >= step for k in joining):
        for row, state in joining.get(step, []):
            batch.add(row, state)
        finished += batch.step()
        step += 1
    return finished


def assert_same_state(a, b):
    a, b = a.compact(), b.compact()
    for name, tensor in a.tensors().items():
        other = getattr(b, name)
        assert tensor.shape == other.shape, name
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, other, atol=1e-4, rtol=1e-4, msg=name)
        else:
            assert torch.equal(tensor, other), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # two families of attention and cache
def test_rows_joining_and_leaving_decode_as_generate_alone(arch):
    model = tiny_hmt(arch, segment_length=8, num_sensory=2).eval()
    with torch.no_grad():
        read = model(random_ids(1, 21, seed=3)).state  # a memory read before (a session)
    cases = [  # (prompt, state before, max_new_tokens, joins at step)
        (random_ids(1, 5, seed=1)[0], None, 10, 0),
        (random_ids(1, 13, seed=2)[0], read, 6, 0),
        (random_ids(1, 3, seed=4)[0], read, 14, 3),
        (random_ids(1, 9, seed=5)[0], None, 1, 5),
    ]
    batch, joining, rows = Batch(model), {}, []
    for prompt, before, new, at in cases:
        row = Row(prompt_ids=prompt, settings={"max_new_tokens": new, "do_sample": False})
        joining.setdefault(at, []).append((row, batch.start(prompt, before)))
        rows.append(row)
    forward_calls, forward = [], type(model).forward
    type(model).forward = lambda self, *a, **k: forward_calls.append(1) or forward(self, *a, **k)
    try:
        finished = run_until_done(batch, joining)
    finally:
        type(model).forward = forward
    assert not forward_calls  # segments that close mid-batch are written through the cache
    assert sorted(map(id, finished)) == sorted(map(id, rows))
    for row, (prompt, before, new, _) in zip(rows, cases, strict=True):
        tokens, state = alone(model, prompt, before, max_new_tokens=new, do_sample=False)
        assert row.tokens == tokens and row.finish == "length"
        assert_same_state(row.state, state)


def test_a_seeded_sampled_row_draws_the_same_whatever_else_is_in_the_batch():
    model = tiny_hmt("llama").eval()
    prompt = random_ids(1, 6, seed=1)[0]
    settings = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": None}

    def sampled(others: int) -> list[int]:
        batch = Batch(model)
        row = Row(prompt_ids=prompt, settings=settings, seed=7)
        batch.add(row, batch.start(prompt, None))
        for i in range(others):
            other = random_ids(1, 4, seed=10 + i)[0]
            batch.add(Row(prompt_ids=other, settings={**settings, "max_new_tokens": 4}, seed=i),
                      batch.start(other, None))  # fmt: skip
        run_until_done(batch, {})
        return row.tokens

    assert sampled(0) == sampled(3)
    different = Batch(model)
    row = Row(prompt_ids=prompt, settings=settings, seed=8)
    different.add(row, different.start(prompt, None))
    run_until_done(different, {})
    assert row.tokens != sampled(0)  # the seed matters (10 draws at temperature 1.5)


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on():
    model = tiny_hmt("llama").eval()
    prompts = [random_ids(1, 5, seed=s)[0] for s in (1, 2)]
    cancel = threading.Event()
    batch = Batch(model)
    rows = [Row(prompt_ids=p, settings={"max_new_tokens": 15, "do_sample": False}, cancel=c)
            for p, c in zip(prompts, (cancel, None), strict=True)]  # fmt: skip
    for row, prompt in zip(rows, prompts, strict=True):
        batch.add(row, batch.start(prompt, None))
    for _ in range(3):
        assert batch.step() == []
    cancel.set()
    assert batch.step() == [rows[0]] and rows[0].finish == "cancelled" and len(rows[0].tokens) == 3
    run_until_done(batch, {})
    assert rows[1].tokens == alone(model, prompts[1], None, max_new_tokens=15, do_sample=False)[0]


def test_streamers_see_the_prompt_then_each_token_then_the_end():
    model = tiny_hmt("llama").eval()
    seen = []

    class Recorder:
        def put(self, ids):
            seen.append(ids.tolist())

        def end(self):
            seen.append("end")

    prompt = random_ids(1, 4, seed=1)[0]
    batch = Batch(model)
    row = Row(prompt_ids=prompt, settings={"max_new_tokens": 3, "do_sample": False}, streamer=Recorder())
    batch.add(row, batch.start(prompt, None))
    run_until_done(batch, {})
    assert seen == [[prompt.tolist()], *([t] for t in row.tokens), "end"]


@pytest.mark.parametrize("end_segment", [False, True])
def test_prompts_read_together_leave_each_row_as_if_read_alone(end_segment):
    model = tiny_hmt("llama", segment_length=8, num_sensory=2).eval()
    with torch.no_grad():
        read = model(random_ids(1, 13, seed=3)).state
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 11, 6)]
    befores = [None, read, read]
    batch = Batch(model)
    together = batch.start_many(prompts, befores, end_segment=end_segment)
    for prompt, before, state in zip(prompts, befores, together, strict=True):
        assert_same_state(state, batch.start(prompt, before, end_segment=end_segment))
