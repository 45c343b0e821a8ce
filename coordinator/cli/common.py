"""What every command shares: exit codes, the console, logging setup and the one error handler."""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from msfusion.errors import BundleError, ConfigError, DataError, MsfusionError
from msfusion.progress import ProgressCallback

console = Console()


class ExitCode(enum.IntEnum):
    """What the process exit status means (README.md, "Exit codes", lists them per command)."""

    SUCCESS = 0
    RUN_FAILED = 1  # a round stayed below quorum, or too few devices came
    CONFIG_ERROR = 2
    BROKER_UNAVAILABLE = 3
    DATA_ERROR = 4
    FLASH_FAILED = 5  # a bundle could not be built or installed
    INTERRUPTED = 130


def setup_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    else:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def exit_for(exc: BaseException) -> ExitCode:
    from msfusion.wire.transport import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable):
        return ExitCode.BROKER_UNAVAILABLE
    if isinstance(exc, BundleError):
        return ExitCode.FLASH_FAILED
    if isinstance(exc, DataError):
        return ExitCode.DATA_ERROR
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG_ERROR
    if isinstance(exc, (ValueError, ArithmeticError, OSError)):
        return ExitCode.CONFIG_ERROR  # a malformed flag value (also "1/0"), an unreadable file
    return ExitCode.RUN_FAILED  # DeviceLost and the rest


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """The one place where a command's errors become a message (never a traceback) and an exit code."""
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except (MsfusionError, ValueError, ArithmeticError, OSError) as exc:
        # Text, not markup: an error naming a path or a `[table]` must print as it is.
        console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)  # one line, however long
        raise typer.Exit(exit_for(exc)) from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM unwinds it as SIGINT (Ctrl-C) does: a `KeyboardInterrupt` in the main thread.

    Python's default SIGTERM ends the process at once, running no `finally`: a command that started
    processes (`simulate`: the broker, the device daemons) would leave them running. Raised instead,
    every clean-up runs as on a normal exit, and `cli_errors` exits 130. Once: the handler gives SIGTERM
    back its default, so a second one ends the process at once. A SIGTERM with a handler of someone
    else's, or ignored, is left as it is (as is SIGINT, which raises `KeyboardInterrupt` already).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_T = TypeVar("_T")


def parse_list(text: str, flag: str, convert: Callable[[str], _T], what: str, example: str) -> tuple[_T, ...]:
    """A comma-separated flag value, each part through `convert` (ValueError: a bad part).

    Raises:
        ConfigError: a bad or missing part, in one line naming the flag and an example.
    """
    try:
        values = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"{flag} must be comma-separated {what} (e.g. {example}), got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (ValueError otherwise)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """`--channels 8,16,32`: the conv widths, positive integers (None: the model's default)."""
    if not text:
        return None
    return parse_list(text, "--channels", positive_int, "positive integers", "8,16,32")


def check_backend(backend: str) -> str:
    """`--backend`: one of the artifact kinds a fleet trains."""
    from msfusion.coordinator.fleet.config import BACKENDS

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def check_rounds(rounds: int) -> int:
    """`--rounds`: at least one (checked before any data is partitioned)."""
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    return rounds


@contextlib.contextmanager
def progress_bars(out: Console | None = None) -> Iterator[ProgressCallback]:
    """A `msfusion.progress.ProgressCallback` that draws one rich bar per label, with elapsed time and ETA.

    Silent when the console is not a terminal (a pipe, a log file, CI): the commands' own
    one-line results are what such a reader wants.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = out or console
    bars = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),  # labels hold paths and ids: never markup
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=not out.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total)
        bars.update(tasks[label], completed=done, total=total)

    with bars:
        yield update
