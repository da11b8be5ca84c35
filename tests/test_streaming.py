"""Streaming: a text split anywhere, carried through the state's unfinished segment, equals one call."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, random_ids, tiny_hmt
from hmt import MemoryState


def read_split(model, ids, bounds, mask=None, **kwargs):
    """Read `ids` in calls over [start, stop) column ranges, carrying the state: joined outputs, state."""
    state, losses, masks, logits = None, [], [], []
    for start, stop in bounds:
        part_mask = mask[:, start:stop] if mask is not None else None
        part = model(ids[:, start:stop], attention_mask=part_mask, state=state, return_logits=True, **kwargs)
        state = part.state
        losses.append(part.token_losses)
        masks.append(part.token_mask)
        logits.append(part.logits)
    return torch.cat(losses, 1), torch.cat(masks, 1), torch.cat(logits, 1), state


def assert_same_state(got: MemoryState, expected: MemoryState) -> None:
    for name, tensor in expected.tensors().items():
        torch.testing.assert_close(getattr(got, name), tensor, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["hmt", "rmt", "sliding", "backbone", "memory_off", "hmt+sink"])
def test_splits_anywhere_equal_one_call(arch, mode):
    mode, _, sink = mode.partition("+")
    model = tiny_hmt(arch, mode=mode, attention_sink=bool(sink))
    ids = random_ids(2, 45)
    with torch.no_grad():
        whole = model(ids, return_logits=True)
        losses, masks, logits, state = read_split(model, ids, [(0, 3), (3, 4), (4, 13), (13, 30), (30, 45)])
    torch.testing.assert_close(losses, whole.token_losses, atol=ATOL, rtol=0)
    assert torch.equal(masks, whole.token_mask)
    torch.testing.assert_close(logits, whole.logits, atol=ATOL, rtol=0)
    assert_same_state(state, whole.state)
    assert state.num_pending.tolist() == [45 % 8] * 2 and state.segments.tolist() == [45 // 8] * 2


def test_one_token_at_a_time_equals_one_call():
    model = tiny_hmt("llama", num_sensory=3, summary_length=5)
    ids = random_ids(1, 27)
    with torch.no_grad():
        whole = model(ids, return_logits=True)
        losses, _, logits, state = read_split(model, ids, [(i, i + 1) for i in range(27)])
    torch.testing.assert_close(losses, whole.token_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, whole.logits, atol=ATOL, rtol=0)
    assert_same_state(state, whole.state)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_split_anywhere_equals_each_text_alone(padding_side):
    model = tiny_hmt("qwen2")
    long_text, short_text = random_ids(1, 30, seed=5)[0], random_ids(1, 19, seed=6)[0]
    pad = torch.zeros(11, dtype=torch.long)
    short_row = torch.cat([short_text, pad]) if padding_side == "right" else torch.cat([pad, short_text])
    ids = torch.stack([long_text, short_row])
    mask = (ids != 0).long() if padding_side == "right" else torch.ones_like(ids)
    if padding_side == "left":
        mask[1, :11] = 0
    else:
        mask[1, 19:] = 0
    bounds = [(0, 5), (5, 17), (17, 30)]
    with torch.no_grad():
        batched, batched_mask, _, state = read_split(model, ids, bounds, mask)
        alone_long = model(long_text[None])
        alone_short = model(short_text[None])
    torch.testing.assert_close(batched[0], alone_long.token_losses[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1][mask[1].bool()], alone_short.token_losses[0], atol=ATOL, rtol=0)
    assert not batched_mask[1][~mask[1].bool()].any()
    for row, alone in [(0, alone_long), (1, alone_short)]:
        got = state.select([row])
        assert torch.equal(got.pending_tokens(0), alone.state.pending_tokens(0))
        assert torch.equal(got.segments, alone.state.segments) and torch.equal(got.tokens, alone.state.tokens)
        valid = got.memory_mask[0]
        torch.testing.assert_close(got.memories[0, valid], alone.state.memories[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["hmt", "rmt", "sliding", "backbone"])
def test_reading_without_scoring_leaves_the_state_a_scoring_call_leaves(mode):
    """score=False (the LM head on one position per row) reads a padded batch, split anywhere, into
    exactly the state of scoring calls, the carried next-token prediction included."""
    model = tiny_hmt("llama", mode=mode)
    ids = random_ids(2, 37, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    bounds = [(0, 5), (5, 16), (16, 17), (17, 37)]
    with torch.no_grad():
        *_, scored = read_split(model, ids, bounds, mask)
        state = None
        for start, stop in bounds:
            out = model(ids[:, start:stop], attention_mask=mask[:, start:stop], state=state, score=False)
            state = out.state
            assert out.loss is None and out.logits is None and not out.token_mask.any()
    assert_same_state(state, scored)
    with pytest.raises(ValueError, match="score=False"):
        model(ids, score=False, return_logits=True)


def test_a_short_segment_stays_pending_until_it_holds_l_tokens():
    model = tiny_hmt("llama")  # L = 8
    with torch.no_grad():
        state = model(random_ids(1, 13)).state
        assert (state.segments.item(), state.num_pending.item(), state.tokens.item()) == (1, 5, 13)
        assert state.num_memories.item() == 1  # the pending segment wrote nothing yet
        state = model(random_ids(1, 3, seed=2), state=state).state
        assert (state.segments.item(), state.num_pending.item(), state.num_memories.item()) == (2, 0, 2)


def test_end_segment_closes_a_short_last_segment():
    model = tiny_hmt("llama")
    ids = random_ids(1, 13)
    with torch.no_grad():
        closed = model(ids, end_segment=True).state
        open_ = model(ids).state
    assert (closed.segments.item(), closed.num_pending.item(), closed.num_memories.item()) == (2, 0, 2)
    assert (open_.segments.item(), open_.num_pending.item()) == (1, 5)
    assert torch.equal(closed.recent_ids[0, -2:], ids[0, -2:])


def test_causal_query_of_the_next_segment_is_what_was_read_before_it():
    """A question read with end_segment is the whole query of the answer's segment."""
    model = tiny_hmt("llama", summary_length=4)
    context, question, answer = random_ids(1, 16), random_ids(1, 4, seed=2), random_ids(1, 3, seed=3)
    with torch.no_grad():
        state = model(context).state
        asked = model(question, state=state, end_segment=True).state
        out = model(answer, state=asked)
        again = model(torch.cat([question, answer], 1), state=state)  # the question is not its own segment
    assert asked.recent_ids[0, -4:].tolist() == question[0].tolist()
    assert out.recall_weights[0].shape[1] == 3 and again.recall_weights[0].shape[1] == 2


