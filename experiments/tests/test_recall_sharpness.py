"""The recall-sharpness probe: each variant changes only the answer's recall, and the adapter variant is the
model's own."""

from __future__ import annotations

import torch

from conftest import tiny_tokenizer
from experiments.recall_sharpness import VARIANTS, answer_recall, probe_sample, summarise
from hmt.needle import NeedleConfig, read_context, score_memory_row
from hmt.tasks import RecallTasks

TEXT = " ".join(
    f"the model reads a long context {i % 7}. memory of the segment recall token." for i in range(60)
)


def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hmt import HMTConfig, HMTForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    settings = HMTConfig(
        segment_length=64, num_sensory=4, cache_size=16, memory_tokens=2, recall_temperature=5.0
    )
    return HMTForCausalLM(LlamaForCausalLM(config).eval(), settings).eval()


def test_variants_change_only_the_answers_recall():
    tokenizer = tiny_tokenizer()
    tasks = RecallTasks(tokenizer, torch.tensor(tokenizer(TEXT)["input_ids"]))
    model = tiny_model(tokenizer)
    sample = NeedleConfig(lengths=(384,), depths=(0.5,), trials=1).samples(tasks)[384, 0.5][0]
    result = probe_sample(model, sample, tokenizer)
    reference = score_memory_row(model, sample, "hmt")  # what `hmt needle` scores
    assert (result["adapter"]["exact"], result["adapter"]["rank"]) == (reference.exact, reference.rank)
    assert result["recall"]["slots"] == 6 and 1 <= result["recall"]["fact_rank"] <= 6
    assert 1.0 <= result["recall"]["effective_slots"] <= 6.0
    assert set(summarise([result])) >= set(VARIANTS)

    state = read_context(model, sample, "hmt")
    for variant, fact in (("oracle", state.memories.shape[1] - 2), ("top1", 0)):
        seen: list[torch.Tensor] = []
        with answer_recall(model, variant, fact, seen):
            model.memory.recall(torch.randn(1, 32), state.memories, state.memory_mask)
        weights = seen[0][0]
        assert weights.sum() == 1 and weights.max() == 1  # one memory read whole
        if variant == "oracle":
            assert weights[fact] == 1
    assert "recall" not in vars(model.memory)  # the model's own recall is back
