"""HMT in a few lines: wrap a causal LM, read a long input, stream it in chunks, save the adapter.

Runs offline in seconds on a small randomly initialised Llama; swap in any
`AutoModelForCausalLM.from_pretrained(...)` model for real use.
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hmt import HMTConfig, HMTForCausalLM

backbone = AutoModelForCausalLM.from_config(
    LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
)
model = HMTForCausalLM(backbone, HMTConfig(segment_length=128, num_sensory=16, cache_size=32)).eval()
ids = torch.randint(0, 1000, (1, 2000))  # 2,000 tokens: 16 segments of 128

with torch.no_grad():
    # One call over the whole input: per-token losses without keeping every logit.
    out = model(ids)
    print(f"perplexity {out.loss.exp():.1f} over {int(out.token_mask.sum())} tokens")
    print(f"memories cached: {out.state.memories.shape[1]}, logits kept: {tuple(out.logits.shape)}")

    # The same text in chunks (whole segments), carrying the memory state: identical losses.
    state, losses = None, []
    for chunk in ids.split(512, dim=1):
        part = model(chunk, state=state)
        state, losses = part.state, [*losses, part.token_losses]
    print("chunked == one call:", torch.allclose(torch.cat(losses, 1), out.token_losses, atol=1e-5))

    # The same weights read as the controls: the mode is an argument of the call, not a setting.
    for mode in ("rmt", "sliding", "backbone"):
        print(f"{mode}: perplexity {model(ids, mode=mode).loss.exp():.1f}")

with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)  # hmt_config.json + hmt_adapter.safetensors, backbone untouched
    reloaded = HMTForCausalLM.from_pretrained(folder, backbone)
    with torch.no_grad():
        print("saved == loaded:", torch.equal(reloaded(ids).token_losses, out.token_losses))
