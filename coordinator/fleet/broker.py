"""A private MQTT broker for a simulated fleet: Mosquitto when installed, else amqtt, on 127.0.0.1 only.

`start_secure_broker` is what `msfusion simulate` runs by default: throw-away
credentials made by `coordinator/security` (a CA, a certificate per device,
the coordinator's identity, task-signing and result keys) in a temporary
folder, and Mosquitto on a free port with mutual TLS and the direction-specific
ACL of that run; `stop()` deletes the folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from msfusion.errors import ConfigError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never 0.0.0.0: a private broker is reachable from this machine only


class Broker(Protocol):
    """A started broker."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout_s: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ConfigError("the broker exited while starting")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ConfigError(f"the broker did not listen on {HOST}:{port} within {timeout_s} s")


def mosquitto_binary() -> str | None:
    """The mosquitto executable, if installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


# What a broker for thousands of devices needs beyond Mosquitto's defaults (bench/scale.py measured with them):
FLEET_SETTINGS = (
    "max_connections -1",  # no cap on clients (the process's open-file limit is raised to its hard limit)
    "max_inflight_messages 100",  # QoS 1 messages in flight per client: a slice's chunks go out without stalls
    "max_queued_messages 10000",  # per client, while offline or past the in-flight window: a whole sub-model
    "max_queued_bytes 0",  # bounded by the count above, not by bytes
    "set_tcp_nodelay true",  # small control messages (heartbeats, replies) are not held back by Nagle
    "sys_interval 1",  # $SYS/broker/# figures every second (messages and bytes, clients)
)


def _raise_open_files() -> None:
    """In the broker's child process: the open-file limit up to its hard limit (a socket per client)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class MosquittoBroker:
    """Mosquitto with its own config and persistence folder on a free local port."""

    def __init__(
        self,
        binary: str,
        log_path: Path,
        timeout_s: float = 10.0,
        conf: Path | None = None,
        port: int | None = None,
        folder: Path | None = None,
        settings: Sequence[str] = (),
    ) -> None:
        """Anonymous plain TCP on a free port, or (`conf`, `port`, `folder`) a config made elsewhere.

        `settings`: more mosquitto.conf lines for the generated config (`FLEET_SETTINGS` for a large
        fleet). `folder` is deleted by `stop`.
        """
        if conf is None:
            self.port = free_port()
            # A root Mosquitto drops to user `mosquitto`, which must read the config and write the database.
            self.dir = Path(tempfile.mkdtemp(prefix="msfusion-broker-"))
            self.dir.chmod(0o777)
            conf = self.dir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {HOST}\nallow_anonymous true\n"
                f"persistence true\npersistence_location {self.dir}/\n"
                "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n"
                + "".join(f"{line}\n" for line in settings)
            )
            conf.chmod(0o644)
            self.scheme = "mqtt"
        else:
            assert port is not None and folder is not None, "a config made elsewhere names its port and folder"
            self.port, self.dir, self.scheme = port, folder, "mqtts"
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, preexec_fn=_raise_open_files
            )
        try:
            _wait_listening(self.port, timeout_s, lambda: self._proc.poll() is None)
        except BaseException:  # it did not start, or the wait was interrupted (SIGINT, SIGTERM): no orphan broker
            self.stop()
            raise
        log.info("started mosquitto on %s:%d (log %s)", HOST, self.port, log_path)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class AmqttBroker:
    """amqtt's pure-Python broker, embedded in a background thread with its own event loop."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        from amqtt.broker import Broker as _Amqtt

        logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # it logs every client hiccup as an error
        self.port = free_port()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self.port}"}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
        self._loop = asyncio.new_event_loop()
        self._broker = _Amqtt(config, loop=self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._broker.start(), self._loop).result(timeout_s)
        _wait_listening(self.port, timeout_s)
        log.info("started embedded amqtt on %s:%d", HOST, self.port)

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def start_private_broker(log_path: Path, prefer: str = "auto") -> Broker:
    """Start a broker for this process's use on a free 127.0.0.1 port.

    Args:
        log_path: where Mosquitto writes its log.
        prefer: "auto" (mosquitto when installed, else amqtt), "mosquitto" or "amqtt".

    Returns:
        The started broker; call `stop()` when done.

    Raises:
        ConfigError: the broker did not start.
    """
    binary = mosquitto_binary() if prefer in ("auto", "mosquitto") else None
    if binary is not None:
        return MosquittoBroker(binary, log_path)
    if prefer == "mosquitto":
        raise ConfigError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return AmqttBroker()


class SecureBroker(MosquittoBroker):
    """A private Mosquitto with mutual TLS and an ACL, its credentials in `security` (a temporary folder)."""

    def __init__(
        self, binary: str, log_path: Path, run_id: str, device_ids: Sequence[str], passwords: bool = False
    ) -> None:
        """`passwords`: a TLS + password listener too (on `security.password_port`)."""
        from msfusion.coordinator.security import SecurityDir

        folder = Path(tempfile.mkdtemp(prefix="msfusion-secure-"))
        folder.chmod(0o711)  # a root Mosquitto runs as user mosquitto: it must reach its files inside
        try:
            port = free_port()
            self.security = SecurityDir.init(
                folder / "security",
                [HOST, "localhost"],
                port=port,
                password_port=free_port() if passwords else None,
                bind=HOST,
                run_id=run_id,
            )
            self.credentials = {device: self.security.enroll(device) for device in device_ids}
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        super().__init__(binary, log_path, conf=self.security.conf, port=port, folder=folder)


def start_secure_broker(log_path: Path, run_id: str, device_ids: Sequence[str]) -> SecureBroker:
    """Throw-away credentials for `device_ids` and a private Mosquitto with TLS + ACL for `run_id`.

    Raises:
        ConfigError: Mosquitto is not installed (amqtt has no TLS + ACL here: pass --insecure), or it did not start.
    """
    binary = mosquitto_binary()
    if binary is None:
        raise ConfigError(
            "a secure simulation runs Mosquitto with TLS and an ACL, and mosquitto is not installed "
            "(Debian: apt-get install mosquitto); or pass --insecure for an anonymous plain-TCP broker"
        )
    return SecureBroker(binary, log_path, run_id, device_ids)
