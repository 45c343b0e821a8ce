"""Shared fixtures: a real Mosquitto broker on a free local port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.export.cache import ArtifactCache, CachedArtifact
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec
from msfusion.wire.artifacts import ArtifactKind, OptimizerConfig


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


# ---------------------------------------------------------------- exported training artifacts
# Shared by tests/export and tests/edge_runtime through one on-disk cache, so
# each artifact is exported once per session whichever folder asks first.


@dataclass(frozen=True)
class Case:
    """The small setting most artifact tests share (a half-width CNN on 16x16 images)."""

    model: ModelConfig = ModelConfig(arch="cnn", channels=(8, 16, 32), image_size=16)
    widths: dict[str, int] = field(default_factory=dict)
    moon: LossConfig = LossConfig(ContrastiveVariant.MOON, mu=0.5, tau=0.5)
    ce_only: LossConfig = LossConfig(ContrastiveVariant.OFF)
    sgd: OptimizerConfig = OptimizerConfig("sgd", momentum=0.9, weight_decay=0.0)
    batch: int = 8


CASE = Case(widths=widths_for_ratio(model_spec(Case.model), 0.5))


@pytest.fixture(scope="session")
def case() -> Case:
    return CASE


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> ArtifactCache:
    # validate=False: the tests that exercise validation call validate_artifact themselves.
    return ArtifactCache(tmp_path_factory.getbasetemp() / "msfusion-artifacts", validate=False)


@pytest.fixture(scope="session")
def exported(artifact_cache: ArtifactCache) -> Callable[..., CachedArtifact]:
    """`exported(kind, loss=CASE.moon, optimizer=CASE.sgd, model=CASE.model, widths=CASE.widths)`."""

    def get(
        kind: ArtifactKind,
        loss: LossConfig = CASE.moon,
        optimizer: OptimizerConfig = CASE.sgd,
        model: ModelConfig = CASE.model,
        widths: dict[str, int] | None = None,
    ) -> CachedArtifact:
        widths = widths if widths is not None else (CASE.widths if model == CASE.model else None)
        return artifact_cache.get_or_export(model, widths, loss, optimizer, CASE.batch, kind)

    return get
