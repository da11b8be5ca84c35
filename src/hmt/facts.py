"""Facts in many phrasings, hidden in long text and asked through the ask path (chat template, free
generation), for training and for measuring what a user gets from memory.

A template is a fact sentence and a question about it with a `{key}` (what the fact is about, so several
facts can share a template: multi-key) and a `{value}` of one kind: a number of 3-10 digits, a word, a
name, a place, a date or a code. Templates, names, places and words come in two disjoint halves: `train`
for training, `test` for the targets, so a score on `test` is on phrasings and values training never saw.
bAbI-style stories (qa1-qa3: one, two and three supporting facts, as BABILong builds them) are here too.

A haystack shorter than a context repeats end to end. A sample is a `FactSample`: the haystack with the facts at sentence boundaries, the question, the values
asked (all must appear in the answer) and, for the teacher, the supporting facts as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLITS: tuple[str, ...] = ("train", "test")
KINDS: tuple[str, ...] = ("number", "word", "name", "place", "date", "code")
STORY_TASKS: tuple[str, ...] = ("qa1", "qa2", "qa3")

# (fact, question, kind). {key} names what the fact is about; {value} is the answer.
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("The code for the {key} vault is {value}.", "What is the code for the {key} vault?", "number"),
    ("The {key} account number is {value}.", "What is the {key} account number?", "number"),
    ("Please remember that the {key} room is number {value}.", "Which number is the {key} room?", "number"),
    ("The {key} project was given the budget number {value}.", "What budget number does the {key} project have?", "number"),
    ("For the record, the {key} hotline is {value}.", "What is the phone number of the {key} hotline?", "number"),
    ("The lottery ticket hidden in the {key} box reads {value}.", "What does the lottery ticket in the {key} box read?", "number"),
    ("The password for the {key} server is {value}.", "What is the password for the {key} server?", "word"),
    ("Everyone called the {key} dog {value}.", "What did everyone call the {key} dog?", "word"),
    ("The secret word written on the {key} door was {value}.", "Which secret word was written on the {key} door?", "word"),
    ("In the {key} game, the winning card was the {value}.", "Which card won the {key} game?", "word"),
    ("The {key} team chose the {value} as its mascot.", "What mascot did the {key} team choose?", "word"),
    ("The {key} prize went to {value}.", "Who won the {key} prize?", "name"),
    ("The {key} shop is run by a woman named {value}.", "Who runs the {key} shop?", "name"),
    ("The {key} letter was signed by {value}.", "Who signed the {key} letter?", "name"),
    ("Our new {key} teacher is called {value}.", "What is the name of the new {key} teacher?", "name"),
    ("The captain of the {key} boat was {value}.", "Who was the captain of the {key} boat?", "name"),
    ("The {key} conference will be held in {value}.", "Where will the {key} conference be held?", "place"),
    ("The {key} statue was shipped to {value}.", "To which city was the {key} statue shipped?", "place"),
    ("My cousin with the {key} bicycle lives in {value}.", "Where does the cousin with the {key} bicycle live?", "place"),
    ("The {key} festival takes place every year in {value}.", "In which city is the {key} festival held?", "place"),
    ("The {key} parcel was posted from {value}.", "Where was the {key} parcel posted from?", "place"),
    ("The {key} exhibition opens on {value}.", "When does the {key} exhibition open?", "date"),
    ("The {key} contract was signed on {value}.", "On what date was the {key} contract signed?", "date"),
    ("Note that the {key} launch is planned for {value}.", "When is the {key} launch planned?", "date"),
    ("The {key} bridge was opened on {value}.", "When was the {key} bridge opened?", "date"),
    ("The {key} locker uses the code {value}.", "Which code opens the {key} locker?", "code"),
    ("The tracking code of the {key} order is {value}.", "What is the tracking code of the {key} order?", "code"),
    ("Flight {value} takes the {key} delegation home.", "Which flight takes the {key} delegation home?", "code"),
    ("The {key} licence plate reads {value}.", "What does the {key} licence plate read?", "code"),
    ("The special magic number for {key} is {value}.", "What is the special magic number for {key}?", "number"),
    ("Write this down: the {key} safe opens with {value}.", "What opens the {key} safe?", "number"),
    ("The {key} cat answers only to the name {value}.", "What name does the {key} cat answer to?", "word"),
    ("The {key} painting was bought by {value}.", "Who bought the {key} painting?", "name"),
    ("The {key} train leaves for {value} at noon.", "Where does the {key} train go?", "place"),
    ("The {key} meeting was moved to {value}.", "When is the {key} meeting now?", "date"),
    ("The serial number of the {key} engine is {value}.", "What is the serial number of the {key} engine?", "code"),
    ("Ask for the {key} key with the number {value} at the front desk.", "What number does the {key} key have?", "number"),
    ("The {key} recipe needs one secret ingredient: {value}.", "What is the secret ingredient of the {key} recipe?", "word"),
    ("The {key} song was written by {value}.", "Who wrote the {key} song?", "name"),
    ("The {key} company moved its head office to {value}.", "Where is the {key} company's head office now?", "place"),
)  # fmt: skip

KEYS: tuple[str, ...] = (
    "red", "blue", "green", "silver", "golden", "northern", "southern", "old", "new", "main",
    "winter", "summer", "spring", "autumn", "yellow", "purple", "orange", "black", "white", "grey",
    "eastern", "western", "small", "large", "hidden", "second", "third", "copper", "crystal", "marble",
)  # fmt: skip
NAMES: tuple[str, ...] = (
    "Alice Moreau", "Daniel Okafor", "Priya Raman", "Tomas Lindqvist", "Mei Chen", "Samuel Adeyemi",
    "Clara Fontaine", "Omar Haddad", "Ingrid Solberg", "Lucas Ferreira", "Hannah Weiss", "Kenji Watanabe",
    "Amara Nwosu", "Pablo Ortega", "Sofia Rossi", "Ivan Petrov", "Leila Karimi", "George Whitfield",
    "Nadia Benali", "Felix Baumann", "Rosa Delgado", "Arjun Mehta", "Elena Popescu", "Malik Johnson",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "Lisbon", "Nairobi", "Oslo", "Montreal", "Kyoto", "Valparaiso", "Edinburgh", "Marrakesh", "Krakow",
    "Auckland", "Seville", "Hanoi", "Reykjavik", "Cusco", "Tallinn", "Adelaide", "Bologna", "Accra",
    "Bergen", "Porto", "Zanzibar", "Lyon", "Tbilisi", "Halifax",
)  # fmt: skip
WORDS: tuple[str, ...] = (
    "lantern", "walnut", "falcon", "velvet", "harbor", "orchid", "thunder", "compass", "pebble", "saffron",
    "glacier", "meadow", "cobalt", "juniper", "maple", "quartz", "tornado", "violin", "ember", "pelican",
    "biscuit", "canyon", "anchor", "lotus",
)  # fmt: skip
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"

# bAbI's world: people, places and objects (BABILong: facts scattered through long book text).
PEOPLE: tuple[str, ...] = ("Mary", "John", "Daniel", "Sandra", "Alice", "Peter", "Emma", "David")
ROOMS: tuple[str, ...] = (
    "kitchen", "garden", "office", "bedroom", "bathroom", "hallway", "cellar", "garage", "library", "balcony",
)  # fmt: skip
OBJECTS: tuple[str, ...] = ("apple", "football", "milk", "book", "umbrella", "key", "hat", "letter")
MOVES: tuple[str, ...] = ("went to", "moved to", "travelled to", "journeyed to", "went back to")
TAKES: tuple[str, ...] = ("picked up", "grabbed", "got", "took")


def split_of(items: tuple, split: str) -> tuple:
    """The half of `items` for `split`: train the even positions, test the odd ones."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return items[split == "test" :: 2]


