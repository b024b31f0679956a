"""Progress bars (rich) with images/s and ETA; silent when disabled or not on a terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        if not self.enabled:
            yield lambda *_, **__: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with RichProgress(*columns, transient=False) as bar:
            task_id = bar.add_task(description, total=total, info="")

            def tick(advance: int = 1, total: int | None = None, **info: float) -> None:
                if total is not None:
                    bar.update(task_id, total=total)
                text = "  ".join(f"{k} {v:.3g}" for k, v in info.items())
                bar.update(task_id, advance=advance, info=text)

            yield tick
