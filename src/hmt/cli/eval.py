"""`hmt eval`: perplexity of every mode on the same tokens of one long text; a table, results.json, plots."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FullWindowOpt,
    NumSensoryOpt,
    OverwriteOpt,
    RecallQueryOpt,
    SegmentLengthOpt,
    SharpenRecallOpt,
    SplitOpt,
    SummaryLengthOpt,
    given,
    split_list,
)

RESULTS_NAME = "results.json"


def eval_command(
    modes: Annotated[
        str, typer.Option(help="Comma-separated modes: backbone, sliding, memory_off, rmt, hmt, full.")
    ] = "backbone,rmt,hmt,full",
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    sharpen_recall_after: SharpenRecallOpt = None,
    summary_length: SummaryLengthOpt = None,
    recall_query: RecallQueryOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Read the first this many tokens of the text.")] = 16384,
    data: DataOpt = "essays",
    split: SplitOpt = None,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    lora_baselines: Annotated[
        bool,
        typer.Option(
            help="Read the backbone and full rows with the adapter's LoRA too (default: the untouched "
            "backbone, what you would run instead of HMT)."
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and plots; default runs/eval-<time>.")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    full_window: FullWindowOpt = None,
    reset_every: Annotated[
        int | None,
        typer.Option(
            help="Empty the memory cache every this many segments (e.g. the training unroll); default: never."
        ),
    ] = None,
    interleave: Annotated[
        str | None,
        typer.Option(help="Topic switching: DATA:M alternates M tokens of the text with M tokens of DATA."),
    ] = None,
    dilate: Annotated[
        str | None,
        typer.Option(
            help="Dilation: EVERY:LENGTH inserts LENGTH filler tokens after every EVERY tokens (unscored)."
        ),
    ] = None,
    filler: Annotated[str, typer.Option(help="Text whose tokens make the dilation filler.")] = "$",
    seed: Annotated[
        int, typer.Option(help="Seed of the untrained memory parameters when no adapter is given.")
    ] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Perplexity of HMT against the windowed, sliding-window and full-context backbone on one long text."""
    from rich.console import Console

    from hmt.backbone import quiet_transformers, resolve_device
    from hmt.cli.console import ModeProgress
    from hmt.evaluate import EvalConfig, make_report, run_eval, write_report
    from hmt.io import check_output

    console = Console()
    eval_config = EvalConfig(modes=split_list(modes), full_window=full_window, reset_every=reset_every)
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
    resolve_device(device)
    adapter = resolve_adapter(adapter, backbone)
    out = out or Path("runs") / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = check_output(out, RESULTS_NAME, overwrite)  # before anything long
    reading = given(
        segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size,
        sharpen_recall_after=sharpen_recall_after,
        summary_length=summary_length, recall_query=recall_query,
    )  # fmt: skip

    quiet_transformers()
    with console.status("loading the backbone (the first use of a .gguf file converts it, ~30 s)"):
        loaded = load_models(backbone, adapter, reading, dtype, device, seed, lora_baselines)
    model, reference, plain, labels = loaded
    stream, score_mask, data_info = build_stream(
        plain.tokenizer, data, split, max_tokens, interleave, dilate, filler
    )
    console.print(
        f"backbone [bold]{plain.name}[/] ({plain.dtype}, {model.device}) · data [bold]{data_info['spec']}[/] "
        f"split {data_info['split']}, {data_info['documents']} documents, {data_info['tokens']:,} tokens"
    )
    if data_info["tokens"] < max_tokens:
        console.print(
            f"[yellow]note:[/] the text has only {data_info['tokens']:,} tokens (asked for {max_tokens:,})"
        )
    console.print(f"adapter: {labels['adapter']}")

    with ModeProgress(console, eval_config.modes, data_info["tokens"]) as progress:
        results = run_eval(model, stream, eval_config, score_mask, progress=progress, reference=reference)
    weights = {mode: labels[r.weights] for mode, r in results.items()}
    report = make_report(
        results,
        model_config=model.config.to_dict(),
        backbone=plain.describe(),
        data=data_info,
        adapter=str(adapter) if adapter else None,
        adapter_note=labels["adapter"],
        settings={
            "max_tokens": max_tokens,
            "full_window": results["full"].window if "full" in results else None,
            "reset_every": reset_every,
            "seed": seed,
            "weights": weights,
        },
    )
    written = [write_report(report, results_path), *_plots(report, out)]
    console.print(results_table(results, weights, labels["adapter"]))
    for line in diagnostics(results):
        console.print(line)
    console.print("wrote " + ", ".join(str(p) for p in written))


