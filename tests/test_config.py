"""HMTConfig: defaults, validation with clear messages, JSON round trip."""

from __future__ import annotations

import json

import pytest

from hmt import HMTConfig


def test_the_defaults_are_the_shipped_recipe_and_paper_gives_the_papers_switches():
    from hmt.io import shipped_adapter

    config = HMTConfig()
    assert (config.segment_length, config.num_sensory, config.cache_size) == (256, 32, 300)
    assert config.query_length == 32 and HMTConfig(summary_length=None).query_length == 128  # unset: L // 2
    assert HMTConfig(segment_length=100, num_sensory=8, summary_length=10).query_length == 10
    shipped = HMTConfig.from_json_file(shipped_adapter() / "hmt_config.json").to_dict()
    bound = {"backbone", "backbone_type", "embedding_dim", "hmt_version", "recall_dim"}  # set on save
    assert {k: v for k, v in config.to_dict().items() if k not in bound} == {
        k: v for k, v in shipped.items() if k not in bound
    }
    paper = HMTConfig.paper()
    assert (paper.segment_length, paper.num_sensory, paper.memory_tokens, paper.query_length) == (
        512,
        32,
        1,
        256,
    )
    assert (paper.recall_query, paper.attention_sink, paper.recall_temperature) == ("paper", False, None)
    assert (paper.recall_init, paper.recall_norm, paper.memory_norm) == ("independent", False, "none")
    assert HMTConfig.paper(cache_size=50).cache_size == 50


def test_a_saved_config_keeps_its_meaning_when_defaults_change():
    """A file written before a field existed meant that field's value of the time, not today's default."""
    old = HMTConfig.from_dict({"segment_length": 512, "num_sensory": 32})
    assert (old.memory_tokens, old.recall_temperature, old.sharpen_recall_after) == (1, None, None)
    assert HMTConfig.from_dict({"num_sensory": 32}).segment_length == 512


def test_a_setting_that_left_the_core_is_refused_unless_at_its_only_value():
    assert HMTConfig.from_dict({**HMTConfig().to_dict(), "memory_layer": None}) == HMTConfig()
    with pytest.raises(ValueError, match=r"memory_layer = 15: this setting left hmt.*4d815d9"):
        HMTConfig.from_dict({**HMTConfig().to_dict(), "memory_layer": 15})


def test_settings_given_as_key_value_pairs_are_read_as_json_and_checked():
    from hmt.config import READING_FIELDS, parse_settings

    got = parse_settings(
        ["cache_size=100", "sharpen-recall-after=null", "recall_query=causal", "memory_tokens=2"]
    )
    assert got == {
        "cache_size": 100,
        "sharpen_recall_after": None,
        "recall_query": "causal",
        "memory_tokens": 2,
    }
    assert parse_settings([]) == {}
    for bad, allowed, message in [
        (["cache_size"], None, "KEY=VALUE"),
        (["backbone=x"], None, "backbone: not a setting here; choose among segment_length"),
        (
            ["memory_tokens=2"],
            READING_FIELDS,
            "memory_tokens: not a setting here; choose among segment_length",
        ),
        (["cache_size=1", "cache_size=2"], None, "given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_settings(bad, allowed)


def test_the_attention_sink_is_on_by_default():
    assert HMTConfig().attention_sink
    assert HMTConfig.from_dict({"segment_length": 64}).attention_sink


def test_the_saved_config_holds_no_runtime_choice():
    saved = HMTConfig().to_dict()
    assert "mode" not in saved and "query_batch_size" not in saved


def test_json_round_trip(tmp_path):
    config = HMTConfig(
        segment_length=256, num_sensory=16, summary_length=64, cache_size=40, recall_dim=32, memory_tokens=2
    )
    assert HMTConfig.from_json(config.to_json()) == config
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    assert HMTConfig.from_json_file(path) == config


def test_unknown_keys_from_a_newer_version_warn_not_fail():
    data = {**HMTConfig().to_dict(), "future_knob": 3}
    with pytest.warns(UserWarning, match="future_knob"):
        assert HMTConfig.from_dict(data) == HMTConfig()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"segment_length": 0}, "segment_length must be >= 1"),
        ({"segment_length": -5}, "segment_length must be >= 1"),
        ({"segment_length": 8, "num_sensory": 9}, "num_sensory must be <= segment_length=8"),
        ({"num_sensory": -1}, "num_sensory must be >= 0"),
        (
            {"segment_length": 8, "num_sensory": 2, "summary_length": 9, "recall_query": "paper"},
            "summary_length must be <= segment_length=8",
        ),
        ({"summary_length": 0}, "summary_length must be >= 1"),
        ({"cache_size": 0}, "cache_size must be >= 1"),
        ({"recall_dim": 0}, "recall_dim must be >= 1"),
        ({"memory_norm": "l2"}, "memory_norm must be one of learned, none"),
        ({"recall_init": "zeros"}, "recall_init must be one of similarity, independent"),
        ({"attention_sink": "yes"}, "attention_sink must be true or false"),
        ({"recall_temperature": 0}, r"recall_temperature must be a number in \(0, 100\]"),
        ({"recall_temperature": 101.0}, "recall_temperature must be a number"),
        ({"recall_temperature": "5"}, "recall_temperature must be a number"),
        ({"sharpen_recall_after": 1}, "sharpen_recall_after must be >= 2"),
        ({"sharpen_recall_after": True}, "sharpen_recall_after must be an integer"),
        ({"segment_length": 12.5}, "segment_length must be an integer"),
        ({"cache_size": True}, "cache_size must be an integer"),
    ],
)
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        HMTConfig(**changes)


def test_replace_validates():
    with pytest.raises(ValueError, match="num_sensory"):
        HMTConfig(segment_length=64, num_sensory=32).replace(segment_length=16)


def test_broken_json_is_reported(tmp_path):
    path = tmp_path / "hmt_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HMTConfig.from_json_file(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        HMTConfig.from_json_file(path)


def test_every_field_has_help():
    from dataclasses import fields

    for f in fields(HMTConfig):
        assert HMTConfig.help(f.name)
