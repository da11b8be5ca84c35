"""A tiny random Llama and its tokenizer, saved as `save_pretrained` writes them: the backbone of the
server load test's tiny-model row (what it measures is the server, not the model).

    python -m benchmarks.tiny_model runs/tiny-llama
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

WORDS = [
    "memory", "segment", "context", "model", "token", "read", "recall", "summary", "window", "long", "short",
    "page", "book", "river", "letter", "number", "city", "name", "garden", "morning", "evening", "story",
]  # fmt: skip


def build(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(20)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["</s>"], show_progress=False)  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.folder, args.seed))


if __name__ == "__main__":
    main()