def resolve_adapter(adapter: Path | None, backbone: str | None) -> Path | None:
    """`--adapter none` means untrained memory; no `--adapter` with the default backbone means the
    adapter shipped for it (if this installation has one)."""
    from hmt.io import shipped_adapter

    if adapter is not None:
        return None if str(adapter).lower() == "none" else adapter
    return shipped_adapter() if backbone is None else None


def load_models(backbone_spec, adapter, reading, dtype, device, seed, lora_baselines):
    """(model, reference for the baseline rows or None, the plain backbone, labels of the weights).

    The model is the adapter on the backbone (its LoRA merged into a copy; an adapter trained with the
    whole backbone fine-tuned on that saved backbone), or untrained memory parameters (seeded)."""
    import torch

    from hmt.backbone import has_lora, load_backbone, saved_backbone
    from hmt.config import HMTConfig
    from hmt.io import CONFIG_NAME, shipped_adapter
    from hmt.model import HMTForCausalLM

    if adapter is None:
        plain = load_backbone(backbone_spec, dtype=dtype, device=device)
        torch.manual_seed(seed)
        model = HMTForCausalLM(plain.model, HMTConfig(**reading))
        note = f"none: the memory rows use untrained memory parameters (seed {seed})"
        return model, None, plain, {"adapter": note, "model": "untouched backbone"}
    shipped = adapter == shipped_adapter()
    note = f"{'the shipped' if shipped else 'trained'} adapter {adapter.name if shipped else adapter}"
    saved = saved_backbone(adapter)
    if saved is not None:  # the whole backbone was fine-tuned: it is in the adapter
        original = backbone_spec or HMTConfig.from_json_file(adapter / CONFIG_NAME).backbone
        tuned = load_backbone(saved, dtype=dtype, device=device)
        model = HMTForCausalLM.from_pretrained(adapter, tuned.model, **reading)
        plain = load_backbone(original, dtype=dtype, device=device) if not lora_baselines else tuned
        own = "the adapter's fine-tuned backbone"
    else:
        plain = load_backbone(backbone_spec, dtype=dtype, device=device)
        model = HMTForCausalLM.from_pretrained(adapter, plain.model, **reading)
        own = "backbone + the adapter's LoRA" if has_lora(adapter) else "untouched backbone"
    reference = None
    if model.backbone is not plain.model and not lora_baselines:
        reference = HMTForCausalLM(plain.model, model.config)  # baseline rows read no HMT parameter
    return model, reference, plain, {"adapter": note, "model": own, "reference": "untouched backbone"}


