"""Speed and peak memory of reading a long stream: HMT against the windowed, sliding and full-context backbone.

Every (length, mode) pair is measured in a fresh process, so memory one measurement left in the process
cannot hide the next one's peak; the modes of one length run back to back, so their speed ratios come from
the same minutes of a shared machine. Speed does not depend on the text, so the stream is random token ids.
The model is what ships by default: the shipped adapter on the default backbone (its L, k, r and N; its
LoRA merged, as it is for reading), or any adapter given, or untrained memory parameters ("none").
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch

from hmt.evaluate import EVAL_MODES

Progress = Callable[[str, int, int], None]  # (mode, tokens) about to be measured, measurements done


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. The memory settings are the HMT ones; `full` reads windows of full_window tokens."""

    modes: tuple[str, ...] = ("backbone", "sliding", "hmt", "full")
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    adapter: str | None = None  # None: the shipped adapter for the default backbone; "none": untrained
    settings: dict = field(default_factory=dict)  # reading settings over the adapter's
    full_window: int | None = None  # None: the backbone's maximum positions
    repeats: int = 1  # each pair is measured this many times; the fastest run and the highest peak count
    backbone: str | None = None
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in EVAL_MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode(s) {', '.join(unknown) or '(none)'}: use {', '.join(EVAL_MODES)}")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be at least 2 tokens each, got {list(self.lengths)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")


@dataclass
class Measurement:
    mode: str
    tokens: int
    seconds: float
    tokens_per_second: float
    model_mb: float  # memory held once the model is loaded (process RSS on CPU, allocated on CUDA)
    peak_mb: float  # the highest memory while reading the stream
    memory: str  # what was measured: "rss" or "cuda"
    model_config: dict = field(default_factory=dict)  # the HMTConfig read with (L, k, r, N, ...)

    @property
    def growth_mb(self) -> float:
        """Memory the reading itself needed on top of the loaded model."""
        return max(self.peak_mb - self.model_mb, 0.0)

    def to_dict(self) -> dict:
        return asdict(self) | {"growth_mb": self.growth_mb}


def run_bench(config: BenchConfig, progress: Progress | None = None) -> list[Measurement]:
    """Measure every (length, mode) pair `repeats` times, each in a fresh process; one row per pair."""
    runs: dict[tuple[int, str], list[Measurement]] = {}
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no memory or threads inherited
    done = 0
    for _ in range(config.repeats):
        for tokens in config.lengths:
            for mode in config.modes:
                if progress is not None:
                    progress(mode, tokens, done)
                with ProcessPoolExecutor(1, mp_context=context) as pool:
                    runs.setdefault((tokens, mode), []).append(
                        pool.submit(measure, config, mode, tokens).result()
                    )
                done += 1
    return [_best(found) for found in runs.values()]


def _best(runs: list[Measurement]) -> Measurement:
    """The fastest run's speed and the highest peak's memory (with its own baseline)."""
    fastest = min(runs, key=lambda m: m.seconds)
    highest = max(runs, key=lambda m: m.peak_mb)
    return replace(fastest, model_mb=highest.model_mb, peak_mb=highest.peak_mb)


def measure(config: BenchConfig, mode: str, tokens: int) -> Measurement:
    """Load the backbone, warm up on two segments, then time reading `tokens` random ids and watch memory."""
    from hmt.evaluate import EvalConfig, run_eval

    model = _load(config).model
    generator = torch.Generator().manual_seed(config.seed)
    stream = torch.randint(0, model.vocab_size, (tokens,), generator=generator).to(model.device)
    eval_config = EvalConfig(modes=(mode,), full_window=config.full_window)
    run_eval(model, stream[: 2 * model.config.segment_length], eval_config)
    watcher = PeakMemory(model.device)
    with watcher:
        started = time.perf_counter()
        run_eval(model, stream, eval_config)
        seconds = time.perf_counter() - started
    return Measurement(
        mode=mode,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        model_mb=watcher.start_mb,
        peak_mb=watcher.peak_mb,
        memory=watcher.kind,
        model_config=model.config.to_dict(),
    )


def _load(config: BenchConfig | GenerationBenchConfig):
    from hmt.loading import load_model

    return load_model(
        config.backbone, adapter=config.adapter, settings=config.settings, dtype=config.dtype,
        device=config.device, seed=config.seed,
    )  # fmt: skip


