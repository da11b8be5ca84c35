"""`hmt qa`: facts far back, asked the way a user asks — chat template, free greedy generation, the
value found whole in the answer — on held-out phrasings and text; `hmt voice`: what must not be lost."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

from hmt.cli.options import (
    AdapterOpt,
    BackboneOpt,
    CacheSizeOpt,
    DeviceOpt,
    DtypeOpt,
    NumSensoryOpt,
    OverwriteOpt,
    SegmentLengthOpt,
    SetOpt,
    reading_settings,
    split_ints,
    split_list,
)

RESULTS_NAME = "results.json"
OutOpt = Annotated[Path | None, typer.Option(help="Folder for results.json; default runs/<command>-<time>.")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Most tokens each answer may have (greedy).")]


def _load(backbone, adapter, reading, dtype, device, seed):
    """The model read through the ask path (always the causal query: the question is the answer's)."""
    from hmt.loading import load_model

    loaded = load_model(backbone, adapter=adapter, settings=reading | {"recall_query": "causal"}, dtype=dtype,
                        device=device, seed=seed)  # fmt: skip
    return loaded.adapter, loaded.model, loaded.backbone, loaded.weights


def qa_command(
    tasks: Annotated[
        str, typer.Option(help="fact, multikey (--num-facts facts, --asked of them asked), qa1, qa2, qa3.")
    ] = "fact",
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "4096,16384",
    depths: Annotated[
        str, typer.Option(help="Depths of the asked fact, percent, comma-separated.")
    ] = "0,50,100",
    trials: Annotated[int, typer.Option(help="Samples per (task, length, depth) cell.")] = 2,
    rows: Annotated[str, typer.Option(help="Ways of reading: full, sliding, hmt.")] = "full,sliding,hmt",
    num_facts: Annotated[int, typer.Option(help="Facts in a multikey sample (2-8).")] = 4,
    asked: Annotated[int, typer.Option(help="How many of them one question asks.")] = 1,
    data: Annotated[
        str, typer.Option(help="Haystack text (bundled name, file, folder, .jsonl or hf:...).")
    ] = "essays",
    split: Annotated[
        str,
        typer.Option(
            help="Split of the fact templates and values, and of a bundled haystack (held out: test; other text is read whole)."
        ),
    ] = "test",
    max_new_tokens: MaxNewTokensOpt = 48,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    out: OutOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the samples (the same for every row).")] = 0,
    answers: Annotated[
        bool, typer.Option(help="Also print every trial's question, value and answers.")
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Ask about facts hidden far back, through the ask path (as hmt ask does): % of answers that state
    every value asked, per task and context length, for each row."""
    import json

    from rich.console import Console

    from hmt.backbone import context_length
    from hmt.cli.console import ModeProgress
    from hmt.data.corpus import BUNDLED_CORPORA, load_documents, token_stream
    from hmt.facts import SPLITS, FactMaker
    from hmt.io import check_output, write_text_atomic
    from hmt.qa import QAConfig, run_qa

    console = Console()
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    try:
        depth_values = tuple(float(d) / 100 for d in split_list(depths))
    except ValueError:
        raise ValueError(f"--depths takes comma-separated percentages, got {depths!r}") from None
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    config = QAConfig(
        tasks=split_list(tasks), lengths=split_ints(lengths, "--lengths"), depths=depth_values, trials=trials,
        rows=split_list(rows), num_facts=num_facts, asked=asked, max_new_tokens=max_new_tokens, seed=seed,
    )  # fmt: skip
    # A bundled corpus gives the split's documents; a user's own text is read whole (it is held out).
    documents = load_documents(data, split if data in BUNDLED_CORPORA else None)
    out = out or Path("runs") / f"qa-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = check_output(out, RESULTS_NAME, overwrite)
    with console.status("loading the model"):
        adapter, model, plain, labels = _load(backbone, adapter, reading, dtype, device, seed)
        haystack = token_stream(documents, plain.tokenizer)
    if haystack.numel() == 0:
        raise ValueError(f"{data} ({split} split) holds no text to make a haystack from")
    window = context_length(plain.model.config) or 2048
    console.print(
        f"backbone [bold]{plain.name}[/] · adapter: {labels['adapter']} · haystack {data} ({split}), "
        f"{haystack.numel():,} tokens"
        + (" (repeats to fill the longest context)" if haystack.numel() < max(config.lengths) else "")
        + f" · templates and values: {split} half"
    )
    trials_in_all = len(config.tasks) * len(config.lengths) * len(config.depths) * config.trials
    with ModeProgress(console, config.rows, trials_in_all, unit="trials") as progress:
        report = run_qa(
            model, plain.model, plain.tokenizer, FactMaker(plain.tokenizer, haystack, split), config, window,
            progress=progress,
        )  # fmt: skip
    report.update(
        backbone=plain.describe(), adapter=str(adapter) if adapter else None, adapter_note=labels["adapter"],
        data={"spec": data, "split": split, "tokens": int(haystack.numel())}, model_config=model.config.to_dict(),
        date=datetime.now().isoformat(timespec="seconds"),
    )  # fmt: skip
    write_text_atomic(results_path, json.dumps(report, indent=2) + "\n")
    if answers:
        console.print(qa_answers_table(report))
    console.print(qa_table(report))
    console.print(f"wrote {results_path}")


def qa_table(report: dict[str, Any]) -> Table:
    """Rows x (task @ length): % of answers stating every value asked."""
    from rich.table import Table

    keys = list(next(iter(report["summary"].values())))
    table = Table(title="ask path: % of answers that state the value (greedy, chat template)")
    table.add_column("row")
    for key in keys:
        task, length = key.split("@")
        table.add_column(f"{task} {int(length):,}", justify="right")
    table.add_column("s / trial", justify="right")
    for row, summary in report["summary"].items():
        cells = report["rows"][row]
        seconds = sum(c["seconds_per_trial"] for c in cells) / len(cells)
        table.add_row(row, *(f"{100 * summary[key]:.0f}" for key in keys), f"{seconds:.1f}")
    return table


def qa_answers_table(report: dict[str, Any]) -> Table:
    """One line per trial: the task, how far back the fact was, the value, each row's answer."""
    from rich.table import Table

    table = Table(title="what each row answered (✓ states the value)")
    for name in ("task", "tokens", "back", "value"):
        table.add_column(name, justify="right")
    rows = list(report["rows"])
    for row in rows:
        table.add_column(row)
    for index, cell in enumerate(report["rows"][rows[0]]):
        for trial, truth in enumerate(cell["trials"]):
            answered = [report["rows"][row][index]["trials"][trial] for row in rows]
            table.add_row(
                cell["task"], f"{cell['length']:,}", f"{truth['distance']:,}", ", ".join(truth["expected"]),
                *(f"{a['answer'][:80]!r} {'✓' if a['correct'] else '✗'}" for a in answered),
            )  # fmt: skip
    return table


def voice_command(
    prompts: Annotated[
        Path | None,
        typer.Option(help="A text file of prompts, one a line (default: the bundled held-out set)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Use the first N prompts (0: all).")] = 0,
    context_tokens: Annotated[
        int,
        typer.Option(help="Also ask each prompt after reading this many tokens of unrelated text (0: no)."),
    ] = 4096,
    data: Annotated[
        str, typer.Option(help="The unrelated text read before asking (bundled corpora: their test split).")
    ] = "essays",
    max_new_tokens: MaxNewTokensOpt = 48,
    backbone: BackboneOpt = None,
    adapter: AdapterOpt = None,
    segment_length: SegmentLengthOpt = None,
    num_sensory: NumSensoryOpt = None,
    cache_size: CacheSizeOpt = None,
    settings: SetOpt = None,
    out: OutOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of untrained memory parameters.")] = 0,
    answers: Annotated[bool, typer.Option(help="Also print each prompt's answers.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Does memory take anything away? Short chats through the ask path against the untouched backbone:
    KL per token on its own answers, first sentences that agree, digit runs it does not write."""
    import json

    from rich.console import Console

    from hmt.cli.console import ModeProgress
    from hmt.data.corpus import load_documents, token_stream
    from hmt.io import check_output, write_text_atomic
    from hmt.prompts import chat_prompts
    from hmt.qa import read_into_memory
    from hmt.voice import voice_report

    console = Console()
    reading = reading_settings(
        settings, segment_length=segment_length, num_sensory=num_sensory, cache_size=cache_size
    )
    if prompts is not None:
        if not prompts.is_file():
            raise FileNotFoundError(f"{prompts} is not a file")
        chosen = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(prompts)
    else:
        chosen, source = chat_prompts("test"), "bundled held-out prompts (hmt/data/chat_prompts.json, test)"
    if limit < 0 or context_tokens < 0:
        raise ValueError("--limit and --context-tokens must be >= 0")
    chosen = chosen[:limit] if limit else chosen
    if not chosen:
        raise ValueError(f"{source} holds no prompt")
    # a bundled corpus: its held-out test split; a file or folder: all of it (one file has no test split)
    documents = load_documents(data) if context_tokens else []
    out = out or Path("runs") / f"voice-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results_path = check_output(out, RESULTS_NAME, overwrite)
    with console.status("loading the model"):
        adapter, model, plain, labels = _load(backbone, adapter, reading, dtype, device, seed)
    contexts: dict[str, Any] = {"empty": None}
    if context_tokens:
        text = token_stream(documents, plain.tokenizer, context_tokens)
        with console.status(f"reading {len(text):,} tokens of {data}"):
            contexts[f"after {len(text):,} tokens of {data}"] = read_into_memory(model, text)
    console.print(
        f"backbone [bold]{plain.name}[/] · adapter: {labels['adapter']} · {len(chosen)} prompts: {source}"
    )
    with ModeProgress(console, tuple(contexts), len(chosen), unit="prompts") as progress:
        report = voice_report(model, plain.model, plain.tokenizer, chosen, max_new_tokens, contexts, progress)
    report.update(
        backbone=plain.describe(), adapter=str(adapter) if adapter else None, adapter_note=labels["adapter"],
        prompts_source=source, date=datetime.now().isoformat(timespec="seconds"),
    )  # fmt: skip
    write_text_atomic(results_path, json.dumps(report, indent=2) + "\n")
    if answers:
        console.print(voice_answers_table(report))
    console.print(voice_table(report))
    console.print(f"wrote {results_path}")


def voice_table(report: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title=f"short chats against the untouched backbone ({report['prompts']} prompts, greedy)")
    columns = ("memory", "mean KL (nats/token)", "same first sentence %", "new digit runs (of 7+)")
    for name in columns:
        table.add_column(name, justify="right" if name != "memory" else "left")
    for name, result in report["memories"].items():
        table.add_row(
            name, f"{result['mean_kl']:.3f}", f"{100 * result['same_first_sentence']:.0f}",
            f"{result['answers_with_new_digit_runs']} ({result['answers_with_new_long_digit_runs']})",
        )  # fmt: skip
    return table


def voice_answers_table(report: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="answers (first memory)")
    for name in ("prompt", "backbone", "hmt", "KL"):
        table.add_column(name)
    rows = next(iter(report["memories"].values()))["rows"]
    for row in rows:
        table.add_row(row["prompt"], row["backbone"][:100], row["hmt"][:100], f"{row['kl']:.3f}")
    return table
