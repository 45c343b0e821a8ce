"""What every command shares: exit codes, the console, logging setup and the one error handler."""

from __future__ import annotations

import contextlib
import enum
import logging
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.text import Text

from msfusion.errors import BundleError, ConfigError, DataError, MsfusionError

console = Console()


class ExitCode(enum.IntEnum):
    """What the process exit status means."""

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
        console.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(exit_for(exc)) from None
