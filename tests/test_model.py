"""Equivalences and mechanics of HMTForCausalLM on tiny random backbones (fp32, tolerance 1e-5 unless noted)."""

from __future__ import annotations

import pytest
import torch

from conftest import ATOL, VOCAB, capture_main_inputs, random_ids, tiny_backbone, tiny_hmt
from hmt import HMTConfig, HMTForCausalLM, MemoryState

# ---- memory off == plain backbone ----------------------------------------------------------------


def test_backbone_mode_matches_plain_backbone_within_one_segment(arch):
    model = tiny_hmt(arch, mode="backbone", segment_length=16)
    ids = random_ids(2, 16)
    with torch.no_grad():
        out = model(ids)
        plain = model.backbone(ids)
    torch.testing.assert_close(out.logits, plain.logits, atol=ATOL, rtol=0)
    expected = torch.nn.functional.cross_entropy(
        plain.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    assert not out.token_mask[:, 0].any() and out.token_mask[:, 1:].all()


def test_backbone_mode_reads_independent_windows():
    model = tiny_hmt("llama", mode="backbone", segment_length=8)
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids, return_logits=True)
        windows = [model.backbone(ids[:, s : s + 8]).logits for s in range(0, 20, 8)]
    torch.testing.assert_close(out.logits, torch.cat(windows, dim=1), atol=ATOL, rtol=0)
    # Every token but the first is scored, the first of each window from the previous window's end.
    assert out.token_mask.sum() == 19
    log_probs = torch.log_softmax(windows[0][0, -1], -1)
    torch.testing.assert_close(out.token_losses[0, 8], -log_probs[ids[0, 8]], atol=ATOL, rtol=0)


# ---- streaming: chunks with a carried state == one call ------------------------------------------


@pytest.mark.parametrize("mode", ["rmt", "hmt", "backbone", "sliding", "memory_off", "hmt+sink"])
def test_chunked_calls_equal_one_call(arch, mode):
    mode, _, sink = mode.partition("+")
    model = tiny_hmt(arch, mode=mode, attention_sink=bool(sink))
    ids = random_ids(2, 45)
    with torch.no_grad():
        whole = model(ids, return_logits=True)
        state, losses, masks, logits = None, [], [], []
        for start, stop in [(0, 16), (16, 24), (24, 45)]:  # whole segments, then a ragged tail
            part = model(ids[:, start:stop], state=state, return_logits=True)
            state = part.state
            losses.append(part.token_losses)
            masks.append(part.token_mask)
            logits.append(part.logits)
    torch.testing.assert_close(torch.cat(losses, 1), whole.token_losses, atol=ATOL, rtol=0)
    assert torch.equal(torch.cat(masks, 1), whole.token_mask)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, atol=ATOL, rtol=0)
    for name, tensor in whole.state.tensors().items():
        torch.testing.assert_close(getattr(state, name), tensor, atol=ATOL, rtol=0, msg=name)


