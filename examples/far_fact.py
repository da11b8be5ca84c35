"""Write a long held-out document with one fact far back, and its question, for `hmt read` / `hmt ask`.

    python examples/far_fact.py --tokens 16384 --depth 0 --out runs/demo/far-fact

writes OUT/document.txt (the test split of the bundled essays with a fact from the held-out templates
inserted at DEPTH), OUT/question.txt and OUT/answer.txt (the value the answer must state). `make demo`
reads the document into a session and asks the question through `hmt ask`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hmt.backbone import load_backbone, quiet_transformers
from hmt.data.corpus import load_documents, token_stream
from hmt.facts import FactMaker
from hmt.io import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="Length of the document in tokens.")
    parser.add_argument("--depth", type=float, default=0.0, help="Where the fact sits: 0 start, 1 end.")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/demo/far-fact"))
    args = parser.parse_args()
    quiet_transformers()
    tokenizer = load_backbone(None).tokenizer
    haystack = token_stream(load_documents("essays", "test"), tokenizer)
    maker = FactMaker(tokenizer, haystack, "test")
    sample = maker.sample("fact", args.tokens, args.depth, torch.Generator().manual_seed(args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "document.txt", tokenizer.decode(sample.context))
    write_text_atomic(args.out / "question.txt", sample.question + "\n")
    write_text_atomic(args.out / "answer.txt", ", ".join(sample.values) + "\n")
    print(
        f"{args.out}/document.txt: {len(sample.context):,} tokens; the fact ends {sample.distance:,} tokens "
        f"before the end · question: {sample.question} · answer: {', '.join(sample.values)}"
    )


if __name__ == "__main__":
    main()
