"""`msfusion-device` (or `python -m msfusion.edge_runtime`): the device daemon, and the on-device profile.

    msfusion-device --config device.toml [--broker URL]          run the daemon
    msfusion-device profile --config device.toml --artifacts DIR [--widths 1,0.5,0.25,0.125] [--batch-sizes 32]

`profile` trains the real artifact a few steps per width and batch size, each
in a fresh process, prints peak memory and time per step, and saves the
profile in the state folder, which the daemon sends when it registers.

Exit codes (the daemon): 0 stopped (told to by the coordinator, or SIGTERM / SIGINT),
1 internal error, 2 config (a bad device.toml or flag, or the broker refused the
credentials), 3 the coordinator refused the registration (its log says why).
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from msfusion.errors import ConfigError, MsfusionError

if TYPE_CHECKING:
    pass


class ProfileExit(enum.IntEnum):
    """Exit codes of `msfusion-device profile`."""

    SUCCESS = 0
    FAILED = 1  # no point could be measured
    CONFIG = 2


PROFILE_EXIT_CODES = (
    "Exit codes: 0 profiled (and saved), 1 no point could be measured, "
    "2 config (a bad device.toml, flag or profile set)."
)


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def profile_main(argv: list[str]) -> int:
    """`msfusion-device profile ...`: measure, print a table, save the profile; returns a `ProfileExit`."""
    parser = argparse.ArgumentParser(
        prog="msfusion-device profile",
        description="Measure peak memory and step time "
        "of the real training artifact at candidate widths and batch sizes.",
        epilog=PROFILE_EXIT_CODES,
    )
    parser.add_argument("--config", required=True, help="device config TOML")
    parser.add_argument(
        "--artifacts",
        type=Path,
        required=True,
        help="a profile set, or a folder of them (one per backend), made on the coordinator by "
        "`msfusion devices profile-set`; every backend of this device's `backends` that it holds is profiled",
    )
    parser.add_argument("--widths", type=_floats, default=None, help="width ratios (default 1,0.5,0.25,0.125)")
    parser.add_argument(
        "--batch-sizes", type=_ints, default=None, help="batch sizes (default: the set's, or the run's)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--out", type=Path, help="where to save the profile (default: <state_dir>/profile.json)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    from msfusion.data.shards import DATA_FILE
    from msfusion.edge_runtime.config import load_device_config
    from msfusion.edge_runtime.profiling import (
        PROFILE_FILE,
        ProfileOptions,
        format_table,
        load_profile_sets,
        profile_report,
        run_profile,
        save_profile,
    )

    log = logging.getLogger("msfusion.device")
    try:
        config = load_device_config(args.config)
        data_dir = config.data_dir if config.data_dir is not None and (config.data_dir / DATA_FILE).exists() else None
        options = ProfileOptions(
            steps=args.steps,
            warmup=args.warmup,
            threads=config.threads,
            backends=config.backends,
            data_dir=data_dir,
            device=config.device,
        )
        every = load_profile_sets(args.artifacts)
        # Every backend this board runs that the folder holds (the coordinator picks the fastest that fits).
        sets = [s for s in every if s.kind in config.backends]
        if not sets:
            raise ConfigError(
                f"{args.artifacts} holds {[s.kind for s in every]} artifacts; this device runs {list(config.backends)}"
            )
        results = [r for s in sets for r in run_profile(s, args.widths, args.batch_sizes, options)]
        report = profile_report(config.run_id, config.device_id, sets[0].model_key, results)
    except MsfusionError as exc:
        log.error("%s", exc)
        return int(ProfileExit.CONFIG)
    print(
        f"{config.device_id}: {', '.join(s.kind for s in sets)} artifacts of model {sets[0].model_key[:12]}, "
        f"budget {config.memory_budget_bytes >> 20} MiB"
    )
    print("\n".join(format_table(results, config.memory_budget_bytes)))
    if not report.entries:
        return int(ProfileExit.FAILED)
    if not args.no_save:
        path = args.out or config.state_dir / PROFILE_FILE
        save_profile(path, report)
        print(f"saved {path}: the daemon sends it when it (re)starts and registers")
    return int(ProfileExit.SUCCESS)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the device config, run the daemon (or `profile`); returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="msfusion-device", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="device config TOML (see edge_runtime/config.py)")
    parser.add_argument("--broker", help="override the broker URL, mqtt://host:port")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    from msfusion.edge_runtime.config import load_device_config
    from msfusion.edge_runtime.daemon import Daemon, ExitCode

    try:
        config = load_device_config(args.config, broker=args.broker)
    except ConfigError as exc:
        logging.getLogger("msfusion.device").error("%s", exc)
        return int(ExitCode.CONFIG)
    try:
        daemon = Daemon(config)  # loads keys and TLS files
    except ConfigError as exc:
        logging.getLogger("msfusion.device").error("%s", exc)
        return int(ExitCode.CONFIG)
    return int(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
