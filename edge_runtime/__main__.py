"""`python -m msfusion.edge_runtime --config device.toml` (console script `msfusion-device`): run the device daemon."""

from __future__ import annotations

import argparse
import logging
import sys

from msfusion.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the device config, run the daemon; returns its exit code."""
    parser = argparse.ArgumentParser(prog="msfusion-device", description=__doc__)
    parser.add_argument("--config", required=True, help="device config TOML (see edge_runtime/config.py)")
    parser.add_argument("--broker", help="override the broker URL, mqtt://host:port")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from msfusion.edge_runtime.config import load_device_config
    from msfusion.edge_runtime.daemon import Daemon, ExitCode

    try:
        config = load_device_config(args.config, broker=args.broker)
    except ConfigError as exc:
        logging.getLogger("msfusion.device").error("%s", exc)
        return int(ExitCode.CONFIG)
    return int(Daemon(config).run())


if __name__ == "__main__":
    sys.exit(main())
