"""Progress bars on stderr (rich) for long work; silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(label),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=total)

    def advance(self, n: int = 1, text: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"description": text} if text is not None else {}))

    def set(self, completed: int, text: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, **({"description": text} if text is not None else {}))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
