"""The device daemon's configuration: one frozen dataclass loaded from a TOML file (no torch).

Example `device.toml`::

    device_id = "dev003"
    run_id = "fmnist"
    broker = "mqtts://192.168.1.10:8883"   # mqtts:// is TLS (mqtt:// plain TCP, for a private network only)
    ca_cert = "/var/lib/msfusion/ca.pem"   # the CA that signed the broker's certificate ("": the system's CAs)
    tls_cert = "/var/lib/msfusion/device.pem"   # this device's client certificate and key (`msfusion
    tls_key = "/var/lib/msfusion/device.key"    # security enroll`), or a username and password instead:
    # username = "dev003"         # the broker's ACL confines it to its own subtree
    # password = "..."
    # mqtt = "5"                  # MQTT protocol: "5" (the broker reports refused publishes) or "3.1.1"
    task_signing_public_key = "/var/lib/msfusion/task-signing.pub"  # the coordinator's Ed25519 key (a path or
                                  # PEM text): tasks, welcomes and stops must carry its signature ("": unsigned)
    result_key = "/var/lib/msfusion/result.key"   # this device's HMAC key for its results ("": none)
    data_dir = "/var/lib/msfusion/shard"     # a shard written by `msfusion partition` (or a [data] table)
    state_dir = "/var/lib/msfusion/state"    # previous slice, handled tasks, artifact cache
    memory_budget_bytes = 536870912
    backends = ["ort"]            # artifact kinds this board trains: "ort", "executorch", "torch"
    # backend = "torch"           # pin one of them ("": the coordinator picks the fastest that fits, by profile)
    # device = "cuda"             # where the torch backend trains: "cpu" or "cuda" (a Jetson's GPU)
    # max_width_ratio = 0.5       # optional cap reported to the coordinator
    # heartbeat_s = 5.0
    # keepalive_s = 10
    # stall_s = 5.0               # seconds without a new chunk before asking for missing ones
    # threads = 1                 # intra-op threads for training
    # straggle_s = 0.0            # simulation only: wait this long before each reply (a straggler)

    [data]                        # the board's own data, instead of data_dir (msfusion/data/sources.py)
    path = "/srv/photos"          # class subfolders of images, IDX, CIFAR-10 batches, .npz, text
    format = "auto"               # or images, idx, cifar10, npz, shard, text
    channels = 3                  # images: 1 grayscale, 3 RGB
    image_size = 32               # images: resized to this side

`msfusion-device profile` saves the device's measured profile in
`state_dir/profile.json`; the daemon sends it when it registers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from msfusion.data.sources import DataSpec
from msfusion.errors import ConfigError, DataError
from msfusion.wire.artifacts import ArtifactKind
from msfusion.wire.protocol import ID_PATTERN
from msfusion.wire.transport import parse_broker, parse_broker_url

BACKEND_KINDS = tuple(kind.value for kind in ArtifactKind)  # "ort", "executorch", "torch"


@dataclass(frozen=True)
class DeviceConfig:
    """Everything a device daemon needs (see the module docstring for the TOML form)."""

    device_id: str
    run_id: str
    state_dir: Path
    memory_budget_bytes: int
    data_dir: Path | None = None  # a shard folder; `data` names any other source
    data: DataSpec | None = None
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    backends: tuple[str, ...] = ("ort",)
    backend: str = ""  # pinned: the one of `backends` the coordinator must use ("": the fastest that fits)
    device: str = "cpu"  # where the torch backend trains: "cpu" or "cuda"
    max_width_ratio: float | None = None
    heartbeat_s: float = 5.0
    keepalive_s: int = 10
    stall_s: float = 5.0
    threads: int = 1
    board: str = ""  # the board profile it was flashed with (`msfusion devices flash`), shown on the dashboard
    ca_cert: str = ""  # PEM file of the broker's CA (mqtts:// only; "": the system's CAs)
    tls_cert: str = ""  # this device's client certificate (PEM), for a mutual-TLS broker
    tls_key: str = ""  # its private key (PEM; "" when tls_cert holds both)
    mqtt: str = "3.1.1"  # the MQTT protocol: "3.1.1" or "5"
    task_signing_public_key: str = ""  # the coordinator's Ed25519 public key, PEM text or a path ("": none)
    result_key: str = ""  # this device's result HMAC key, hex or a path ("": results unauthenticated)
    straggle_s: float = 0.0  # simulation: seconds waited after training, before replying (a slow board or link)

    def __post_init__(self) -> None:
        for name in ("device_id", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not re.match(ID_PATTERN, value):
                raise ConfigError(f"{name} {value!r} is not a safe id ({ID_PATTERN})")
        if self.data is None and self.data_dir is None:
            raise ConfigError("a device needs its data: data_dir (a shard folder) or a [data] table")
        if self.data is not None and self.data_dir is not None:
            raise ConfigError("give data_dir or a [data] table, not both")
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "backends", tuple(self.backends))
        parse_broker_url(self.broker)
        if not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes < 1:
            raise ConfigError(f"memory_budget_bytes must be a positive integer, got {self.memory_budget_bytes!r}")
        if not self.backends or any(b not in BACKEND_KINDS for b in self.backends):
            raise ConfigError(f"backends must name some of {', '.join(BACKEND_KINDS)}, got {self.backends!r}")
        if self.backend and self.backend not in self.backends:
            raise ConfigError(f"backend = {self.backend!r} pins a backend this device lacks: {list(self.backends)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and ArtifactKind.TORCH.value not in self.backends:
            raise ConfigError("device = 'cuda' is for the torch backend: add 'torch' to backends")
        if self.max_width_ratio is not None and not 0.0 < self.max_width_ratio <= 1.0:
            raise ConfigError(f"max_width_ratio must be in (0, 1], got {self.max_width_ratio}")
        if self.heartbeat_s <= 0 or self.keepalive_s < 1 or self.stall_s <= 0 or self.threads < 1:
            raise ConfigError("heartbeat_s, stall_s must be > 0; keepalive_s, threads >= 1")
        if not (isinstance(self.straggle_s, (int, float)) and 0 <= self.straggle_s <= 86400):
            raise ConfigError(f"straggle_s must be in [0, 86400] seconds, got {self.straggle_s!r}")
        text = ("ca_cert", "tls_cert", "tls_key", "mqtt", "task_signing_public_key", "result_key")
        if not all(isinstance(getattr(self, name), str) for name in text):
            raise ConfigError(f"{', '.join(text)} must be strings")
        if self.mqtt not in ("3.1.1", "5"):
            raise ConfigError(f"mqtt must be '3.1.1' or '5', got {self.mqtt!r}")
        if (self.ca_cert or self.tls_cert or self.tls_key) and not parse_broker(self.broker).tls:
            raise ConfigError(f"ca_cert/tls_cert/tls_key are for a TLS broker: use mqtts://, not {self.broker!r}")
        if self.tls_key and not self.tls_cert:
            raise ConfigError("tls_key needs its certificate (tls_cert)")
        if self.task_signing_public_key:
            from msfusion.wire.signing import MessageVerifier

            MessageVerifier.from_pem(self.task_signing_public_key)  # ConfigError when unreadable
        if self.result_key:
            from msfusion.wire.signing import ResultAuthenticator

            ResultAuthenticator.from_text(self.result_key)  # ConfigError when unreadable

    def transport_options(self) -> dict[str, Any]:
        """`MqttTransport.from_url` keywords for this device's credentials and TLS files."""
        return {
            "username": self.username,
            "password": self.password,
            "tls_ca": self.ca_cert or None,
            "tls_cert": self.tls_cert or None,
            "tls_key": self.tls_key or None,
            "protocol": self.mqtt,
        }


