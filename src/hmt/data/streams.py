"""The text an evaluation scores: documents loaded and option specs checked first (before any model
loads), then tokenised into one stream, optionally interleaved with another text or dilated with filler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hmt.data.corpus import Document, load_documents, resolve_split, token_stream
from hmt.data.transforms import dilate, filler_mask, interleave


@dataclass
class EvalText:
    """Documents to read in order, with the topic switches and dilation asked for."""

    data: str
    split: str | None
    documents: list[Document]
    interleave_with: tuple[str, list[Document], int] | None = None  # (spec, documents, every M tokens)
    dilation: tuple[int, int] | None = None  # (every, length) filler tokens
    filler: str = "$"

    @classmethod
    def load(
        cls, data: str, split: str | None = None, *, interleave: str | None = None, dilate: str | None = None,
        filler: str = "$",
    ) -> EvalText:  # fmt: skip
        """Read `data` (see `load_documents`) and check `interleave` (DATA:M) and `dilate` (EVERY:LENGTH)."""
        documents = load_documents(data, split)
        other = None
        if interleave:
            spec, every_text = _pair(interleave, "--interleave", "DATA:M")
            other = (spec, load_documents(spec, split), _positive(every_text, "--interleave", "DATA:M"))
        dilation = None
        if dilate:
            every_text, length_text = _pair(dilate, "--dilate", "EVERY:LENGTH")
            dilation = (
                _positive(every_text, "--dilate", "EVERY:LENGTH"),
                _positive(length_text, "--dilate", "EVERY:LENGTH"),
            )
        return cls(data, split, documents, other, dilation, filler)

    def tokens(
        self, tokenizer: Any, max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(the first `max_tokens` tokens of the stream, which of them to score or None for all, a
        description of the text for reports)."""
        stream = token_stream(self.documents, tokenizer, max_tokens)
        info: dict[str, Any] = {
            "spec": self.data,
            "split": resolve_split(self.data, self.split),
            "documents": len(self.documents),
            "document_names": [d.name for d in self.documents],
            "transforms": {},
        }
        score_mask = None
        if self.interleave_with is not None:
            spec, documents, every = self.interleave_with
            stream = interleave(stream, token_stream(documents, tokenizer, max_tokens), every)
            info["transforms"]["interleave"] = {"with": spec, "every": every, "documents": len(documents)}
        if self.dilation is not None:
            every, length = self.dilation
            filler_ids = torch.tensor(
                tokenizer(self.filler, add_special_tokens=False).input_ids, dtype=torch.long
            )
            text_length = stream.shape[0]
            stream = dilate(stream, filler_ids, every, length)
            score_mask = ~filler_mask(text_length, every, length)
            info["transforms"]["dilate"] = {"every": every, "length": length, "filler": self.filler}
        if stream.shape[0] > max_tokens:
            stream = stream[:max_tokens]
            score_mask = score_mask[:max_tokens] if score_mask is not None else None
        info["tokens"] = int(stream.shape[0])
        info["requested_tokens"] = max_tokens
        return stream, score_mask, info


def _pair(value: str, option: str, form: str) -> tuple[str, str]:
    if ":" not in value:
        raise ValueError(f"{option} takes {form}, got {value!r}")
    head, tail = value.rsplit(":", 1)
    return head, tail


def _positive(text: str, option: str, form: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{option} takes {form} with whole numbers, got {text!r}") from None
    if number < 1:
        raise ValueError(f"{option}: numbers in {form} must be >= 1, got {number}")
    return number
