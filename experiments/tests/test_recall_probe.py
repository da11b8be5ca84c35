"""The recall probe: it keeps the answer segment's query and the fact's slot, and its offline fit learns."""

from __future__ import annotations

import torch

from conftest import tiny_hmt, tiny_tokenizer
from experiments.recall_probe import accuracy, collect, fit, write_accuracy
from hmt.tasks import RecallTasks

TEXT = " ".join(
    f"the model reads a long context {i % 7}. memory of the segment recall token." for i in range(60)
)


def test_collect_keeps_the_answer_segments_recall_inputs():
    tokenizer = tiny_tokenizer()
    tasks = RecallTasks(tokenizer, torch.tensor(tokenizer(TEXT)["input_ids"]))
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    settings = HMTConfig(segment_length=64, num_sensory=4, cache_size=16, memory_tokens=2)
    model = HMTForCausalLM(LlamaForCausalLM(config).eval(), settings).eval()
    data = collect(model, tasks, count=3, segments=4, seed=0)
    assert data["queries"].shape == (3, model.memory.query_proj.in_features)
    slots = data["memories"].shape[1]
    assert slots >= 4 and data["memories"].shape[2] == model.memory_width  # context segments (+ the prompt's)
    assert all(0 <= int(f) < slots for f in data["facts"])
    assert 0.0 <= write_accuracy(model, data)["token_accuracy"] <= 1.0


def test_the_offline_fit_finds_a_planted_fact():
    torch.manual_seed(0)
    model = tiny_hmt(memory_tokens=1)
    n, slots, d = 64, 6, model.memory_width
    queries = torch.randn(n, model.memory.query_proj.in_features)
    memories = torch.randn(n, slots, d)
    facts = torch.randint(0, slots, (n,))
    memories[torch.arange(n), facts] += 3 * queries[:, :d]  # the fact's memory echoes its query
    data = {"queries": queries, "memories": memories, "facts": facts}
    train = {k: v[:48] for k, v in data.items()}
    test = {k: v[48:] for k, v in data.items()}
    result = fit(model.memory, train, test, steps=200, lr=1e-2)
    assert result["final"]["top1"] > 0.9
    assert accuracy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))["chance"] == 0.2