@dataclass(frozen=True)
class Fact:
    """One stated fact and the question that asks it."""

    statement: str
    question: str
    value: str


@dataclass(frozen=True)
class FactSample:
    """A long context with facts in it and one question; `values` must all appear in the answer."""

    task: str  # fact, multikey or qa1-qa3
    context: torch.Tensor  # the haystack with the facts (token ids), read into memory first
    question: str
    values: tuple[str, ...]
    evidence: str  # the supporting facts as plain text, in order (what the teacher is shown)
    depth: float  # where the first asked fact sits: 0 = the start of the context, 1 = its end
    distance: int  # tokens from the end of the asked fact to the end of the context


class FactMaker:
    """Seeded facts and samples of one split. `haystack`: token ids of real text of the same split."""

    def __init__(self, tokenizer, haystack: torch.Tensor, split: str) -> None:
        self.tokenizer, self.split = tokenizer, split
        self.templates = split_of(TEMPLATES, split)
        self.keys, self.names = split_of(KEYS, split), split_of(NAMES, split)
        self.places, self.words = split_of(PLACES, split), split_of(WORDS, split)
        self.haystack = haystack
        ids = haystack.tolist()
        stops = {t for t in set(ids) if "." in tokenizer.decode([t])}  # tokens that end a sentence
        ends = [i + 1 for i, t in enumerate(ids) if t in stops]
        self.sentence_ends = torch.tensor(ends or [len(haystack)])

    def value(self, kind: str, g: torch.Generator) -> str:
        """A random value of `kind` (numbers 3-10 digits, no leading zero)."""
        if kind == "number":
            digits = 3 + _pick(g, 8)
            return str(1 + _pick(g, 9)) + "".join(str(_pick(g, 10)) for _ in range(digits - 1))
        if kind == "word":
            return self.words[_pick(g, len(self.words))]
        if kind == "name":
            return self.names[_pick(g, len(self.names))]
        if kind == "place":
            return self.places[_pick(g, len(self.places))]
        if kind == "date":
            return f"{1 + _pick(g, 28)} {MONTHS[_pick(g, 12)]} {1990 + _pick(g, 45)}"
        if kind == "code":
            letters = "".join(LETTERS[_pick(g, len(LETTERS))] for _ in range(2))
            return f"{letters}-{''.join(str(_pick(g, 10)) for _ in range(3 + _pick(g, 3)))}"
        raise ValueError(f"value kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def facts(self, g: torch.Generator, count: int = 1, template: int | None = None) -> list[Fact]:
        """`count` facts on distinct keys; one template for all (multi-key, as RULER) if `template` is
        given or count > 1, drawn at random otherwise."""
        index = template if template is not None else _pick(g, len(self.templates))
        fact, question, kind = self.templates[index % len(self.templates)]
        keys = _distinct(g, self.keys, count)
        values: list[str] = []
        while len(values) < count:
            value = self.value(kind, g)
            if value not in values:
                values.append(value)
        return [
            Fact(fact.format(key=k, value=v), question.format(key=k), v)
            for k, v in zip(keys, values, strict=True)
        ]

    def sample(
        self, task: str, length: int, depth: float, g: torch.Generator, num_facts: int = 4, asked: int = 1
    ) -> FactSample:
        """A context of about `length` tokens (haystack + facts) with the first asked fact at `depth`.

        fact: one fact. multikey: `num_facts` facts on one template, `asked` of them asked (their values
        all expected). qa1-qa3: bAbI stories with one, two or three supporting facts."""
        if task == "fact":
            facts = self.facts(g, 1)
            return self._place(task, facts, [0], facts[0].question, (facts[0].value,), length, depth, g)
        if task == "multikey":
            if not 1 <= asked <= num_facts:
                raise ValueError(f"asked must be in [1, num_facts={num_facts}], got {asked}")
            facts = self.facts(g, num_facts)
            order = torch.randperm(num_facts, generator=g).tolist()
            chosen = sorted(order[:asked])
            question = facts[chosen[0]].question
            if asked > 1:
                question = " And ".join(
                    [facts[chosen[0]].question] + [facts[i].question.lower() for i in chosen[1:]]
                )
            values = tuple(facts[i].value for i in chosen)
            return self._place(task, facts, chosen, question, values, length, depth, g)
        if task in STORY_TASKS:
            sentences, support, question, value = _story(task, g)
            facts = [Fact(s, question, value) for s in sentences]
            return self._place(task, facts, support, question, (value,), length, depth, g, spread=True)
        raise ValueError(f"task must be one of fact, multikey, {', '.join(STORY_TASKS)}; got {task!r}")

    def _place(self, task, facts, asked, question, values, length, depth, g, spread=False) -> FactSample:
        """Insert the facts at sentence boundaries: the first asked one at `depth`, the others at random
        (stories: in order, the supporting facts from `depth` on)."""
        pieces = [self._encode(" " + f.statement) for f in facts]
        room = length - sum(len(p) for p in pieces)
        if room < 1:
            raise ValueError(f"a context of {length} tokens cannot hold these facts")
        haystack, sentence_ends = self._haystack_of(room)
        start = _pick(g, max(1, len(haystack) - room))
        text = haystack[start : start + room]
        ends = sentence_ends[(sentence_ends > start) & (sentence_ends < start + len(text))]
        cuts = torch.cat([torch.tensor([0, len(text)]), ends - start])  # sentence boundaries in `text`

        def boundary(fraction: float) -> int:
            target = fraction * len(text)
            return int(cuts[(cuts - target).abs().argmin()])

        if spread:  # a story keeps its order; its facts spread from depth to the end
            n = len(facts)
            places = [boundary(depth + (1 - depth) * i / n) for i in range(n)]
        else:
            places = [boundary(float(torch.rand(1, generator=g))) for _ in facts]
            places[asked[0]] = boundary(depth)
        order = sorted(range(len(facts)), key=lambda i: (places[i], i))
        out, previous, spans = [], 0, {}
        for i in order:
            out.append(text[previous : places[i]])
            begin = sum(len(p) for p in out)
            out.append(pieces[i])
            spans[i] = (begin, begin + len(pieces[i]))
            previous = places[i]
        out.append(text[previous:])
        context = torch.cat(out)
        first = spans[asked[0]]
        evidence = " ".join(facts[i].statement for i in order if i in asked or spread)
        return FactSample(
            task=task,
            context=context,
            question=question,
            values=tuple(values),
            evidence=evidence,
            depth=first[0] / max(1, len(context)),
            distance=len(context) - min(spans[i][1] for i in asked),
        )

    def _haystack_of(self, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The haystack and its sentence ends, repeated end to end when it is shorter than `room`."""
        copies = -(-room // len(self.haystack))
        if copies <= 1:
            return self.haystack, self.sentence_ends
        offsets = torch.arange(copies)[:, None] * len(self.haystack)
        return self.haystack.repeat(copies), (self.sentence_ends[None, :] + offsets).flatten()

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def teacher_messages(sample: FactSample) -> list[dict[str, str]]:
    """What the teacher (the untouched backbone) is asked: the evidence and the question in one turn."""
    return [{"role": "user", "content": f"Context: {sample.evidence}\n\nQuestion: {sample.question}"}]


def answer_found(answer: str, values: tuple[str, ...]) -> bool:
    """Every value appears whole in the answer (not inside a longer number or word; case-insensitive)."""
    import re

    text = answer.lower()
    for value in values:
        pattern = rf"(?<![a-z0-9]){re.escape(value.lower())}(?![a-z0-9])"  # whole, not inside a longer one
        if not re.search(pattern, text):
            return False
    return True


def _story(task: str, g: torch.Generator) -> tuple[list[str], list[int], str, str]:
    """A bAbI-style story: its sentences, the indices of the supporting facts, the question, the answer.

    qa1: people move; "Where is P?" (the last move). qa2: P takes an object, then moves; "Where is the
    object?". qa3: P takes an object and moves twice; "Where was the object before the <last place>?"."""
    people = _distinct(g, PEOPLE, 3)
    rooms = list(_distinct(g, ROOMS, 6))
    move = lambda p, r: f"{p} {MOVES[_pick(g, len(MOVES))]} the {r}."  # noqa: E731
    if task == "qa1":
        sentences = [move(people[i % 3], rooms[i]) for i in range(5)]
        asked = people[_pick(g, 3)]
        last = max(i for i in range(5) if people[i % 3] == asked)
        return sentences, [last], f"Where is {asked}?", rooms[last]
    obj = OBJECTS[_pick(g, len(OBJECTS))]
    carrier, other = people[0], people[1]
    take = f"{carrier} {TAKES[_pick(g, len(TAKES))]} the {obj}."
    if task == "qa2":
        sentences = [move(other, rooms[0]), take, move(other, rooms[1]), move(carrier, rooms[2])]
        return sentences, [1, 3], f"Where is the {obj}?", rooms[2]
    sentences = [
        take,
        move(other, rooms[0]),
        move(carrier, rooms[1]),
        move(other, rooms[2]),
        move(carrier, rooms[3]),
    ]
    return sentences, [0, 2, 4], f"Where was the {obj} before the {rooms[3]}?", rooms[1]


def _pick(g: torch.Generator, count: int) -> int:
    return int(torch.randint(count, (1,), generator=g))


def _distinct(g: torch.Generator, items: tuple, count: int) -> list:
    if count > len(items):
        raise ValueError(f"cannot draw {count} distinct items from {len(items)}")
    return [items[i] for i in torch.randperm(len(items), generator=g)[:count].tolist()]
