"""HMTConfig: defaults, validation with clear messages, JSON round trip."""

from __future__ import annotations

import json

import pytest

from hmt import HMTConfig


def test_defaults_follow_the_method():
    config = HMTConfig()
    assert (config.segment_length, config.num_sensory, config.cache_size) == (512, 32, 300)
    assert config.query_length == 256  # j defaults to L // 2
    assert HMTConfig(segment_length=100, num_sensory=8, summary_length=10).query_length == 10


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
            {"segment_length": 8, "num_sensory": 2, "summary_length": 9},
            "summary_length must be <= segment_length=8",
        ),
        ({"summary_length": 0}, "summary_length must be >= 1"),
        ({"cache_size": 0}, "cache_size must be >= 1"),
        ({"recall_dim": 0}, "recall_dim must be >= 1"),
        ({"memory_norm": "l2"}, "memory_norm must be one of learned, match, none"),
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
