"""Peak memory of a training run: RSS sampled by a background thread, plus the kernel's high-water mark (torch-free).

RSS sampling every ~10 ms catches the peak of a step unless it lasts less than
one interval; the kernel's VmHWM (/proc/self/status) never misses one but
covers the whole process life, so `MemorySampler` resets it at start where
Linux allows (writing 5 to /proc/self/clear_refs). USS (memory this process
alone holds) is read from /proc/self/smaps_rollup, which is cheap enough for
every tenth sample.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")
_USS_EVERY = 10


@dataclass(frozen=True)
class MemoryReport:
    """Memory figures of one sampled interval, in bytes.

    Attributes:
        baseline_rss_bytes: RSS when sampling started.
        peak_rss_bytes: the largest RSS seen (samples and, where it was reset, VmHWM).
        peak_uss_bytes: the largest USS seen (0 where USS is not readable).
        hwm_bytes: VmHWM at the end (0 where unreadable).
        hwm_reset: whether VmHWM was reset at start (so it covers only the interval).
        samples: number of RSS samples taken.
    """

    baseline_rss_bytes: int
    peak_rss_bytes: int
    peak_uss_bytes: int
    hwm_bytes: int
    hwm_reset: bool
    samples: int

    @property
    def growth_bytes(self) -> int:
        """Peak RSS above the baseline: what the interval itself added."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)


def read_hwm_bytes() -> int:
    """VmHWM of this process in bytes (0 where /proc is not available)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def read_uss_bytes() -> int:
    """Private (unique) memory of this process from smaps_rollup, or 0 where unreadable."""
    try:
        total = 0
        for line in _SMAPS_ROLLUP.read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
        return total
    except (OSError, ValueError, IndexError):
        return 0


class MemorySampler:
    """Samples this process's memory on a daemon thread while in use.

    Use as a context manager (or `start()` / `stop()`); `report` holds the
    figures once stopped.

    Args:
        interval_s: seconds between RSS samples.
        reset_hwm: reset the kernel's high-water mark at start.
    """

    def __init__(self, interval_s: float = 0.01, *, reset_hwm: bool = True) -> None:
        self.interval_s = interval_s
        self._reset_hwm = reset_hwm
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = self._peak_rss = self._peak_uss = self._samples = 0
        self._hwm_reset = False
        self.report: MemoryReport | None = None

    def start(self) -> MemorySampler:
        """Begin sampling."""
        self._hwm_reset = reset_hwm() if self._reset_hwm else False
        self._baseline = self._peak_rss = self._process.memory_info().rss
        self._peak_uss = read_uss_bytes()
        self._samples = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="msfusion-memory", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        self._peak_rss = max(self._peak_rss, rss)
        self._samples += 1
        if self._samples % _USS_EVERY == 0:
            self._peak_uss = max(self._peak_uss, read_uss_bytes())

    def peak_bytes(self) -> int:
        """The peak so far, while sampling: the largest sampled RSS and, where it was reset, VmHWM.

        VmHWM catches a spike shorter than one sampling interval; the memory
        guard (`trainer.train_local(memory_budget_bytes=...)`) reads this between steps.
        """
        return max(self._peak_rss, read_hwm_bytes()) if self._hwm_reset else self._peak_rss

    def stop(self) -> MemoryReport:
        """Stop sampling; returns (and keeps in `report`) the figures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        self._peak_uss = max(self._peak_uss, read_uss_bytes())
        hwm = read_hwm_bytes()
        peak = max(self._peak_rss, hwm) if self._hwm_reset else self._peak_rss
        self.report = MemoryReport(self._baseline, peak, self._peak_uss, hwm, self._hwm_reset, self._samples)
        return self.report

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def release_memory() -> int:
    """Give freed memory back to the OS after a task (garbage, then glibc's free lists); returns the RSS after.

    A task stopped for its memory budget has freed its runtime's buffers, but
    glibc keeps freed heap pages mapped; `malloc_trim(0)` returns them, so the
    daemon's RSS falls back instead of staying at the failed task's peak.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass
    return current_rss_bytes()