def build_stream(tokenizer, data, split, max_tokens, interleave_spec, dilate_spec, filler):
    """The token stream to score, which of its positions to score (None: all) and a description of it."""
    import torch

    from hmt.data import dilate, filler_mask, interleave, load_documents, resolve_split, token_stream

    documents = load_documents(data, split)
    stream = token_stream(documents, tokenizer, max_tokens)
    info: dict[str, Any] = {
        "spec": data,
        "split": resolve_split(data, split),
        "documents": len(documents),
        "document_names": [d.name for d in documents],
        "transforms": {},
    }
    score_mask = None
    if interleave_spec:
        other, every_text = _pair(interleave_spec, "--interleave", "DATA:M")
        every = _positive(every_text, "--interleave", "DATA:M")
        other_docs = load_documents(other, split)
        stream = interleave(stream, token_stream(other_docs, tokenizer, max_tokens), every)
        info["transforms"]["interleave"] = {"with": other, "every": every, "documents": len(other_docs)}
    if dilate_spec:
        every_text, length_text = _pair(dilate_spec, "--dilate", "EVERY:LENGTH")
        every = _positive(every_text, "--dilate", "EVERY:LENGTH")
        length = _positive(length_text, "--dilate", "EVERY:LENGTH")
        filler_ids = torch.tensor(tokenizer(filler, add_special_tokens=False).input_ids, dtype=torch.long)
        text_length = stream.shape[0]
        stream = dilate(stream, filler_ids, every, length)
        score_mask = ~filler_mask(text_length, every, length)
        info["transforms"]["dilate"] = {"every": every, "length": length, "filler": filler}
    if stream.shape[0] > max_tokens:
        stream = stream[:max_tokens]
        score_mask = score_mask[:max_tokens] if score_mask is not None else None
    info["tokens"] = int(stream.shape[0])
    info["requested_tokens"] = max_tokens
    return stream, score_mask, info


SHORT_WEIGHTS = {
    "untouched backbone": "plain",
    "backbone + the adapter's LoRA": "+LoRA",
    "the adapter's fine-tuned backbone": "tuned",
}


def results_table(results, weights: dict[str, str], adapter_note: str):
    from rich.table import Table

    caption = (
        f"adapter: {adapter_note}\nweights: plain = the untouched backbone, +LoRA = with the adapter's LoRA, "
        "tuned = the adapter's fine-tuned backbone\nsegment starts: the first eighth of every segment's positions"
    )
    table = Table(title="Perplexity on the same tokens", caption=caption)
    columns = (
        "mode",
        "weights",
        "window",
        "ppl",
        "vs backbone",
        "segment starts",
        "tokens scored",
        "seconds",
        "tokens/s",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("mode", "weights") else "right", no_wrap=column == "mode"
        )
    reference = results.get("backbone")
    for mode, r in results.items():
        relative = f"{100 * (r.ppl / reference.ppl - 1):+.1f}%" if reference else "-"
        start = f"{r.offset_ppl[0]:.2f}" if r.offset_ppl and r.offset_ppl[0] is not None else "-"
        table.add_row(
            mode, SHORT_WEIGHTS[weights[mode]], str(r.window), f"{r.ppl:.2f}", relative, start, str(r.tokens_scored),
            f"{r.seconds:.0f}", f"{r.tokens_per_second:.0f}",
        )  # fmt: skip
    return table


def diagnostics(results) -> list[str]:
    """One line per memory mode: memory vs embedding scale, and how sharply recall chose."""
    lines = []
    for mode, r in results.items():
        if r.embedding_norm is None:
            continue
        line = f"{mode}: memory norm {r.memory_norm or 0:.2f} (token embeddings {r.embedding_norm:.2f})"
        if r.recall is not None and r.recall.segments:
            top, share = r.recall.most_common_distance()
            line += (
                f"; recall entropy {r.recall.mean_entropy:.2f} nats, strongest weight "
                f"{r.recall.mean_max_weight:.2f}, most often {top} segment(s) back "
                f"({share:.0%} of segments), on the oldest entry held in {r.recall.oldest_share:.0%}"
            )
        lines.append(line)
    return lines


def _plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from hmt.plots import plot_ppl_by_position, plot_recall_distances

    paths = [plot_ppl_by_position(report, out_dir / "ppl_by_position.png")]
    if "hmt" in report["modes"] and report["modes"]["hmt"]["recall"]["segments"]:
        paths.append(plot_recall_distances(report, out_dir / "recall_distance.png"))
    return paths


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
