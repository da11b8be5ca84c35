"""Data for evaluation and training: documents, fixed splits, token streams, probes and training batches.

This package imports nothing else of hmt: it is the bottom layer.
"""

from hmt.data.batches import Batch, BatchSource, RandomWindows, StreamLanes
from hmt.data.corpus import (
    BUNDLED_CORPORA,
    SPLITS,
    Document,
    describe_split_rule,
    load_documents,
    resolve_split,
    split_documents,
    token_stream,
    training_text,
)
from hmt.data.transforms import dilate, filler_mask, interleave

__all__ = [
    "BUNDLED_CORPORA",
    "SPLITS",
    "Batch",
    "BatchSource",
    "Document",
    "RandomWindows",
    "StreamLanes",
    "describe_split_rule",
    "dilate",
    "filler_mask",
    "interleave",
    "load_documents",
    "resolve_split",
    "split_documents",
    "token_stream",
    "training_text",
]
