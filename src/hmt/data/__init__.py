"""Data for evaluation and training: documents from a source, fixed splits, token streams and probes."""

from hmt.data.corpus import (
    BUNDLED_CORPORA,
    SPLITS,
    Document,
    describe_split_rule,
    load_documents,
    resolve_split,
    split_documents,
    token_stream,
)
from hmt.data.transforms import dilate, filler_mask, interleave

__all__ = [
    "BUNDLED_CORPORA",
    "SPLITS",
    "Document",
    "describe_split_rule",
    "dilate",
    "filler_mask",
    "interleave",
    "load_documents",
    "resolve_split",
    "split_documents",
    "token_stream",
]