def test_reset_rows_start_a_fresh_document():
    model = tiny_hmt("llama")
    ids = random_ids(2, 40)
    with torch.no_grad():
        state = model(ids[:, :24]).state.reset(torch.tensor([True, False]))
        both = model(ids[:, 24:], state=state)
        fresh = model(ids[:1, 24:])
        kept = model(ids[1:, 24:], state=model(ids[1:, :24]).state)
    torch.testing.assert_close(both.token_losses[0], fresh.token_losses[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(both.token_losses[1], kept.token_losses[0], atol=ATOL, rtol=0)


def test_state_saved_to_disk_continues_the_same(tmp_path):
    model = tiny_hmt("llama")
    ids = random_ids(1, 40)
    with torch.no_grad():
        first = model(ids[:, :24])
        first.state.save(tmp_path / "doc.memory.safetensors")
        loaded = MemoryState.load(tmp_path / "doc.memory.safetensors")
        direct = model(ids[:, 24:], state=first.state)
        resumed = model(ids[:, 24:], state=loaded)
    torch.testing.assert_close(resumed.token_losses, direct.token_losses, atol=0, rtol=0)


# ---- batching and padding -------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_equals_each_text_alone(arch, padding_side):
    model = tiny_hmt(arch)
    long_text, short_text = random_ids(1, 37, seed=5)[0], random_ids(1, 21, seed=6)[0]
    pad = torch.zeros(37 - 21, dtype=torch.long)
    if padding_side == "right":
        ids = torch.stack([long_text, torch.cat([short_text, pad])])
        mask = torch.stack([torch.ones(37), torch.cat([torch.ones(21), torch.zeros(16)])]).long()
        short_slice = slice(0, 21)
    else:
        ids = torch.stack([long_text, torch.cat([pad, short_text])])
        mask = torch.stack([torch.ones(37), torch.cat([torch.zeros(16), torch.ones(21)])]).long()
        short_slice = slice(16, 37)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, return_logits=True)
        alone_long = model(long_text[None], return_logits=True)
        alone_short = model(short_text[None], return_logits=True)
    torch.testing.assert_close(batch.token_losses[0], alone_long.token_losses[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        batch.token_losses[1, short_slice], alone_short.token_losses[0], atol=ATOL, rtol=0
    )
    assert not batch.token_mask[1, mask[1] == 0].any()
    torch.testing.assert_close(batch.logits[1, short_slice], alone_short.logits[0], atol=ATOL, rtol=0)
    for row, alone in [(0, alone_long), (1, alone_short)]:
        got = batch.state.select([row])
        valid = got.memory_mask[0]
        torch.testing.assert_close(got.memories[0, valid], alone.state.memories[0], atol=ATOL, rtol=0)
        assert torch.equal(got.recent_ids, alone.state.recent_ids)
        assert torch.equal(got.tokens, alone.state.tokens) and torch.equal(got.segments, alone.state.segments)
    # Recall weights of the short row, over its own memories, match its solo run.
    for step, solo in enumerate(alone_short.recall_weights):
        row_weights = batch.recall_weights[step][1]
        torch.testing.assert_close(
            row_weights[row_weights.shape[0] - solo.shape[1] :], solo[0], atol=ATOL, rtol=0
        )


def test_loss_is_mean_over_scored_tokens_and_labels_are_respected():
    model = tiny_hmt("llama")
    ids = random_ids(2, 30)
    labels = ids.clone()
    labels[:, 10:15] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        plain = model(ids)
    assert not out.token_mask[:, 10:15].any()
    torch.testing.assert_close(out.loss, out.token_losses[out.token_mask].mean(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.token_losses[:, 15:], plain.token_losses[:, 15:], atol=ATOL, rtol=0)


# ---- the four steps --------------------------------------------------------------------------------


@pytest.mark.parametrize("recall_query", ["causal", "paper"])
def test_batched_queries_equal_one_query_pass_per_segment(arch, recall_query):
    model = tiny_hmt(arch, segment_length=8, summary_length=3, recall_query=recall_query)
    ids = random_ids(2, 29)
    from hmt.inputs import pack_inputs

    packed = pack_inputs(ids, None, None, model.vocab_size)
    state = model.empty_state(2)
    with torch.no_grad():
        batched = model._query(packed, state, num_steps=4)
        model.query_batch_size = 1
        one_by_one = model._query(packed, state, num_steps=4)
        embed = model.backbone.get_input_embeddings()
        prompt = model.memory.summary_prompt[None, None, :]
        for row in range(2):
            for step in range(4):
                start = step * 8 if recall_query == "paper" else step * 8 - 3
                if start < 0:  # a causal query before anything was read: nothing to read, recall gives m0
                    assert not batched[row, step].any()
                    continue
                tokens = ids[row : row + 1, start : start + 3]
                inputs = torch.cat([prompt, embed(tokens), prompt], dim=1)
                out = model.backbone(inputs_embeds=inputs, output_hidden_states=True)
                torch.testing.assert_close(
                    batched[row, step], out.hidden_states[-1][0, -1], atol=ATOL, rtol=0
                )
    torch.testing.assert_close(batched, one_by_one, atol=ATOL, rtol=0)


def test_rows_reading_the_same_tokens_share_one_query_pass():
    """Ten candidate answers after one context ask the same query: it runs once, and each row gets it."""
    model = tiny_hmt("llama", segment_length=8, summary_length=3)
    ids = torch.cat([random_ids(1, 20, seed=1).repeat(3, 1), random_ids(1, 20, seed=2)])
    from hmt.inputs import pack_inputs

    packed = pack_inputs(ids, None, None, model.vocab_size)
    state = model.empty_state(4)
    sequences_run = []
    original = model._backbone_states
    model._backbone_states = lambda seqs, lengths: sequences_run.append(len(seqs)) or original(seqs, lengths)
    with torch.no_grad():
        queries = model._query(packed, state, num_steps=3)
    assert sum(sequences_run) == 2 * 2  # steps 1 and 2 (step 0 has nothing before it), two distinct texts
    for row in (1, 2):
        torch.testing.assert_close(queries[row], queries[0], atol=0, rtol=0)
    del model._backbone_states
    with torch.no_grad():
        alone = model._query(pack_inputs(ids[3:], None, None, model.vocab_size), model.empty_state(1), 3)
    torch.testing.assert_close(queries[3], alone[0], atol=ATOL, rtol=0)


def test_an_adapter_remembers_its_query_and_can_be_read_with_the_other(tmp_path):
    model = tiny_hmt("llama", recall_query="paper")
    ids = random_ids(1, 40)
    model.save_pretrained(tmp_path / "ad")
    paper = HMTForCausalLM.from_pretrained(tmp_path / "ad", model.backbone)
    causal = HMTForCausalLM.from_pretrained(tmp_path / "ad", model.backbone, recall_query="causal")
    assert paper.config.recall_query == "paper" and causal.config.recall_query == "causal"
    with torch.no_grad():
        torch.testing.assert_close(paper(ids).token_losses, model(ids).token_losses, atol=ATOL, rtol=0)
        with model.reading(recall_query="causal"):
            torch.testing.assert_close(causal(ids).token_losses, model(ids).token_losses, atol=ATOL, rtol=0)
        assert not torch.allclose(causal(ids).token_losses, paper(ids).token_losses)


def test_causal_recall_never_reads_the_segment_it_serves():
    """Changing the tokens of segment n (and after) leaves the recall of segments <= n unchanged under the
    causal query; under the paper's query the segment's own tokens move its recall."""
    ids = random_ids(1, 40)  # 5 segments of 8
    changed = ids.clone()
    changed[0, 24:] = (changed[0, 24:] + 1) % VOCAB
    for recall_query, moves in (("causal", False), ("paper", True)):
        model = tiny_hmt(
            "llama", segment_length=8, num_sensory=2, summary_length=6, recall_query=recall_query
        )
        with torch.no_grad():
            before = model(ids).recall_weights
            after = model(changed).recall_weights
        torch.testing.assert_close(before[2], after[2], atol=ATOL, rtol=0)  # segment 2 ends before token 24
        assert (not torch.allclose(before[3], after[3], atol=1e-6)) is moves


def test_cache_never_exceeds_its_size_and_keeps_the_newest():
    ids = random_ids(1, 80)  # 10 segments
    with torch.no_grad():
        small = tiny_hmt("llama", mode="rmt", cache_size=3)(ids)
        large = tiny_hmt("llama", mode="rmt", cache_size=100)(ids)
    assert small.state.memories.shape[1] == 3 and large.state.memories.shape[1] == 10
    # rmt reads only the newest memory, so the cache size does not change what is written.
    torch.testing.assert_close(small.state.memories, large.state.memories[:, -3:], atol=ATOL, rtol=0)
    hmt_out = tiny_hmt("llama", cache_size=3)(ids)
    assert max(w.shape[1] for w in hmt_out.recall_weights) == 3
    assert hmt_out.state.memories.shape[1] == 3


def test_recall_weights_are_distributions_over_the_cache():
    model = tiny_hmt("gpt2", cache_size=5)
    with torch.no_grad():
        out = model(random_ids(3, 64))
    assert out.recall_weights[0].shape == (3, 0)  # nothing cached before the first segment
    for step, weights in enumerate(out.recall_weights[1:], start=1):
        assert weights.shape == (3, min(step, 5))
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3), atol=ATOL, rtol=0)


def test_first_segment_reads_m0_and_hmt_reads_the_recalled_mix():
    model = tiny_hmt("llama", num_sensory=2)
    calls = capture_main_inputs(model)
    ids = random_ids(1, 24)
    with torch.no_grad():
        out = model(ids)
    m0 = model.memory.initial_memory
    torch.testing.assert_close(calls[0][0, 0], m0, atol=0, rtol=0)  # read slot
    torch.testing.assert_close(calls[0][0, -1], m0, atol=0, rtol=0)  # write slot starts as the read
    # Segment 2 reads softmax-weighted memories M_0, M_1 (its cache holds exactly these two).
    with torch.no_grad():
        two = model(ids[:, :16])
    mix = (out.recall_weights[2][0, :, None] * two.state.memories[0]).sum(0)
    torch.testing.assert_close(calls[2][0, 0], mix, atol=ATOL, rtol=0)
    # Sensory tokens: the last k tokens of the previous segment sit between the read slot and the text.
    embed = model.backbone.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(calls[1][0, 1:3], embed(ids[0, 6:8]), atol=0, rtol=0)
        torch.testing.assert_close(calls[1][0, 3:11], embed(ids[0, 8:16]), atol=0, rtol=0)
    assert calls[0].shape[1] == 1 + 8 + 1 and calls[1].shape[1] == 1 + 2 + 8 + 1


def test_rmt_mode_feeds_the_previous_memory():
    model = tiny_hmt("qwen2", mode="rmt", num_sensory=0)
    calls = capture_main_inputs(model)
    ids = random_ids(1, 24)
    with torch.no_grad():
        model(ids)
        written = [model(ids[:, : 8 * (n + 1)]).state.memories[0, -1] for n in range(2)]
    torch.testing.assert_close(calls[0][0, 0], model.memory.initial_memory, atol=0, rtol=0)
    torch.testing.assert_close(calls[1][0, 0], written[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(calls[2][0, 0], written[1], atol=ATOL, rtol=0)


def test_sliding_mode_rereads_the_previous_k_tokens_without_memory_slots(arch):
    model = tiny_hmt(arch, mode="sliding", segment_length=8, num_sensory=3)
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids, return_logits=True)
        windows = [
            model.backbone(ids[:, max(s - 3, 0) : s + 8]).logits[:, -min(8, 20 - s) :] for s in (0, 8, 16)
        ]
    torch.testing.assert_close(out.logits, torch.cat(windows, dim=1), atol=ATOL, rtol=0)
    assert out.recall_weights is None and out.state.memories.shape[1] == 0
    with torch.no_grad():  # with k = 0 it is the windowed backbone
        with model.reading(num_sensory=0):
            no_sensory = model(ids).token_losses
            torch.testing.assert_close(
                no_sensory, model(ids, mode="backbone").token_losses, atol=ATOL, rtol=0
            )
        assert model.config.num_sensory == 3  # the setting is back after the block


def test_memory_off_mode_always_reads_m0_and_keeps_no_cache():
    model = tiny_hmt("llama", mode="memory_off", num_sensory=2)
    calls = capture_main_inputs(model)
    ids = random_ids(1, 24)
    with torch.no_grad():
        out = model(ids)
    m0 = model.memory.initial_memory
    for call in calls:
        torch.testing.assert_close(call[0, 0], m0, atol=0, rtol=0)
        torch.testing.assert_close(call[0, -1], m0, atol=0, rtol=0)
    assert out.state.memories.shape[1] == 0 and out.recall_weights is None
    assert calls[1].shape[1] == 1 + 2 + 8 + 1  # sensory tokens are read as in hmt


def test_attention_sink_keeps_the_first_position_fixed(tmp_path):
    model = tiny_hmt("llama", num_sensory=2, attention_sink=True)
    embed = model.backbone.get_input_embeddings()
    bos = model.backbone.config.bos_token_id
    torch.testing.assert_close(model.memory.sink, embed.weight[bos].float(), atol=0, rtol=0)
    calls = capture_main_inputs(model)
    ids = random_ids(1, 24)
    with torch.no_grad():
        out = model(ids)
        plain = tiny_hmt("llama", num_sensory=2)  # the same parameters otherwise (same seed)
        plain_calls = capture_main_inputs(plain)
        plain(ids)
    for call, plain_call in zip(calls, plain_calls, strict=True):
        torch.testing.assert_close(call[0, 0], model.memory.sink, atol=0, rtol=0)
        # then the usual layout: the read slot, sensory and segment tokens, the write slot
        torch.testing.assert_close(call[0, 2:-1], plain_call[0, 1:-1], atol=0, rtol=0)
        assert call.shape[1] == plain_call.shape[1] + 1
    torch.testing.assert_close(calls[0][0, 1:], plain_calls[0][0], atol=0, rtol=0)  # both read m0 first
    model.save_pretrained(tmp_path / "ad")
    loaded = HMTForCausalLM.from_pretrained(tmp_path / "ad", model.backbone)
    assert loaded.config.attention_sink
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, out.token_losses, atol=ATOL, rtol=0)
    model.train()
    model(ids).loss.backward()
    assert model.memory.sink.grad is not None and model.memory.sink.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tied to the parameters"), model.reading(attention_sink=False):
        pass


def test_memory_changes_predictions_in_memory_modes_only():
    ids = random_ids(1, 32)
    modes = [("hmt", True), ("rmt", True), ("memory_off", True), ("backbone", False), ("sliding", False)]
    for mode, should_change in modes:
        model = tiny_hmt("llama", mode=mode)
        with torch.no_grad():
            before = model(ids).token_losses
            model.memory.initial_memory.add_(1.0)
            after = model(ids).token_losses
        assert (not torch.allclose(before, after)) == should_change, mode


# ---- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["llama", "opt"])
def test_gradients_reach_memory_parameters_and_backbone(arch_name):
    model = tiny_hmt(arch_name, cache_size=3).train()
    out = model(random_ids(2, 40), labels=random_ids(2, 40, seed=9))
    out.loss.backward()
    for name, param in model.memory.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert backbone_grads and all(torch.isfinite(g).all() for g in backbone_grads)
    assert sum(float(g.abs().sum()) for g in backbone_grads) > 0


def test_gradient_flows_into_cached_memories_and_stops_at_detached_state():
    model = tiny_hmt("llama", mode="rmt").train()
    ids = random_ids(1, 32)
    first = model(ids[:, :16])
    second = model(ids[:, 16:], state=first.state)
    (written,) = torch.autograd.grad(second.loss, first.state.memories, allow_unused=False)
    assert written.abs().sum() > 0
    cut = model(ids[:, 16:], state=first.state.detach())
    assert cut.loss.grad_fn is not None
    assert torch.autograd.grad(cut.loss, first.state.memories, allow_unused=True)[0] is None


@pytest.mark.parametrize("mode", ["rmt", "hmt"])
def test_truncated_backpropagation_really_cuts_the_graph(mode):
    model = tiny_hmt("llama", mode=mode).train()
    ids = random_ids(1, 32)  # 4 segments of 8
    labels = ids.clone()
    labels[:, :17] = -100  # score only tokens of segments 2 and 3
    m0 = model.memory.initial_memory  # enters through segment 0's read slot only
    full = model(ids, labels=labels)
    (grad,) = torch.autograd.grad(full.loss, m0)
    assert grad.abs().sum() > 0
    cut = model(ids, labels=labels, bptt_depth=2)
    (grad,) = torch.autograd.grad(cut.loss, m0, allow_unused=True)
    assert grad is None or grad.abs().sum() == 0
    torch.testing.assert_close(cut.loss, full.loss)  # the forward pass is unchanged
    deeper = model(ids, labels=labels, bptt_depth=3)
    assert torch.autograd.grad(deeper.loss, m0)[0].abs().sum() > 0  # segment 2 is within 3 of segment 0


# ---- dtypes and devices ----------------------------------------------------------------------------


def test_bf16_backbone_keeps_fp32_memory_parameters_and_matches_fp32():
    from hmt import HMTForCausalLM

    config = HMTConfig(segment_length=8, num_sensory=2, cache_size=4)
    fp32 = HMTForCausalLM(tiny_backbone("llama"), config)
    bf16 = HMTForCausalLM(tiny_backbone("llama", dtype=torch.bfloat16), config)
    bf16.memory.load_state_dict(fp32.memory.state_dict())
    assert all(p.dtype == torch.float32 for p in bf16.memory.parameters())
    ids = random_ids(2, 30)
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids)
    assert b.logits.dtype == torch.bfloat16 and b.state.memories.dtype == torch.float32
    assert torch.isfinite(b.token_losses).all()
    assert abs(a.loss.item() - b.loss.item()) < 0.05 * a.loss.item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_hmt("llama")
    ids = random_ids(2, 30)
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.cuda()(ids.cuda())
    assert gpu.state.memories.device.type == "cuda"
    torch.testing.assert_close(gpu.token_losses.cpu(), cpu.token_losses, atol=1e-4, rtol=0)


