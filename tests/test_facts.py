"""Facts in many phrasings (hmt.facts) and the bundled chat prompts (hmt.prompts), with the tiny tokenizer."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_tokenizer
from hmt.facts import (
    KEYS,
    KINDS,
    NAMES,
    PLACES,
    SPLITS,
    STORY_TASKS,
    TEMPLATES,
    WORDS,
    FactMaker,
    answer_found,
    split_of,
    teacher_messages,
)
from hmt.prompts import chat_prompts

TEXT = " ".join(
    f"the model reads a long context {i % 7}. memory of the segment recall token." for i in range(60)
)
TASKS = ("fact", "multikey", *STORY_TASKS)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def makers(tokenizer) -> dict[str, FactMaker]:
    haystack = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    return {split: FactMaker(tokenizer, haystack, split) for split in SPLITS}


def make(maker: FactMaker, task: str, length: int = 300, depth: float = 0.5, seed: int = 0, **kw):
    return maker.sample(task, length, depth, torch.Generator().manual_seed(seed), **kw)


def find(ids: torch.Tensor, piece: torch.Tensor) -> list[int]:
    """Every start where `piece` occurs in `ids` as a contiguous run."""
    n = len(piece)
    return [i for i in range(len(ids) - n + 1) if torch.equal(ids[i : i + n], piece)]


def piece_of(tokenizer, statement: str) -> torch.Tensor:
    return torch.tensor(tokenizer(" " + statement, add_special_tokens=False)["input_ids"])


def statements(sample) -> list[str]:
    """The evidence split back into its sentences."""
    return re.split(r"(?<=\.) ", sample.evidence)


# --- the word lists and templates ---------------------------------------------------------------------


def test_halves_share_no_template_key_name_place_or_word():
    for items in (TEMPLATES, KEYS, NAMES, PLACES, WORDS):
        train, test = split_of(items, "train"), split_of(items, "test")
        assert not set(train) & set(test)
        assert sorted(train + test) == sorted(items) and len(set(items)) == len(items)
    with pytest.raises(ValueError, match="split must be one of"):
        split_of(KEYS, "validation")


def test_templates_are_well_formed_and_each_half_has_every_kind():
    for fact, question, kind in TEMPLATES:
        assert fact.count("{key}") == 1 and fact.count("{value}") == 1, fact
        assert question.count("{key}") == 1 and "{value}" not in question, question
        assert question.endswith("?") and kind in KINDS
    for split in SPLITS:
        assert {kind for _, _, kind in split_of(TEMPLATES, split)} == set(KINDS), split


def test_values_have_their_kind(makers):
    maker, g = makers["test"], torch.Generator().manual_seed(0)
    for _ in range(50):
        number = maker.value("number", g)
        assert 3 <= len(number) <= 10 and number.isdigit() and number[0] != "0"
        assert re.fullmatch(r"[A-Z]{2}-\d{3,5}", maker.value("code", g))
        assert re.fullmatch(r"\d{1,2} [A-Z][a-z]+ (19|20)\d\d", maker.value("date", g))
        assert maker.value("word", g) in split_of(WORDS, "test")
        assert maker.value("name", g) in split_of(NAMES, "test")
        assert maker.value("place", g) in split_of(PLACES, "test")
    with pytest.raises(ValueError, match="value kind"):
        maker.value("colour", g)


@pytest.mark.parametrize("split", SPLITS)
def test_facts_use_only_their_half(makers, split):
    maker, g = makers[split], torch.Generator().manual_seed(1)
    other = "train" if split == "test" else "test"
    phrasings = {
        q.format(key=key): (f, key) for f, q, _ in split_of(TEMPLATES, split) for key in split_of(KEYS, split)
    }
    for _ in range(40):
        (fact,) = maker.facts(g)
        template, key = phrasings[fact.question]  # a template and a key of this half
        assert fact.statement == template.format(key=key, value=fact.value)
        for items in (NAMES, PLACES, WORDS):
            assert fact.value not in split_of(items, other)


def test_multikey_facts_share_a_template_on_distinct_keys_and_values(makers):
    g = torch.Generator().manual_seed(2)
    facts = makers["test"].facts(g, count=5)
    assert len({f.value for f in facts}) == 5 and len({f.question for f in facts}) == 5
    stems = {re.sub(r"\b(" + "|".join(KEYS) + r")\b", "KEY", f.question) for f in facts}
    assert len(stems) == 1  # one template, five keys
    with pytest.raises(ValueError, match="distinct"):
        makers["test"].facts(g, count=len(split_of(KEYS, "test")) + 1)


# --- samples ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_a_sample_has_the_length_asked_and_holds_its_facts_whole(makers, tokenizer, task):
    maker = makers["test"]
    for seed in range(3):
        sample = make(maker, task, length=300, depth=0.4, seed=seed, num_facts=4, asked=2)
        assert sample.task == task and sample.context.numel() == 300 and sample.context.dtype == torch.long
        text = tokenizer.decode(sample.context)
        starts = []
        for statement in statements(sample):
            assert statement in text
            where = find(sample.context, piece_of(tokenizer, statement))
            assert len(where) == 1, statement  # inserted whole, as its own tokens
            starts.append(where[0])
        assert starts == sorted(starts)  # the evidence is in the order of the context
        assert 0 <= sample.depth <= 1 and 0 <= sample.distance < 300
        for value in sample.values:  # the question never gives the answer away
            assert not answer_found(sample.question, (value,)), (sample.question, value)
            assert value in text


@pytest.mark.parametrize("depth", [0.2, 0.5, 0.8])
def test_a_fact_sits_at_a_sentence_end_of_one_run_of_the_haystack(makers, tokenizer, depth):
    maker = makers["test"]
    for seed in range(3):
        sample = make(maker, "fact", length=250, depth=depth, seed=seed)
        piece = piece_of(tokenizer, sample.evidence)
        (start,) = find(sample.context, piece)
        assert "." in tokenizer.decode(sample.context[start - 1 : start])  # after a sentence end
        rest = torch.cat([sample.context[:start], sample.context[start + len(piece) :]])
        assert find(maker.haystack, rest), "the haystack around the fact is not one contiguous run"
        assert sample.distance == len(sample.context) - (start + len(piece))
        assert sample.depth == pytest.approx(start / len(sample.context))
        assert abs(start / (250 - len(piece)) - depth) < 0.1  # the nearest sentence end to the depth asked


def test_depth_zero_and_one_put_the_fact_at_the_start_and_the_end(makers, tokenizer):
    maker = makers["test"]
    first = make(maker, "fact", depth=0.0, seed=5)
    assert find(first.context, piece_of(tokenizer, first.evidence)) == [0] and first.depth == 0
    last = make(maker, "fact", depth=1.0, seed=5)
    assert last.distance == 0
    piece = piece_of(tokenizer, last.evidence)
    assert torch.equal(last.context[-len(piece) :], piece)


def test_samples_are_seeded(makers):
    maker = makers["test"]
    for task in TASKS:
        a, b = make(maker, task, seed=7), make(maker, task, seed=7)
        assert torch.equal(a.context, b.context)
        assert (a.question, a.values, a.evidence, a.distance) == (
            b.question,
            b.values,
            b.evidence,
            b.distance,
        )
    assert any(make(maker, "fact", seed=s).question != make(maker, "fact", seed=8).question for s in range(3))


def test_multikey_asks_some_of_the_facts_and_expects_every_value(makers):
    maker = makers["test"]
    sample = make(maker, "multikey", num_facts=4, asked=3, seed=3)
    assert len(sample.values) == 3 and len(set(sample.values)) == 3
    assert sample.question.count("?") == 3 and sample.question.count(" And ") == 2
    assert len(statements(sample)) == 3  # the teacher sees the asked facts only
    one = make(maker, "multikey", num_facts=4, asked=1, seed=3)
    assert len(one.values) == 1 and " And " not in one.question
    for asked in (0, 5):
        with pytest.raises(ValueError, match="asked must be in"):
            make(maker, "multikey", num_facts=4, asked=asked)


def _moves(story: list[str], person: str) -> list[str]:
    return [s.split(" the ")[-1].rstrip(".") for s in story if s.startswith(person + " ") and " to the " in s]


def test_qa1_asks_where_a_person_went_last(makers):
    for seed in range(8):
        sample = make(makers["test"], "qa1", seed=seed)
        story = statements(sample)
        assert len(story) == 5
        person = re.fullmatch(r"Where is (\w+)\?", sample.question).group(1)
        assert sample.values == (_moves(story, person)[-1],)


def test_qa2_asks_where_the_carrier_of_the_object_went_last(makers):
    for seed in range(8):
        sample = make(makers["test"], "qa2", seed=seed)
        story = statements(sample)
        obj = re.fullmatch(r"Where is the (\w+)\?", sample.question).group(1)
        (taking,) = [s for s in story if s.endswith(f" the {obj}.")]
        carrier = taking.split()[0]
        assert sample.values == (_moves(story, carrier)[-1],)
        others = {s.split()[0] for s in story} - {carrier}
        assert all(_moves(story, p)[-1] != sample.values[0] for p in others)  # not a lucky guess


def test_qa3_asks_the_place_before_the_last(makers):
    for seed in range(8):
        sample = make(makers["test"], "qa3", seed=seed)
        story = statements(sample)
        obj, last = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", sample.question).groups()
        carrier = story[0].split()[0]
        assert story[0].endswith(f" the {obj}.")  # the object is taken first
        moves = _moves(story, carrier)
        assert moves[-1] == last and sample.values == (moves[-2],)


def test_sample_errors(makers):
    maker = makers["test"]
    with pytest.raises(ValueError, match="task must be one of"):
        make(maker, "qa4")
    with pytest.raises(ValueError, match="cannot hold these facts"):
        make(maker, "multikey", length=20, num_facts=4)
    with pytest.raises(ValueError, match="split must be one of"):
        FactMaker(maker.tokenizer, maker.haystack, "validation")


def test_teacher_messages_hold_the_evidence_and_the_question(makers):
    sample = make(makers["test"], "qa2", seed=1)
    (message,) = teacher_messages(sample)
    assert message["role"] == "user"
    assert sample.evidence in message["content"] and message["content"].endswith(sample.question)


# --- answer_found ---------------------------------------------------------------------------------------


def test_answer_found_wants_each_value_whole():
    assert answer_found("The code is 43125.", ("43125",))
    assert not answer_found("The code is 431250.", ("43125",))
    assert not answer_found("The code is 143125", ("43125",))
    assert answer_found("It was the VIOLIN, I think", ("violin",))
    assert not answer_found("violins", ("violin",))
    assert answer_found("Signed by alice moreau.", ("Alice Moreau",))
    assert answer_found("On 3 March 2001.", ("3 March 2001",)) and not answer_found(
        "13 March 2001", ("3 March 2001",)
    )
    assert answer_found("Plate ab-123!", ("AB-123",))
    assert answer_found("Orchid and pelican.", ("orchid", "pelican"))
    assert not answer_found("Only the orchid.", ("orchid", "pelican"))
    assert answer_found("anything", ())


# --- the bundled chat prompts ------------------------------------------------------------------------------


def test_bundled_prompts_are_disjoint_halves():
    train, test = chat_prompts("train"), chat_prompts("test")
    assert len(test) >= 100 and len(train) >= 100
    assert not set(train) & set(test)
    for prompts in (train, test):
        assert len(set(prompts)) == len(prompts)
        assert all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    assert chat_prompts("test") == test  # a fresh list each time, the same prompts
    with pytest.raises(ValueError, match="split must be train or test"):
        chat_prompts("validation")


def test_a_haystack_shorter_than_the_context_repeats(tokenizer):
    """A context longer than the haystack is filled by repeating it, at the length asked, with the fact
    still at a sentence end of the (repeated) text."""
    haystack = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    maker = FactMaker(tokenizer, haystack, "test")
    length = 3 * len(haystack) + 17
    sample = make(maker, "fact", length=length, depth=0.5)
    assert len(sample.context) == length
    assert 0.3 < sample.depth < 0.7
