"""Progress from library code without a display library: a callback the caller may pass (torch-free, no rich).

A `ProgressCallback` is called as `progress(label, done, total)`: the work
named `label` has `done` of its `total` steps done. It is called with
`done == 0` when the work starts and with `done == total` when it ends; each
label is one piece of work (the CLI draws one bar per label). Library code
takes an optional callback and never prints; `msfusion.coordinator.cli`
passes one that draws rich progress bars.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

ProgressCallback = Callable[[str, int, int], None]

__all__ = ["ProgressCallback", "step"]


@contextlib.contextmanager
def step(progress: ProgressCallback | None, label: str) -> Iterator[None]:
    """One step of work as a 0-of-1 / 1-of-1 pair of calls (nothing when `progress` is None).

    The closing call is made on success only: a failed step leaves its bar
    unfinished, and the error says why.
    """
    if progress is not None:
        progress(label, 0, 1)
    yield
    if progress is not None:
        progress(label, 1, 1)
