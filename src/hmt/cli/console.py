"""Terminal output shared by commands: rich progress bars fed by the library's progress callbacks."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ModeProgress:
    """One bar per mode, usable as run_eval's progress callback (mode, tokens done, tokens in all)."""

    def __init__(self, console: Console, modes: tuple[str, ...], total: int, unit: str = "tokens") -> None:
        self.bar = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.modes, self.total = modes, total
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ModeProgress:
        self.bar.__enter__()
        self.tasks = {mode: self.bar.add_task(mode, total=self.total, start=False) for mode in self.modes}
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, mode: str, done: int, total: int) -> None:
        task = self.tasks[mode]
        self.bar.start_task(task)  # the clock of a mode starts with its first chunk, not with the bar
        self.bar.update(task, completed=done, total=total)


class StepProgress:
    """A bar over optimizer steps showing the latest loss, tokens/s and validation ppl (train's callback)."""

    def __init__(self, console: Console, total: int, enabled: bool = True, label: str = "step") -> None:
        self.bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.total = total
        self.task = None

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, step: int, total: int, record: dict[str, Any] | None) -> None:
        info = None
        if record and "loss" in record:
            info = f"loss {record['loss']:.3f} · {record['tokens_per_second']:.0f} tok/s"
            if "val_ppl" in record:
                info += f" · val ppl {record['val_ppl']:.2f}"
        self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