def data_spec(config: DeviceConfig) -> DataSpec:
    """The device's data source: its [data] table, or its shard folder."""
    if config.data is not None:
        return config.data
    assert config.data_dir is not None  # __post_init__ checked one is set
    return DataSpec(config.data_dir, format="shard")


def load_device_config(path: str | Path, **overrides: Any) -> DeviceConfig:
    """Read a device TOML file; keyword overrides (not None) win over the file.

    Raises:
        ConfigError: unreadable TOML, an unknown key, or an invalid value.
    """
    # UnicodeDecodeError: not UTF-8; RecursionError: arrays nested thousands deep.
    try:
        table: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read device config {path}: {exc}") from exc
    _check_types(table, path)
    table.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(table.get("data"), dict):
        try:
            table["data"] = DataSpec.from_table(table["data"], f"{path} [data]")
        except DataError as exc:
            raise ConfigError(str(exc)) from exc
    known = {f.name for f in fields(DeviceConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; known: {sorted(known)}")
    try:
        return DeviceConfig(**table)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


_TEXT_KEYS = frozenset(
    {"device_id", "run_id", "state_dir", "data_dir", "broker", "username", "password", "board", "backend", "device"}
    | {"ca_cert", "tls_cert", "tls_key", "mqtt", "task_signing_public_key", "result_key"}
)
_INTEGER_KEYS = frozenset({"memory_budget_bytes", "keepalive_s", "threads"})
_NUMBER_KEYS = frozenset({"max_width_ratio", "heartbeat_s", "stall_s", "straggle_s"})


def _check_types(table: dict[str, Any], path: str | Path) -> None:
    """Refuse a TOML value of the wrong type (a bool for a count, NaN for seconds) before anything uses it."""
    for key, value in table.items():
        if key in _TEXT_KEYS:
            ok = isinstance(value, str)
        elif key in _INTEGER_KEYS:
            ok = type(value) is int
        elif key in _NUMBER_KEYS:
            ok = type(value) in (int, float) and math.isfinite(value)
        elif key == "backends":
            ok = isinstance(value, list) and all(isinstance(b, str) for b in value)
        elif key == "data":
            ok = isinstance(value, dict)  # a [data] table
        else:
            continue
        if not ok:
            raise ConfigError(f"{path}: {key} = {value!r} is not a valid value for {key}")


def to_toml(config: DeviceConfig) -> str:
    """The config as TOML text (what `msfusion simulate` writes for each device)."""
    lines, tables = [], []
    for f in fields(DeviceConfig):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, DataSpec):
            tables.append("\n[data]")
            tables += [f"{k} = {repr_toml(v)}" for k, v in value.to_table().items()]
            continue
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, tuple):
            lines.append(f"{f.name} = [{', '.join(repr_toml(v) for v in value)}]")
        else:
            lines.append(f"{f.name} = {repr_toml(value)}")
    return "\n".join(lines + tables) + "\n"


def repr_toml(value: Any) -> str:
    """One scalar as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string: quotes, backslashes, line breaks (a PEM key) and other
    # control characters escaped the same way (\n, \uXXXX).
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