class PeakMemory:
    """The highest memory inside a `with` block: CUDA allocator statistics, or on CPU the process's
    resident set sampled every millisecond (torch frees its buffers before Python could ask)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda" if self.cuda else "rss"
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            import psutil

            process = psutil.Process()
            self.start_mb = self.peak_mb = process.memory_info().rss / 2**20
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process) -> None:
        while not self._stop.wait(0.001):
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()


@dataclass(frozen=True)
class GenerationBenchConfig:
    """Generation speed of hmt against transformers' `generate` on the plain backbone, and the time to
    read a long text into a memory. The prompt is one window (L + k tokens) of random ids."""

    new_tokens: int = 256
    read_tokens: int = 65536
    repeats: int = 3  # runs of each generator, interleaved; the fastest counts
    adapter: str | None = None  # as BenchConfig
    settings: dict = field(default_factory=dict)
    backbone: str | None = None
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.read_tokens < 0 or self.repeats < 1:
            raise ValueError("new_tokens >= 1, read_tokens >= 0 and repeats >= 1, please")


def run_generation_bench(config: GenerationBenchConfig, progress: Progress | None = None) -> dict:
    """Greedy generation of `new_tokens` (no early stop) by both, `repeats` times interleaved so both see
    the same minutes of a shared machine; then one read of `read_tokens` tokens in 4,096-token calls."""
    loaded = _load(config)
    model, backbone = loaded.model, loaded.backbone
    # transformers' generate runs on the backbone hmt reads with (the adapter's LoRA merged, if it has one)
    plain = model.backbone
    generator = torch.Generator().manual_seed(config.seed)
    prompt_length = model.config.segment_length + model.config.num_sensory
    prompt = torch.randint(0, model.vocab_size, (1, prompt_length), generator=generator).to(model.device)
    runs: dict[str, list[float]] = {"transformers": [], "hmt": []}
    new = config.new_tokens
    for repeat in range(config.repeats):
        for name in runs:
            if progress is not None:
                progress(f"generate · {name}", new, repeat)
            started = time.perf_counter()
            with torch.no_grad():
                if name == "transformers":
                    out = plain.generate(
                        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False,
                    )  # fmt: skip
                    made = out.shape[1] - prompt_length
                else:
                    made = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None)
                    made = made.sequences.shape[1]
            runs[name].append(time.perf_counter() - started)
            if made != new:
                raise RuntimeError(f"{name} made {made} tokens instead of {new}")
    best = {name: min(times) for name, times in runs.items()}
    report: dict = {
        "model_config": model.config.to_dict(),
        "adapter": str(loaded.adapter) if loaded.adapter else None,
        "backbone": backbone.name,
        "prompt_tokens": prompt_length,
        "new_tokens": new,
        "seconds": best,
        "tokens_per_second": {name: new / seconds for name, seconds in best.items()},
        "hmt_vs_transformers": best["transformers"] / best["hmt"],
    }
    if config.read_tokens:
        if progress is not None:
            progress("read", config.read_tokens, config.repeats)
        stream = torch.randint(0, model.vocab_size, (1, config.read_tokens), generator=generator)
        stream = stream.to(model.device)
        state, started = None, time.perf_counter()
        with torch.no_grad():
            for start in range(0, config.read_tokens, 4096):
                state = model(stream[:, start : start + 4096], state=state, score=False).state
            if stream.device.type == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        floor = _body_seconds(plain, stream, model.config.segment_length)
        report["read"] = {
            "tokens": config.read_tokens,
            "seconds": seconds,
            "tokens_per_second": config.read_tokens / seconds,
            "backbone_body_seconds": floor,
            "vs_backbone_body": seconds / floor,
        }
    return report


def _body_seconds(backbone: torch.nn.Module, stream: torch.Tensor, window: int) -> float:
    """The floor under a read: the backbone's body alone (no LM head, nothing carried) over `stream` in
    windows of `window` tokens. Every token must pass through it once, whatever memory does."""
    body = backbone.get_decoder()
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, stream.shape[1], window):
            body(input_ids=stream[:, start : start + window], use_cache=False)
        if stream.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started
