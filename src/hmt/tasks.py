"""Long-range recall tasks: a fact hidden in a long real text, asked about at the end.

Four kinds, each a seeded generator over a haystack of real text (token ids):
- passkey: "The pass key is 12345. Remember it. 12345 is the pass key." (Mohtashami & Jaggi), asked
  "What is the pass key?".
- needle: RULER's "One of the special magic numbers for {word} is: {7 digits}.", asked for that word.
- multikey: 2-4 such needles with distinct words, one asked; the others are among the candidates.
- facts: bAbI qa1 style, people move between places ("Mary went to the kitchen."); "Where is Mary?" asks
  the last place the person went to.

A sample is read as: `context` (the haystack with the facts at sentence boundaries, then the question),
then the answer's own segment, `prompt` + answer. The context ends where a segment ends, so under HMT's
causal recall the answer's segment recalls with the question as its query and the answer never enters a
query. The answer's tokens are what is scored: greedy exact match (teacher-forced argmax on each answer
token, the same event as greedy decoding it) and the rank of the true answer among `candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from hmt.data.batches import Batch, BatchSource, batch_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS: tuple[str, ...] = ("passkey", "needle", "multikey", "facts")
NUM_CANDIDATES = 10

# RULER draws its keys from English words; these are common, distinct and mostly one token.
WORDS: tuple[str, ...] = (
    "apple", "river", "candle", "forest", "garden", "silver", "window", "rocket", "harbor", "violin",
    "desert", "marble", "thunder", "pencil", "castle", "island", "mirror", "planet", "shadow", "bridge",
    "copper", "dragon", "feather", "glacier", "hammer", "jungle", "ladder", "meadow", "needle", "orchid",
    "pepper", "quartz", "saddle", "tunnel", "valley", "walnut", "anchor", "basket", "canyon", "dolphin",
    "engine", "falcon", "ginger", "helmet", "insect", "jacket", "kettle", "lantern", "magnet", "nectar",
    "oyster", "parrot", "rabbit", "salmon", "tiger", "umbrella", "velvet", "wizard", "yellow", "zebra",
)  # fmt: skip
PEOPLE: tuple[str, ...] = ("Mary", "John", "Daniel", "Sandra", "Alice", "Peter", "Emma", "David")
PLACES: tuple[str, ...] = (
    "kitchen", "garden", "office", "bedroom", "bathroom", "hallway", "cellar", "garage", "library", "balcony",
)  # fmt: skip
MOVES: tuple[str, ...] = ("went to", "moved to", "travelled to", "journeyed to")


@dataclass(frozen=True)
class RecallSample:
    """One question over a long context. Token ids are 1-D LongTensors."""

    task: str
    context: torch.Tensor  # haystack with the facts, then the question (read first)
    prompt: torch.Tensor  # starts the answer's segment (e.g. "Answer:"), not scored
    candidates: tuple[torch.Tensor, ...]  # NUM_CANDIDATES possible answers (distinct), each scored whole
    answer_index: int  # which candidate is true
    fact_spans: tuple[tuple[int, int], ...]  # [start, end) of every inserted fact in `context`
    asked_span: tuple[int, int]  # the fact that answers the question (for facts: the person's last move)
    depth: float  # where the asked fact sits in the haystack: 0 = its start, 1 = just before the question

    @property
    def answer(self) -> torch.Tensor:
        return self.candidates[self.answer_index]

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels) of context + prompt + answer; labels score the answer tokens only."""
        ids = torch.cat([self.context, self.prompt, self.answer])
        labels = torch.full_like(ids, -100)
        labels[-len(self.answer) :] = self.answer
        return ids, labels


