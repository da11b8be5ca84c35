"""The one-segment pass-key probe's samples: the key sits in segment 0 before its sensory window."""

from __future__ import annotations

import torch

from conftest import tiny_tokenizer, word_text
from experiments.key_probe import make_sample


def test_the_key_is_out_of_the_sensory_window_and_only_the_answer_is_scored():
    tok = tiny_tokenizer()
    stream = torch.tensor(tok(" ".join(word_text(i, 300) for i in range(4)))["input_ids"])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids, labels = make_sample(tok, stream, g, length=256, sensory=32)
        answer = ids[labels != -100]
        key = tok.decode(answer).strip()
        assert len(key) == 5 and key.isdigit()
        first = tok.decode(ids[:256])
        assert f"pass key is {key}" in first and key not in tok.decode(ids[256 - 32 : 256])
        assert torch.equal(labels[-len(answer) :], ids[-len(answer) :])
