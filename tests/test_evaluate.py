"""Evaluation: every mode scores the same tokens; full and backbone modes match the plain backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ATOL, random_ids, run_cli, tiny_hmt, word_text
from hmt.evaluate import EvalConfig, offset_perplexities, recall_stats, run_eval, segment_perplexities


def plain_ppl(backbone, stream: torch.Tensor) -> float:
    logits = backbone(stream[None]).logits[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, stream[1:])))


def test_all_modes_score_the_same_tokens_and_match_references():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2)
    stream = random_ids(1, 50)[0]
    original = model.config
    results = run_eval(model, stream, EvalConfig(full_window=64))
    assert model.config is original
    assert {r.tokens_scored for r in results.values()} == {49}
    with torch.no_grad():
        assert results["full"].ppl == pytest.approx(plain_ppl(model.backbone, stream), rel=1e-5)
        windows = [
            plain_ppl(model.backbone, stream[s : s + 9]) for s in range(0, 49, 8)
        ]  # window + next token
    nll = sum(math.log(p) * min(8, 49 - i * 8) for i, p in enumerate(windows)) / 49
    assert results["backbone"].ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert results["hmt"].recall.segments == 6 and results["rmt"].recall is None
    assert results["full"].window == 64 and results["hmt"].window == 8
    assert len(results["hmt"].segment_ppl) == 7
    # Eighths of an 8-token segment are single positions; their token-weighted mean is the overall NLL.
    result = results["hmt"]
    counts = [6, 7, 6, 6, 6, 6, 6, 6]  # 50 = 6 * 8 + 2 positions, position 0 of the stream not scored
    assert len(result.offset_ppl) == 8 and len(results["full"].offset_ppl) == 8
    mean_nll = sum(c * math.log(p) for c, p in zip(counts, result.offset_ppl, strict=True)) / 49
    assert mean_nll == pytest.approx(result.nll, rel=1e-6)


def test_call_size_does_not_change_results():
    model = tiny_hmt("gpt2", segment_length=8, num_sensory=2)
    stream = random_ids(1, 70)[0]
    one = run_eval(model, stream, EvalConfig(modes=("hmt", "rmt"), segments_per_call=1))
    many = run_eval(model, stream, EvalConfig(modes=("hmt", "rmt"), segments_per_call=5))
    for mode in ("hmt", "rmt"):
        torch.testing.assert_close(one[mode].token_losses, many[mode].token_losses, atol=ATOL, rtol=0)


def test_memory_reset_every_segment_is_memory_off_and_a_long_interval_is_no_reset():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2)
    stream = random_ids(1, 70)[0]
    carried = run_eval(model, stream, EvalConfig(modes=("rmt", "hmt")))
    reset_1 = run_eval(model, stream, EvalConfig(modes=("rmt", "memory_off"), reset_every=1))
    reset_3 = run_eval(model, stream, EvalConfig(modes=("rmt", "hmt"), reset_every=3))
    reset_long = run_eval(model, stream, EvalConfig(modes=("rmt", "hmt"), reset_every=100))
    # With the cache emptied before every segment, rmt reads m0 each time: the memory_off control.
    torch.testing.assert_close(
        reset_1["rmt"].token_losses, reset_1["memory_off"].token_losses, atol=ATOL, rtol=0
    )
    for mode in ("rmt", "hmt"):
        torch.testing.assert_close(
            reset_long[mode].token_losses, carried[mode].token_losses, atol=ATOL, rtol=0
        )
        assert reset_3[mode].tokens_scored == carried[mode].tokens_scored
        # The first three segments are read alike; after the first reset they differ.
        torch.testing.assert_close(
            reset_3[mode].token_losses[:24], carried[mode].token_losses[:24], atol=ATOL, rtol=0
        )
        assert not torch.allclose(reset_3[mode].token_losses[24:], carried[mode].token_losses[24:])
    assert max(reset_3["hmt"].recall.distance_histogram) <= 2


def test_score_mask_leaves_positions_unscored():
    model = tiny_hmt("llama")
    stream = random_ids(1, 40)[0]
    mask = torch.ones(40, dtype=torch.bool)
    mask[10:20] = False
    results = run_eval(model, stream, EvalConfig(modes=("backbone", "hmt")), score_mask=mask)
    assert results["hmt"].tokens_scored == 29
    assert results["hmt"].token_losses[10:20].abs().sum() == 0


def test_segment_perplexities_and_recall_stats():
    losses = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0])
    mask = torch.tensor([False, True, True, True, True])
    assert segment_perplexities(losses, mask, 2) == pytest.approx([math.e, math.exp(1.5), math.exp(2.0)])
    ramp, everywhere = torch.arange(8.0), torch.ones(8, dtype=torch.bool)
    # 2-token segments, a bin per offset: even positions (mean loss 3), odd ones (4).
    assert offset_perplexities(ramp, everywhere, 2, bins=2) == pytest.approx([math.exp(3.0), math.exp(4.0)])
    # 4-token segments in halves: positions 0, 1, 4, 5 (mean 2.5), then 2, 3, 6, 7 (4.5).
    assert offset_perplexities(ramp, everywhere, 4, bins=2) == pytest.approx([math.exp(2.5), math.exp(4.5)])
    assert offset_perplexities(ramp, ramp < 2, 4, bins=2)[1] is None  # nothing scored at offsets 2-3
    stats = recall_stats([torch.zeros(0), torch.tensor([0.2, 0.8]), torch.tensor([0.7, 0.2, 0.1])])
    assert stats.distance_histogram == {1: 1, 3: 1} and stats.segments == 2
    assert stats.mean_max_weight == pytest.approx(0.75)
    assert stats.oldest_share == pytest.approx(0.5)  # [0.7, 0.2, 0.1]: the oldest of three
    frozen = recall_stats([torch.tensor([1.0])] + [torch.eye(n)[0] for n in range(2, 6)])
    assert frozen.oldest_share == 1.0 and frozen.distance_histogram == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert frozen.most_common_distance() == (1, pytest.approx(0.2))  # a tie: no distance is preferred


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modes": ()}, "at least one mode"),
        ({"modes": ("hmt", "lstm")}, "unknown mode"),
        ({"modes": ("hmt", "hmt")}, "modes repeat"),
        ({"full_window": 0}, "full_window must be >= 1"),
        ({"reset_every": 0}, "reset_every must be >= 1"),
    ],
)
def test_eval_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_text_shorter_than_one_segment():
    with pytest.raises(ValueError, match="not more than one segment"):
        run_eval(tiny_hmt("llama", segment_length=8), random_ids(1, 8)[0])


# ---- the command ----------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(word_text(i, 120) for i in range(4)))
    return path


def eval_args(tiny_model_dir, text_file, out, *extra: str) -> list[str]:
    return [
        "eval", "--backbone", str(tiny_model_dir), "--data", str(text_file), "--max-tokens", "300",
        "--segment-length", "16", "--num-sensory", "4", "--cache-size", "8", "--full-window", "64",
        "--dtype", "fp32", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def test_eval_command_writes_results_and_plots(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, *eval_args(tiny_model_dir, text_file, tmp_path / "run"))
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(report["modes"]) == ["backbone", "rmt", "hmt", "full"]
    for result in report["modes"].values():
        assert set(result) >= {
            "ppl",
            "tokens_scored",
            "seconds",
            "tokens_per_second",
            "segment_ppl",
            "offset_ppl",
        }
        assert result["tokens_scored"] == 299
    assert report["data"]["tokens"] == 300 and report["adapter"] is None
    assert "untrained memory parameters" in report["adapter_note"] and "untrained memory parameters" in out
    for name in ("ppl_by_position.png", "recall_distance.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"
    # Results are never overwritten silently.
    code, _, err = run_cli(monkeypatch, capsys, *eval_args(tiny_model_dir, text_file, tmp_path / "run"))
    assert code == 1 and "results.json exists" in err and "--overwrite" in err


def test_eval_with_adapter_and_probes(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path):
    from hmt import HMTConfig, HMTForCausalLM
    from hmt.backbone import load_backbone

    backbone = load_backbone(str(tiny_model_dir), dtype="fp32", device="cpu")
    HMTForCausalLM(backbone.model, HMTConfig(segment_length=16, num_sensory=4)).save_pretrained(
        tmp_path / "ad"
    )
    args = eval_args(tiny_model_dir, text_file, tmp_path / "run", "--adapter", str(tmp_path / "ad"))
    args += [
        "--modes",
        "hmt,backbone",
        "--interleave",
        f"{text_file}:32",
        "--dilate",
        "40:8",
        "--filler",
        "$",
        "--cache-size",
        "3",
    ]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["adapter"] == str(tmp_path / "ad") and "trained adapter" in out
    assert report["data"]["transforms"]["interleave"]["every"] == 32
    assert report["data"]["transforms"]["dilate"] == {"every": 40, "length": 8, "filler": "$"}
    assert report["modes"]["hmt"]["tokens_scored"] < 299  # filler runs are not scored
    assert report["config"]["cache_size"] == 3  # a setting the adapter is read with, not a parameter


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "no-such-corpus"], "unknown data source 'no-such-corpus'"),
        (["--backbone", "no-such-org/no-such-model"], "unknown backbone"),
        (["--max-tokens", "10"], "not more than one segment"),
        (["--modes", "hmt,lstm"], "unknown mode"),
        (["--dilate", "40"], "--dilate takes EVERY:LENGTH"),
    ],
)
def test_eval_bad_input_is_one_line(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path, extra, message):
    args = eval_args(tiny_model_dir, text_file, tmp_path / "run")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        index = args.index(flag) if flag in args else None
        if index is None:
            args += [flag, value]
        else:
            args[index + 1] = value
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and message in err and "Traceback" not in err
    assert err.strip().splitlines()[0].startswith("error:")


def test_adapter_that_does_not_fit(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path):
    tiny_hmt("gpt2", segment_length=16, num_sensory=4).save_pretrained(tmp_path / "gpt2-adapter")
    args = eval_args(tiny_model_dir, text_file, tmp_path / "run", "--adapter", str(tmp_path / "gpt2-adapter"))
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "made for a gpt2 backbone" in err


def test_adapter_resolution(tmp_path, monkeypatch):
    from hmt import io
    from hmt.loading import resolve_adapter

    assert resolve_adapter(Path("none"), None) is None  # explicit: untrained memory parameters
    assert resolve_adapter(tmp_path, None) == tmp_path
    monkeypatch.setattr(io, "shipped_adapter", lambda: tmp_path / "shipped")
    assert resolve_adapter(None, None) == tmp_path / "shipped"  # the default backbone gets its adapter
    assert resolve_adapter(None, "some/other-model") is None  # another backbone does not


def test_baseline_rows_read_the_untouched_backbone_unless_asked(
    monkeypatch, capsys, tiny_model_dir, text_file, tmp_path
):
    """With an adapter that carries LoRA, `backbone` and `full` are what a user would run instead of HMT:
    the plain backbone; the memory rows read with the LoRA, and the table says which is which."""
    from hmt import HMTConfig, HMTForCausalLM
    from hmt.backbone import load_backbone, prepare_backbone

    backbone = load_backbone(str(tiny_model_dir), dtype="fp32", device="cpu")
    model = HMTForCausalLM(
        prepare_backbone(backbone.model, "lora", lora_rank=2), HMTConfig(segment_length=16, num_sensory=4)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA starts as a no-op; make it matter
    model.save_pretrained(tmp_path / "ad")
    modes = ("--modes", "backbone,sliding,full")
    runs = {
        "plain": ("--adapter", "none"),
        "default": ("--adapter", str(tmp_path / "ad")),
        "lora": ("--adapter", str(tmp_path / "ad"), "--lora-baselines"),
    }
    reports = {}
    for name, extra in runs.items():
        code, _, err = run_cli(
            monkeypatch, capsys, *eval_args(tiny_model_dir, text_file, tmp_path / name, *modes, *extra)
        )
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "results.json").read_text())
    ppl = {name: {m: r["ppl"] for m, r in report["modes"].items()} for name, report in reports.items()}
    for mode in ("backbone", "full"):
        assert ppl["default"][mode] == pytest.approx(ppl["plain"][mode], rel=1e-6)
        assert ppl["lora"][mode] != pytest.approx(ppl["plain"][mode], rel=1e-3)
    assert ppl["default"]["sliding"] == pytest.approx(ppl["lora"]["sliding"], rel=1e-6)
    weights = reports["default"]["config"]["weights"]
    assert weights == {
        "backbone": "untouched backbone",
        "sliding": "backbone + the adapter's LoRA",
        "full": "untouched backbone",
    }
    assert set(reports["lora"]["config"]["weights"].values()) == {"backbone + the adapter's LoRA"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "foo"], "unknown device 'foo'"),
        (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "CUDA"),
    ],
)
def test_bad_devices_are_one_line(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path, extra, message):
    args = eval_args(tiny_model_dir, text_file, tmp_path / "run")
    args[args.index("--device") + 1] = extra[1]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and message in err and "Traceback" not in err


def test_an_unusable_out_is_refused_before_the_run(monkeypatch, capsys, tiny_model_dir, text_file, tmp_path):
    from hmt import backbone

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a backbone before checking --out")

    monkeypatch.setattr(backbone, "load_backbone", no_loading)
    (tmp_path / "a-file").write_text("mine")
    for out, message in (
        (tmp_path / "a-file", "is a file, not a folder"),
        (tmp_path / "a-file" / "sub", "cannot write"),
    ):
        code, _, err = run_cli(monkeypatch, capsys, *eval_args(tiny_model_dir, text_file, out))
        assert code == 1 and message in err, err
    assert (tmp_path / "a-file").read_text() == "mine"
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "bench.json").write_text("{}")
    code, _, err = run_cli(
        monkeypatch, capsys, "bench", "--out", str(tmp_path / "done"), "--backbone", str(tiny_model_dir)
    )
    assert code == 1 and "bench.json exists" in err


def test_a_reference_on_other_windows_is_refused():
    model = tiny_hmt("llama", segment_length=8, num_sensory=2)
    other = tiny_hmt("llama", segment_length=16, num_sensory=2)
    with pytest.raises(ValueError, match="same windows"):
        run_eval(model, random_ids(1, 50)[0], EvalConfig(modes=("backbone",)), reference=other)
