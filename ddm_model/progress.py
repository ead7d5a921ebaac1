"""Rich progress bars shared by training, sampling and (later) transfers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


def progress_bar() -> Progress:
    """A bar with a description, n/total, a free-form ``info`` field (loss, throughput) and times."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def transfer_bar() -> Progress:
    """A bar for bytes: a description, size done and total, speed and time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@contextlib.contextmanager
def maybe_progress(progress: Progress | bool) -> Iterator[Progress | None]:
    """Use the caller's bar, open a new one (True), or show nothing (False)."""
    if progress is False:
        yield None
    elif progress is True:
        with progress_bar() as bar:
            yield bar
    else:
        yield progress


def log_to_stderr(log: logging.Logger) -> None:
    """``log``'s lines, and nobody else's, at INFO on stderr: for code that runs inside another
    program's process (a Flower app), whose root logger is not ddm's to configure."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