# ---- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["llama", "opt"])
def test_save_then_load_gives_identical_outputs(tmp_path, arch_name):
    model = tiny_hmt(arch_name, seed=0)
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(torch.randn_like(p))  # not the fresh initialisation a reload would also draw
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(f.name for f in (tmp_path / "adapter").iterdir()) == [
        "hmt_adapter.safetensors",
        "hmt_config.json",
    ]
    torch.manual_seed(123)
    loaded = HMTForCausalLM.from_pretrained(tmp_path / "adapter", tiny_backbone(arch_name, seed=0))
    assert loaded.config == model.config.replace(hmt_version=loaded.config.hmt_version)
    ids = random_ids(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_losses, model(ids).token_losses, atol=0, rtol=0)


def test_adapter_holds_only_hmt_parameters(tmp_path):
    from safetensors.torch import load_file

    model = tiny_hmt("opt")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "hmt_adapter.safetensors")
    d = 16  # OPT's embedding width; its hidden size is 32, and OPT projects outputs back to 16 itself
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "summary_prompt": (d,),
        "initial_memory": (d,),
        "query_proj.weight": (d, d),
        "key_proj.weight": (d, d),
        "memory_scale": (),
    }


def test_outputs_wider_than_embeddings_are_projected_into_embedding_space():
    from hmt.recall import MemoryParameters

    params = MemoryParameters(embedding_dim=16, output_dim=48, recall_dim=8, embedding_std=0.02)
    memory = params.to_memory(torch.randn(3, 1, 48, dtype=torch.bfloat16))  # one write slot
    assert memory.shape == (3, 16) and memory.dtype == torch.float32
    recalled, weights = params.recall(
        torch.randn(3, 48), torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    )
    assert recalled.shape == (3, 16) and weights.shape == (3, 5)


