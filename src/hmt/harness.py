"""lm-evaluation-harness model "hmt": any harness task read through HMT's memory, with no context limit.

Importing this module registers the model with lm-eval (which has no plugin discovery): `hmt lm-eval
--model hmt --model_args ... --tasks ...` takes lm-eval's own arguments and does that for you; from Python,
`import hmt.harness` and then `lm_eval.simple_evaluate(model="hmt", ...)`. lm-eval is imported only here.

- `loglikelihood`: the context is read into memory once (whatever its length, and once for all the
  continuations asked after it, as multiple-choice tasks do), then each continuation is read on from
  that memory and scored.
- `loglikelihood_rolling`: the whole document streamed through memory, every token scored once against
  the prediction before it (the first against the prefix token): the same token losses as `hmt eval`.
- `generate_until`: the model's streaming generation, batched with left padding.

Reading always uses the causal recall query (as `hmt read`/`ask` do): with it a text read in pieces equals
one call, which the continuation scoring and generation rely on.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from hmt.sampling import Sampling

SHIPPED = "shipped"  # adapter= default: the adapter shipped for the default backbone
GENERATION_KEYS = frozenset(
    {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
     "repetition_penalty"}
)  # fmt: skip
DEFAULT_MAX_GEN_TOKS = 256
LM_EVAL_DEFAULT_DEVICES = frozenset({"cuda", "cuda:0"})  # lm-eval's --device when none is given


@register_model("hmt")
class HMTLM(TemplateLM):
    """An HMT model (backbone + adapter) for lm-eval. Model args: `backbone` (default SmolLM2-135M),
    `adapter` (a folder or Hub id; default the shipped one; `none`: untrained memory), any HMTConfig
    setting read as JSON (`segment_length`, `cache_size`, ...; over an adapter only its reading settings),
    `mode` (hmt, rmt, memory_off, sliding, backbone), `dtype`, `seed`;
    lm-eval's `--device` (without it, or with its default cuda:0 on a machine without CUDA: the CPU) and
    `--batch_size` (an integer) are honoured."""

    def __init__(
        self,
        backbone: str | None = None,
        adapter: str | None = SHIPPED,
        mode: str = "hmt",
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        seed: int = 0,
        model: Any = None,
        tokenizer: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        from hmt.config import check_mode

        self.batch_size = _batch_size(batch_size)
        self.mode = check_mode(mode)
        if model is not None and settings:
            raise ValueError(
                f"reading settings {sorted(settings)} apply to a model hmt loads, not to one given"
            )
        if model is not None:  # an HMTForCausalLM built in Python (tests, notebooks)
            if tokenizer is None:
                raise ValueError("give the tokenizer with the model")
            if model.config.recall_query != "causal":
                raise ValueError(
                    "the hmt harness model reads with the causal recall query: build the model with "
                    "recall_query='causal', or create HMTLM inside `with model.reading(recall_query='causal'):`"
                )
            self.model, self.tokenizer, self.backbone_name = model, tokenizer, "given"
        else:
            self._load(backbone, adapter, settings, dtype, device, seed)
        self.model.eval()
        self._device = self.model.device

    def _load(self, backbone, adapter, settings: dict[str, Any], dtype, device, seed) -> None:
        from hmt.config import parse_settings
        from hmt.loading import load_model

        if device in LM_EVAL_DEFAULT_DEVICES and not torch.cuda.is_available():
            # lm-eval passes "cuda:0" when --device is not given; its own hf model then uses the CPU too.
            logging.getLogger(__name__).warning("no CUDA GPU here: the hmt model runs on the CPU")
            device = None
        # lm-eval hands model args over as text: each is read as JSON, as `--set KEY=VALUE` is.
        reading = parse_settings([f"{key}={value}" for key, value in settings.items()])
        loaded = load_model(
            backbone, adapter=None if adapter == SHIPPED else (adapter or "none"),
            settings=reading | {"recall_query": "causal"}, dtype=dtype, device=device, seed=int(seed),
        )  # fmt: skip
        self.model, self.tokenizer, self.backbone_name = loaded.model, loaded.tokenizer, loaded.backbone.name
        self.adapter = loaded.adapter

    # ---- what lm-eval asks of a model -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        adapter = getattr(self, "adapter", None)
        return {
            "hmt_backbone": self.backbone_name,
            "hmt_adapter": str(adapter) if adapter is not None else None,
            "hmt_mode": self.mode,
            "hmt_config": self.model.config.to_dict(),
        }

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """Each distinct context read once into memory; its continuations scored from that memory."""
        for (context, continuation), context_ids, continuation_ids in requests:
            if not context_ids or not continuation_ids:
                raise ValueError(f"nothing to score: context {context!r}, continuation {continuation!r}")
        asked: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context -> indices of its requests
        for index, (_, context_ids, _) in enumerate(requests):
            asked[tuple(context_ids)].append(index)
        contexts = sorted(asked, key=len, reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="hmt loglikelihood", disable=disable_tqdm)
        with torch.no_grad():
            for group in _chunks(contexts, self.batch_size):
                ids, mask = _left_padded([list(c) for c in group], self.model.device)
                state = self.model(ids, attention_mask=mask, mode=self.mode, score=False).state
                pairs = [(row, i) for row, context in enumerate(group) for i in asked[context]]
                for chunk in _chunks(pairs, self.batch_size):
                    rows = [row for row, _ in chunk]
                    targets = [requests[i][2] for _, i in chunk]
                    scored = self._continuations(state.select(rows), targets)
                    for (_, i), result in zip(chunk, scored, strict=True):
                        results[i] = result
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                    bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _continuations(self, state, targets: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-probability, greedy?) of each row's continuation read on from its state."""
        ids, mask = _left_padded(targets, self.model.device)
        width = ids.shape[1]
        out = self.model(ids, attention_mask=mask, state=state, mode=self.mode, num_logits=width)
        first = state.next_token_logits.argmax(-1)  # the context's prediction of the first token
        results = []
        for row, target in enumerate(targets):
            n = len(target)
            losses = out.token_losses[row, width - n :]
            guesses = torch.cat([first[row : row + 1], out.logits[row, width - n : width - 1].argmax(-1)])
            greedy = bool((guesses.cpu() == torch.tensor(target)).all())
            results.append((-float(losses.double().sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document read whole through memory, every token scored once (the first after the prefix)."""
        documents = [[self.prefix_token_id, *self.tok_encode(request.args[0])] for request in requests]
        order = sorted(range(len(documents)), key=lambda i: len(documents[i]), reverse=True)
        results: list[float | None] = [None] * len(documents)
        bar = tqdm(total=len(documents), desc="hmt loglikelihood_rolling", disable=disable_tqdm)
        with torch.no_grad():
            for chunk in _chunks(order, self.batch_size):
                ids, mask = _left_padded([documents[i] for i in chunk], self.model.device)
                out = self.model(ids, attention_mask=mask, mode=self.mode, num_logits=0)
                for row, i in enumerate(chunk):
                    total = -float(out.token_losses[row][out.token_mask[row]].double().sum())
                    results[i] = total
                    self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, total)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation from each context, stopped at the task's `until` strings (cut off the answer)."""
        by_settings: dict[str, list[int]] = defaultdict(list)  # requests with the same settings batch
        for index, request in enumerate(requests):
            by_settings[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="hmt generate_until", disable=disable_tqdm)
        for indices in by_settings.values():
            settings, stops = self._generation_settings(requests[indices[0]].args[1])
            indices = sorted(indices, key=lambda i: len(requests[i].args[0]), reverse=True)
            for chunk in _chunks(indices, self.batch_size):
                texts = self._generate([requests[i].args[0] for i in chunk], settings, stops)
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
        if unknown:
            raise ValueError(
                f"generation settings {unknown} are not supported by the hmt model; use {sorted(GENERATION_KEYS)}"
            )
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        eot = self.tokenizer.decode([self.eot_token_id])
        if eot not in stops:
            stops.append(eot)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        sampling = Sampling(
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS))),
            temperature=(temperature or 1.0) if do_sample else 0.0,
            top_p=float(gen_kwargs.get("top_p", 1.0)) if do_sample else 1.0,
            top_k=int(gen_kwargs.get("top_k", 0) or 0) if do_sample else 0,
            repetition_penalty=float(gen_kwargs.get("repetition_penalty", 1.0)),
        )  # fmt: skip
        pad = self.tokenizer.pad_token_id
        settings = sampling.generate_kwargs() | {
            "eos_token_id": self.eot_token_id, "pad_token_id": pad if pad is not None else self.eot_token_id,
        }  # fmt: skip
        return settings, stops

    def _generate(self, contexts: list[str], settings: dict[str, Any], stops: list[str]) -> list[str]:
        encoded = [self.tok_encode(text) or [self.prefix_token_id] for text in contexts]
        ids, mask = _left_padded(encoded, self.model.device)
        out = self.model.generate(
            ids, attention_mask=mask, mode=self.mode, tokenizer=self.tokenizer, stop_strings=stops, **settings
        )
        texts = []
        for row in out.sequences.tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in stops:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def write_document_task(folder: str | Path, name: str, texts: Sequence[str], overwrite: bool = False) -> Path:
    """A local lm-eval task of rolling perplexity over `texts`: FOLDER/NAME.jsonl and FOLDER/NAME.yaml
    (the YAML names the JSON file by absolute path; existing files are kept unless `overwrite`). Run it with `--include_path FOLDER --tasks NAME`;
    lm-eval reports word and byte perplexity and bits per byte, each document read whole."""
    if not name.isidentifier():
        raise ValueError(f"task name must be a Python identifier (letters, digits, _), got {name!r}")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError("no documents to write: every text is empty")
    from hmt.io import write_text_atomic

    folder = Path(folder).resolve()
    data, task = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    for path in (data, task):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: choose another folder or name, or overwrite")
    write_text_atomic(data, "".join(json.dumps({"text": text}) + "\n" for text in texts))
    write_text_atomic(
        task,
        f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    )
    return task


def _left_padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch (pad id 0, masked) and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 1
    text = str(value)
    if text.startswith("auto"):
        raise ValueError(
            "the hmt model takes an integer --batch_size (memory per row is fixed; no auto-tuning)"
        )
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"--batch_size must be an integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {size}")
    return size


__all__ = ["HMTLM"]
