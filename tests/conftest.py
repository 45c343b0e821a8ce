"""Shared fixtures: a real Mosquitto broker on a free local port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if found is None:
        pytest.fail("the mosquitto binary is required (Debian: apt-get install mosquitto)")
    return found


class Mosquitto:
    """A private Mosquitto: `host`, `port`, `url`, `restart()`, `stop()`.

    `extra_config` is appended to mosquitto.conf ("{dir}" is the broker's
    folder); `files` (name -> text) are written there first, e.g. an ACL file.

    Persistence is on, so a restart keeps sessions and their queued QoS 1
    messages (Mosquitto writes its database on a clean stop).
    """

    def __init__(self, extra_config: str = "", files: Mapping[str, str] | None = None) -> None:
        self.binary = _mosquitto_binary()
        self.host = "127.0.0.1"
        self.port = _free_port()
        # Not pytest's tmp_path: a root Mosquitto drops to user `mosquitto`,
        # which must read the config and write the database.
        self.dir = Path(tempfile.mkdtemp(prefix="msfusion-mosquitto-"))
        self.dir.chmod(0o777)
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self.conf_path.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            + extra_config.replace("{dir}", str(self.dir))
        )
        self.conf_path.chmod(0o644)
        for name, text in (files or {}).items():
            (self.dir / name).write_text(text)
            (self.dir / name).chmod(0o644)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self._proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"mosquitto did not listen on {self.port} within {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        """Stop cleanly (SIGTERM: the database is saved)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self, *, forget_sessions: bool = False) -> None:
        """Stop and start on the same port; `forget_sessions` deletes the database in between."""
        self.stop()
        if forget_sessions:
            for db in self.dir.glob("*.db"):
                db.unlink()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """One broker for the session; tests that restart a broker use `private_mosquitto`."""
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
def mosquitto_factory() -> Iterator[Callable[..., Mosquitto]]:
    """`mosquitto_factory(extra_config="", files=None)`: started brokers of this test's own."""
    brokers: list[Mosquitto] = []

    def make(extra_config: str = "", files: Mapping[str, str] | None = None) -> Mosquitto:
        broker = Mosquitto(extra_config, files)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.cleanup()


@pytest.fixture
def private_mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker of this test's own, free to restart or stop."""
    return mosquitto_factory()