def test_initialisation_follows_the_embedding_scale():
    model = tiny_hmt("llama")
    std = model.backbone.get_input_embeddings().weight.std().item()
    for param in (model.memory.summary_prompt, model.memory.initial_memory):
        assert 0.3 * std < param.std().item() < 3 * std
    assert model.config.recall_dim == 32 and model.config.embedding_dim == 32
    assert model.config.backbone_type == "llama"


def test_written_memory_is_the_output_at_the_write_slot():
    model = tiny_hmt("gpt_neox", memory_norm="none")
    calls = capture_main_inputs(model)
    ids = random_ids(1, 16)
    with torch.no_grad():
        out = model(ids)
        for step, inputs in enumerate(calls):
            final = model.backbone(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(out.state.memories[0, step], final[0, -1], atol=ATOL, rtol=0)


def test_ragged_batch_continued_over_calls_equals_each_text_alone():
    """After a short row ends, its cache has an empty slot; later recalls must ignore it."""
    model = tiny_hmt("llama", cache_size=6)
    first = random_ids(2, 24, seed=3)
    first_mask = torch.ones_like(first)
    first_mask[1, 10:] = 0  # row 1 reads 10 tokens, row 0 reads 24 (3 segments)
    second = random_ids(2, 24, seed=4)
    with torch.no_grad():
        a = model(first, attention_mask=first_mask)
        b = model(second, state=a.state)
        solo = model(first[1:, :10])
        solo = model(second[1:], state=solo.state)
    torch.testing.assert_close(b.token_losses[1], solo.token_losses[0], atol=ATOL, rtol=0)
    for step, weights in enumerate(solo.recall_weights):
        valid = b.recall_weights[step][1]
        torch.testing.assert_close(valid[valid.shape[0] - weights.shape[1] :], weights[0], atol=ATOL, rtol=0)
        assert valid[: valid.shape[0] - weights.shape[1]].abs().sum() == 0


@pytest.mark.parametrize("arch_name", ["llama", "opt"])
def test_memories_are_brought_to_the_embedding_scale(arch_name):
    ids = random_ids(2, 40)
    embed_norm = None
    for norm in ("learned", "none"):
        model = tiny_hmt(arch_name, memory_norm=norm)
        with torch.no_grad():
            memories = model(ids).state.memories.norm(dim=-1)
            embed_norm = model.backbone.get_input_embeddings()(ids).norm(dim=-1).mean()
        if norm == "learned":  # starts at the measured ratio: within a factor of 2 of the embeddings
            assert 0.5 < float(memories.mean() / embed_norm) < 2
            assert model.memory.memory_scale.requires_grad
        else:
            raw = memories.mean() / embed_norm
    assert raw > 2  # raw final hidden states are much larger than token embeddings


def test_wrapping_leaves_the_backbone_modes_alone():
    backbone = tiny_backbone("gpt2")  # has dropout; eval mode
    backbone.transformer.h[0].train()  # a deliberately mixed state
    before = {name: m.training for name, m in backbone.named_modules()}
    HMTForCausalLM(backbone, HMTConfig(segment_length=8, num_sensory=2))
    assert {name: m.training for name, m in backbone.named_modules()} == before


def test_recall_normalisation_makes_recall_scale_free():
    """With recall_norm the weights do not change when memories and queries are rescaled; without, they do."""
    from hmt.recall import MemoryParameters

    torch.manual_seed(0)
    query, memories, mask = torch.randn(2, 32), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    for recall_norm in (True, False):
        params = MemoryParameters(
            embedding_dim=16, output_dim=32, recall_dim=8, embedding_std=0.02, recall_norm=recall_norm
        )
        _, small = params.recall(query, memories, mask)
        _, large = params.recall(50 * query, 50 * memories, mask)
        assert torch.allclose(small, large, atol=1e-5) == recall_norm


def test_recall_starts_as_a_similarity_search():
    similar = tiny_hmt("llama")
    torch.testing.assert_close(similar.memory.key_proj.weight, similar.memory.query_proj.weight)
    assert similar.memory.key_proj.weight is not similar.memory.query_proj.weight  # tied at the start only
    independent = tiny_hmt("llama", recall_init="independent")
    assert not torch.allclose(independent.memory.key_proj.weight, independent.memory.query_proj.weight)


def test_to_dtype_after_wrapping_reads_as_a_model_built_on_that_dtype():
    """model.to(torch.bfloat16) converts the backbone as transformers would; HMT's own parameters only
    move device and stay float32, unrounded: the same as wrapping a bfloat16 backbone."""
    import copy

    from hmt import HMTForCausalLM

    model = tiny_hmt("llama")
    weights = {k: v.clone() for k, v in model.memory.state_dict().items()}
    built = HMTForCausalLM(copy.deepcopy(model.backbone).to(torch.bfloat16), model.config, mode=model.mode)
    built.memory.load_state_dict(weights)
    converted = model.to(torch.bfloat16)
    assert converted is model and model.dtype == torch.bfloat16
    assert all(
        torch.equal(weights[k], v) and v.dtype == torch.float32 for k, v in model.memory.state_dict().items()
    )
    ids = random_ids(1, 21)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).state.memories, built(ids).state.memories)
    assert torch.equal(
        model.generate(ids, max_new_tokens=5).sequences, built.generate(ids, max_new_tokens=5).sequences
    )
    assert model.float().dtype == torch.float32
