"""Write a local lm-eval task of rolling perplexity over long documents, then run it through HMT.

    python examples/lm_eval/document_task.py --data essays --split test --out runs/lm-eval-tasks
    hmt lm-eval --model hmt --model_args dtype=fp32 --include_path runs/lm-eval-tasks \\
        --tasks essays_test --batch_size 1

--data takes what `hmt eval --data` takes (essays, plays, a text file, a folder, a .jsonl file,
hf:NAME[:CONFIG]:SPLIT); each document becomes one rolling-perplexity request, read whole.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hmt.data.corpus import load_documents, resolve_split
from hmt.harness import write_document_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="essays")
    parser.add_argument(
        "--split", default=None, help="train, validation, test or all (default: test for bundled)"
    )
    parser.add_argument("--out", required=True, help="folder for NAME.yaml and NAME.jsonl")
    parser.add_argument("--name", default=None, help="task name (default: DATA_SPLIT)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    documents = load_documents(args.data, args.split)
    split = resolve_split(args.data, args.split)
    name = args.name or re.sub(r"\W", "_", f"{Path(args.data).stem}_{split}")
    task = write_document_task(args.out, name, [doc.text for doc in documents], overwrite=args.overwrite)
    print(f"wrote {task} ({len(documents)} documents): --include_path {task.parent} --tasks {name}")


if __name__ == "__main__":
    main()