class RecallTasks:
    """Makes `RecallSample`s of a chosen kind, length and depth from a haystack of token ids.

    >>> tasks = RecallTasks(tokenizer, haystack)
    >>> sample = tasks.sample("needle", context_length=4096, depth=0.5, generator=torch.Generator().manual_seed(0))

    Each sample takes its haystack from a random place of `haystack` (given by the generator), so a
    seed gives the same samples on every machine. Facts go in at sentence boundaries.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, haystack: torch.Tensor) -> None:
        if haystack.dim() != 1 or haystack.numel() == 0:
            raise ValueError("the haystack must be a non-empty 1-D tensor of token ids")
        self.tokenizer = tokenizer
        self.haystack = haystack.long()

    # ---- tokens ----------------------------------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    @cached_property
    def _sentence_ends(self) -> torch.Tensor:
        """(vocab,) bool: tokens that end a sentence (., ! or ?, maybe with a closing quote)."""
        size = max(len(self.tokenizer), int(self.haystack.max()) + 1)
        ends = torch.zeros(size, dtype=torch.bool)
        for token_id in torch.unique(self.haystack).tolist():
            text = self.tokenizer.decode([token_id])
            ends[token_id] = text.rstrip(" \n\"')").endswith((".", "!", "?"))
        return ends

    # ---- samples ---------------------------------------------------------------------------------

    def sample(
        self,
        task: str,
        context_length: int,
        depth: float,
        generator: torch.Generator,
        num_keys: int = 2,
    ) -> RecallSample:
        """A sample whose context (haystack + facts + question) holds exactly `context_length` tokens, the
        asked fact at `depth` (0-1) of the haystack. `num_keys` is the number of needles for multikey."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be between 0 and 1, got {depth}")
        if task == "multikey" and not 2 <= num_keys <= 4:
            raise ValueError(f"multikey takes 2 to 4 keys, got {num_keys}")
        make = {
            "passkey": self._passkey,
            "needle": lambda g: self._needles(g, 1),
            "multikey": lambda g: self._needles(g, num_keys),
            "facts": self._facts,
        }[task]
        return self._assemble(task, context_length, depth, generator, make(generator))

    def _passkey(self, g: torch.Generator):
        values = _distinct_numbers(g, NUM_CANDIDATES, 5)
        key = values[0]
        fact = self.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = self.encode("\n\nWhat is the pass key?")
        prompt = self.encode(" The pass key is")
        return self._finish(g, [fact], 0, question, prompt, values)

    def _needles(self, g: torch.Generator, count: int):
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=g)[:count].tolist()]
        values = _distinct_numbers(g, NUM_CANDIDATES, 7)  # the first `count` are the needles' values
        facts = [
            self.encode(f" One of the special magic numbers for {word} is: {value}.")
            for word, value in zip(words, values, strict=False)
        ]
        asked = int(torch.randint(0, count, (1,), generator=g))
        question = self.encode(
            f"\n\nWhat is the special magic number for {words[asked]} mentioned in the text?"
        )
        prompt = self.encode(f" The special magic number for {words[asked]} is:")
        order = [asked, *(i for i in range(len(values)) if i != asked)]
        return self._finish(g, facts, asked, question, prompt, [values[i] for i in order])

    def _facts(self, g: torch.Generator):
        people = [PEOPLE[i] for i in torch.randperm(len(PEOPLE), generator=g)[:3].tolist()]
        moves = []  # (person, place): each person moves twice, the asked person's last move is asked
        for person in people:
            for place in torch.randint(0, len(PLACES), (2,), generator=g).tolist():
                moves.append((person, PLACES[place]))
        order = torch.randperm(len(moves), generator=g).tolist()
        moves = [moves[i] for i in order]
        person = people[0]
        asked = max(i for i, (who, _) in enumerate(moves) if who == person)
        earlier = tuple(i for i, (who, _) in enumerate(moves) if who == person and i != asked)
        facts = [
            self.encode(f" {who} {MOVES[int(torch.randint(0, len(MOVES), (1,), generator=g))]} the {place}.")
            for who, place in moves
        ]
        question = self.encode(f"\n\nWhere is {person}?")
        prompt = self.encode(f" {person} is in the")
        truth = moves[asked][1]
        places = [truth, *(p for p in PLACES if p != truth)]
        candidates = [self.encode(f" {p}") for p in places]
        return _Facts(facts, asked, question, prompt, candidates, 0, earlier)

    def _finish(self, g, facts, asked, question, prompt, values) -> _Facts:
        """Candidates: the true value first, then the others, shuffled with the generator."""
        candidates = [self.encode(f" {v}") for v in values]
        order = torch.randperm(len(candidates), generator=g).tolist()
        return _Facts(facts, asked, question, prompt, [candidates[i] for i in order], order.index(0))

    def _assemble(
        self, task: str, context_length: int, depth: float, g: torch.Generator, made: _Facts
    ) -> RecallSample:
        """Haystack from a random place, facts at sentence boundaries, the question at the end. Facts other
        than the asked one go anywhere, except those that must come before it (a person's earlier moves)."""
        facts, asked, question = made.facts, made.asked, made.question
        filler = context_length - len(question) - sum(len(f) for f in facts)
        if filler < 1:
            raise ValueError(
                f"context_length {context_length} is too short for a {task} sample "
                f"({context_length - filler + 1} tokens needed)"
            )
        # From a random place; a haystack shorter than the context is read round again (Kamradt repeats his
        # essays the same way), so any length can be asked of any text.
        start = int(torch.randint(0, self.haystack.numel(), (1,), generator=g))
        text = self.haystack[(start + torch.arange(filler)) % self.haystack.numel()]
        boundaries = torch.nonzero(self._sentence_ends[text]).flatten() + 1  # insert before these positions
        boundaries = torch.cat([torch.tensor([0]), boundaries[boundaries < filler], torch.tensor([filler])])
        at_asked = int(boundaries[(boundaries.float() - depth * filler).abs().argmin()])
        places = []
        for i in range(len(facts)):
            if i == asked:
                places.append(at_asked)
            elif i in made.before_asked:
                earlier = boundaries[boundaries <= at_asked]
                places.append(int(earlier[_pick(g, len(earlier))]))
            else:
                places.append(int(boundaries[_pick(g, len(boundaries))]))
        # Insert in order of position (ties keep the facts' order), tracking where each fact lands.
        pieces, spans, cursor, length = [], [None] * len(facts), 0, 0
        for i in sorted(range(len(facts)), key=lambda i: (places[i], i)):
            pieces.append(text[cursor : places[i]])
            length += places[i] - cursor
            cursor = places[i]
            spans[i] = (length, length + len(facts[i]))
            pieces.append(facts[i])
            length += len(facts[i])
        pieces += [text[cursor:], question]
        context = torch.cat(pieces)
        if context.numel() != context_length:
            raise AssertionError("assembled context has the wrong length")
        return RecallSample(
            task=task,
            context=context,
            prompt=made.prompt,
            candidates=tuple(made.candidates),
            answer_index=made.answer_index,
            fact_spans=tuple(spans),
            asked_span=spans[asked],
            depth=depth,
        )