def test_saved_state_with_a_pending_segment_continues_the_same(tmp_path):
    model = tiny_hmt("llama")
    ids = random_ids(1, 30)
    with torch.no_grad():
        first = model(ids[:, :11])
        first.state.save(tmp_path / "doc.safetensors")
        loaded = MemoryState.load(tmp_path / "doc.safetensors")
        assert torch.equal(loaded.pending_ids, first.state.pending_ids)
        direct = model(ids[:, 11:], state=first.state)
        resumed = model(ids[:, 11:], state=loaded)
    torch.testing.assert_close(resumed.token_losses, direct.token_losses, atol=0, rtol=0)


def test_a_state_saved_before_pending_segments_loads_with_none(tmp_path):
    from hmt.io import save_tensors
    from hmt.memory import STATE_FORMAT

    state = tiny_hmt("llama")(random_ids(1, 16)).state
    old = {k: v for k, v in state.tensors().items() if not k.startswith("pending")}
    save_tensors(tmp_path / "old.safetensors", old, {"format": STATE_FORMAT})
    loaded = MemoryState.load(tmp_path / "old.safetensors")
    assert loaded.num_pending.tolist() == [0]
    only_ids = {**old, "pending_ids": state.pending_ids}
    save_tensors(tmp_path / "half.safetensors", only_ids, {"format": STATE_FORMAT})
    with pytest.raises(ValueError, match="missing \\['pending_mask'\\]"):
        MemoryState.load(tmp_path / "half.safetensors")


def test_reset_and_forget_treat_the_pending_segment_as_text_read():
    model = tiny_hmt("llama")
    with torch.no_grad():
        state = model(random_ids(2, 12)).state
    assert state.reset(torch.tensor([True, False])).num_pending.tolist() == [0, 4]
    assert state.forget().num_pending.tolist() == [4, 4]


def test_paper_query_is_exact_only_at_segment_boundaries():
    model = tiny_hmt("llama", recall_query="paper")
    ids = random_ids(1, 40)
    with torch.no_grad():
        whole = model(ids)
        at_boundaries, _, _, _ = read_split(model, ids, [(0, 16), (16, 40)])
        early = model(ids[:, :18])  # the third segment's first j tokens are not all there yet
    torch.testing.assert_close(at_boundaries, whole.token_losses, atol=ATOL, rtol=0)
    assert not torch.allclose(early.recall_weights[2], whole.recall_weights[2], atol=1e-3)
