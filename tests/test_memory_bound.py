"""Inference memory does not grow with the input length (logits are not kept for every segment)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, sys, torch, transformers as tf
from hmt import HMTConfig, HMTForCausalLM
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = HMTForCausalLM(tf.AutoModelForCausalLM.from_config(config).eval(), HMTConfig(segment_length=256))
ids = torch.randint(0, 49152, (1, int(sys.argv[1])))
with torch.no_grad():
    model(ids[:, :512])  # warm up allocator and lazy initialisation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(ids)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_growth_mb(tokens: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tokens)], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_input_length():
    short, long = peak_growth_mb(1024), peak_growth_mb(16384)
    # Keeping every segment's logits would take 16384 * 49152 * 4 bytes = 3 GiB more.
    assert long - short < 64, (short, long)