@dataclass(frozen=True)
class _Facts:
    """What a task puts in a sample before the haystack is chosen."""

    facts: list[torch.Tensor]
    asked: int
    question: torch.Tensor
    prompt: torch.Tensor
    candidates: list[torch.Tensor]
    answer_index: int
    before_asked: tuple[int, ...] = ()  # facts that must come before the asked one


def _pick(g: torch.Generator, count: int) -> int:
    return int(torch.randint(0, count, (1,), generator=g))


def _distinct_numbers(g: torch.Generator, count: int, digits: int) -> list[str]:
    """`count` distinct random numbers of exactly `digits` digits (no leading zero), as strings."""
    low, high = 10 ** (digits - 1), 10**digits
    values: list[str] = []
    while len(values) < count:
        value = str(int(torch.randint(low, high, (1,), generator=g)))
        if value not in values:
            values.append(value)
    return values


class TaskBatches:
    """Training batches of recall samples (a `BatchSource` for `hmt.train.train`).

    A sample's context fills the batch window (whole segments, the question at its end) and the answer's
    segment follows; only the answer is scored. HMT's gradient shortcut: only the segments holding the
    asked fact, the question and the answer are recorded for backward, so a sample costs about three
    backward segments whatever the distance. The kind, depth (uniform in [0, max_depth]: below 1, facts
    stay out of the question's own segment, where the window reads them without memory) and, for
    multikey, the number of keys (2-4) of each sample are drawn from its seed. With `text`, every
    `text_every`-th batch is plain text instead (all tokens scored), so training on recall does not cost
    reading.
    """

    streaming = False

    def __init__(
        self,
        tasks: RecallTasks,
        kinds: tuple[str, ...] | list[str],
        segment_length: int,
        batch_size: int,
        seed: int,
        text: BatchSource | None = None,
        text_every: int = 0,
        rank: int = 0,
        world: int = 1,
        max_depth: float = 1.0,
    ) -> None:
        if not 0 < max_depth <= 1:
            raise ValueError(f"max_depth is a fraction in (0, 1], got {max_depth}")
        unknown = sorted(set(kinds) - set(TASKS))
        if not kinds or unknown:
            raise ValueError(f"recall tasks must be among {', '.join(TASKS)}, got {list(kinds)}")
        if text_every < 0 or (text_every > 0 and text is None):
            raise ValueError("text_every needs a text source and must be >= 0")
        self.tasks, self.kinds, self.segment_length = tasks, tuple(kinds), segment_length
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.text, self.text_every, self.max_depth = text, text_every, max_depth

    def batch(self, index: int, window: int) -> Batch:
        if self.text is not None and self.text_every and index % self.text_every == self.text_every - 1:
            return self.text.batch(index, window)
        if window % self.segment_length:
            raise ValueError(f"a recall sample's context is whole segments; got a window of {window} tokens")
        g = torch.Generator().manual_seed(batch_seed(self.seed, index, self.rank, self.world))
        samples = []
        for _ in range(self.batch_size):
            kind = self.kinds[_pick(g, len(self.kinds))]
            depth = float(torch.rand(1, generator=g)) * self.max_depth
            samples.append(self.tasks.sample(kind, window, depth, g, num_keys=2 + _pick(g, 3)))
        return self.collate(samples)

    def collate(self, samples: list[RecallSample]) -> Batch:
        """Right-padded ids, labels on the answers, attention mask and the segments to record."""
        sequences = [sample.sequence() for sample in samples]
        width = max(len(ids) for ids, _ in sequences)
        length = self.segment_length
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        record = torch.zeros(len(samples), -(-width // length), dtype=torch.bool)
        answers = torch.full((len(samples), max(len(s.answer) for s in samples)), -100, dtype=torch.long)
        fact_segments = torch.tensor([(s.asked_span[1] - 1) // length for s in samples])
        for row, (sample, (row_ids, row_labels)) in enumerate(zip(samples, sequences, strict=True)):
            ids[row, : len(row_ids)], labels[row, : len(row_ids)], mask[row, : len(row_ids)] = (
                row_ids,
                row_labels,
                1,
            )
            first, last = sample.asked_span
            record[row, first // length : (last - 1) // length + 1] = True  # the asked fact
            record[row, (len(sample.context) - 1) // length :] = True  # the question and the answer
            answers[row, : len(sample.answer)] = sample.answer
        reset = torch.ones(len(samples), dtype=torch.bool)
        return Batch(ids, labels, reset, mask, record, answers, fact_segments)


class RecallSupervision:
    """Auxiliary training terms for recall tasks (an `hmt.train.AuxiliaryLoss`), each optional:

    - answer in memory (`answer_weight`): the memory written by the segment holding the asked fact,
      brought back to hidden-state scale, is read by the backbone's own LM head, and its slot i must
      predict the answer's token i (for the first `memory_tokens` answer tokens). This tells the write
      what to gather: without it, a write and a read that both start random must find each other through
      the answer's loss alone, and in our one-segment probe neither moved in 150 steps (docs/results.md).
    - recall (`recall_weight`): cross-entropy of the answer segment's recall weights against the fact's
      memory (the official code's QA loss). Its gradient reaches the fact's score even when recall has
      saturated on another entry, where the answer's loss gets none through a weight of 1e-20.

    Needs memories as wide as the LM head's input, and a cache that still holds the fact's memory.
    The training log gets each term apart (`drain_terms`), with the answer's own loss on recall batches.
    """

    name = "recall_supervision"
    needs_logits = False
    weight = 1.0  # each term carries its own weight

    def __init__(self, answer_weight: float, recall_weight: float = 0.0) -> None:
        if answer_weight < 0 or recall_weight < 0 or answer_weight + recall_weight == 0:
            raise ValueError("recall supervision needs weights >= 0, at least one of them > 0")
        self.answer_weight, self.recall_weight = answer_weight, recall_weight
        self._terms: dict[str, list[float]] = {}

    def drain_terms(self) -> dict[str, float]:
        """Mean of each term (unweighted) since the last call: answer_loss, answer_in_memory, recall_ce."""
        means = {name: sum(values) / len(values) for name, values in self._terms.items() if values}
        self._terms = {}
        return means

    def _keep(self, name: str, value: torch.Tensor) -> None:
        self._terms.setdefault(name, []).append(float(value.detach()))

    def __call__(self, model, batch: Batch, labels: torch.Tensor, out) -> torch.Tensor | None:
        if batch.answer_ids is None or batch.fact_segments is None:
            return None  # a plain-text batch
        memories = out.state.memories  # (batch, slots, r * d), the newest last; one per closed segment
        # The answer's segment is still open, so the newest memory is the question's segment's.
        back = out.state.segments - batch.fact_segments.to(memories.device)  # how many slots from the end
        if int(back.max()) > memories.shape[1]:
            return None  # the fact's memory was evicted (a cache smaller than the sample)
        rows = torch.arange(memories.shape[0], device=memories.device)
        total = memories.new_zeros(())
        if out.loss is not None:
            self._keep("answer_loss", out.loss)
        if self.answer_weight:
            term = self._answer_term(model, batch, memories[rows, memories.shape[1] - back])
            self._keep("answer_in_memory", term)
            total = total + self.answer_weight * term
        if self.recall_weight and out.recall_weights:
            weights = out.recall_weights[-1]  # the answer's segment, over the memories written before it
            target = weights.shape[1] - back
            term = -weights[rows, target].clamp_min(1e-30).log().mean()
            self._keep("recall_ce", term)
            total = total + self.recall_weight * term
        return total

    @staticmethod
    def _answer_term(model, batch: Batch, written: torch.Tensor) -> torch.Tensor:
        targets = batch.answer_ids[:, : model.config.memory_tokens].to(written.device)
        logits = memory_as_tokens(model, written)[:, : targets.shape[1]]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def memory_as_tokens(model, written: torch.Tensor) -> torch.Tensor:
    """The backbone's LM head read on a memory's r slots, brought back to hidden-state scale:
    (batch, r * d) -> logits (batch, r, vocab), float32. What the answer-in-memory loss trains."""
    if model.memory.output_proj is not None:
        raise ValueError("the answer-in-memory loss needs memories as wide as the backbone's output")
    slots = model.memory.as_tokens(written)
    scale = model.memory.memory_scale if model.config.memory_norm == "learned" else 1.0
    head = model.backbone.get_output_embeddings()
    return head((slots / scale).to(head.weight.dtype)).float()
