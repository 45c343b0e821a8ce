"""Serving the dashboard: uvicorn in a background thread of the coordinator's process.

`Dashboard.start` binds the socket itself (so port 0 picks a free port and the
URL is known before the first request), then runs uvicorn on it in a daemon
thread; the run never waits on it. Bound to loopback it needs no token; bound
anywhere else it generates one (printed once, stored 0600 in the run folder as
`dashboard.token`) unless one is given. `tls_cert`/`tls_key` serve HTTPS.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from msfusion.coordinator.dashboard.app import RunsView, make_app
from msfusion.errors import ConfigError
from msfusion.wire.transport import is_loopback

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard.token"


def parse_bind(text: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` (IPv6 in brackets) as (host, port); a bare port binds 127.0.0.1.

    Raises:
        ConfigError: not a port in 0..65535.
    """
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--dashboard must be PORT or HOST:PORT, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--dashboard port must be in 0..65535, got {number}")
    return host, number


@dataclass
class DashboardOptions:
    """Where and how to serve.

    Attributes:
        host, port: the bind address (port 0: any free port).
        token: required from clients (None: generated when not loopback, none on loopback).
        tls_cert, tls_key: PEM files to serve HTTPS with (both or neither).
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


class Dashboard:
    """A running dashboard server.

    Args:
        view: the runs it shows.
        options: bind address, token, TLS.
        token_dir: where a generated token is stored (0600).
    """

    def __init__(self, view: RunsView, options: DashboardOptions, token_dir: Path | None = None) -> None:
        if (options.tls_cert is None) != (options.tls_key is None):
            raise ConfigError("give both the dashboard's TLS certificate and key, or neither")
        self.view = view
        self.token = options.token
        self.generated_token = False
        if self.token is None and not is_loopback(options.host):
            self.token = secrets.token_urlsafe(24)
            self.generated_token = True
            if token_dir is not None:
                token_dir.mkdir(parents=True, exist_ok=True)
                path = token_dir / TOKEN_FILE
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(self.token + "\n")
                os.chmod(path, 0o600)
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((options.host, options.port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(f"cannot serve the dashboard on {options.host}:{options.port}: {exc}") from exc
        self._socket.listen(64)
        self.host, self.port = options.host, self._socket.getsockname()[1]
        self.scheme = "https" if options.tls_cert is not None else "http"
        config = uvicorn.Config(
            make_app(view, self.token),
            log_level="warning",
            access_log=False,
            ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
            ssl_keyfile=str(options.tls_key) if options.tls_key else None,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)

    def _serve(self) -> None:
        self._server.run(sockets=[self._socket])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        log.info("dashboard at %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()
