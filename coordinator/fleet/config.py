"""The coordinator's configuration: frozen dataclasses loaded once from TOML, flags on top.

A run file looks like this (every table and key is optional except `model`)::

    run_id = "fmnist"
    broker = "mqtt://127.0.0.1:1883"
    out = "runs/fmnist"
    backend = "ort"            # artifact kind the devices train: "ort", "executorch" or "torch"
    # backends = ["ort", "torch"]   # several: each device trains the fastest of those it runs that fits its
                               # budget, by its profile (`msfusion devices profile-set --backends ...`)
    eval_shard = "runs/fmnist/shards/test"   # held-out data in any format msfusion/data/sources.py reads
    validation_shard = "runs/fmnist/shards/validation"   # optional: chooses the deployable model
    # artifact_cache = "~/.cache/msfusion/artifacts"
    # security = "secure/"     # a folder made by `msfusion security init`: TLS client identity, task
                               # signing, the devices' result keys (broker = "mqtts://host:8883")
    # task_signing_key = "secure/task-signing.key"   # sign without a security folder (devices hold the .pub)
    # insecure = false         # true: allow plain mqtt:// to a broker that is not on this machine
    # mqtt = "3.1.1"           # or "5" (the broker reports refused publishes)

    [engine]                   # the algorithm: exactly the reference engine's knobs
    rounds = 10
    seed = 0
    # codec = "int8"           # transfers: "fp32" (default), "fp16" or "int8" (the update up, error feedback);
                               # a device that does not list it (`Capacity.codecs`) gets fp32
    [engine.model]
    arch = "cnn"
    channels = [8, 16, 32]
    [engine.plan]              # strategy, shift_mode, round_shift ("1/8"), participant_shift, capped_overlap
    [engine.overlap]           # mode, initial, minimum, maximum, step, high, low
    [engine.local]             # epochs, batch_size, lr, max_samples
    [engine.local.optimizer]   # name ("sgd", "adamw"), momentum, weight_decay, betas, eps, scaler_compensation
    [engine.loss]              # variant ("off", "positive", "moon"), mu, tau
    [engine.merge]             # norm_bound (x the round's median update norm; 0: off), norm_action ("reject",
                               # "clip"), aggregate ("mean", "trimmed_mean", "median"), trim,
                               # staleness_exponent, max_staleness (asynchronous rounds' late slices)

    [data]                     # pin the run's preprocessing instead of agreeing it from the devices' reports:
                               # mean, std (per channel, of pixels in [0, 1]), classes, vocab

    [round]                    # deadline_s, quorum, max_attempts, stall_s, asynchronous
    [fleet]                    # min_devices, wait_s, heartbeat_timeout_s, memory_margin

`load_config(path, overrides)` applies CLI flags (a flat dict of top-level,
`round.*` and `fleet.*` keys) after the file, then validates everything.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

import tomllib

from msfusion.errors import ConfigError
from msfusion.recipe import EngineConfig
from msfusion.wire.protocol import ID_PATTERN, MAX_DEADLINE_S, Preprocessing
from msfusion.wire.transport import is_loopback, parse_broker

BACKENDS = ("ort", "executorch", "torch")


@dataclass(frozen=True)
class RoundConfig:
    """How one round is run over the fleet.

    Attributes:
        deadline_s: seconds from sending the tasks until the round closes with what arrived.
        quorum: share of the round's tasks that must return a valid slice for
            the round to be merged; below it the round is retried.
        max_attempts: tries of one round before the run fails.
        stall_s: seconds without a new chunk of a slice before asking for the missing ones.
        asynchronous: a slice that comes after its round closed is merged into the round then
            open, with the staleness weight of `[engine.merge]` (staleness_exponent,
            max_staleness), instead of being dropped; its device gets no new task until then.
            False (synchronous rounds): every round's tasks answer in it, or not at all.
    """

    deadline_s: float = 120.0
    quorum: float = 0.5
    max_attempts: int = 3
    stall_s: float = 5.0
    asynchronous: bool = False

    def task_deadline_s(self, max_staleness: int) -> float:
        """How long a device may train a task: the round's deadline, or (asynchronous) until its slice is too late."""
        return min(MAX_DEADLINE_S, self.deadline_s * (1 + max_staleness)) if self.asynchronous else self.deadline_s

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.stall_s <= 0:
            raise ConfigError("round.deadline_s and round.stall_s must be > 0")
        if self.deadline_s > MAX_DEADLINE_S:  # devices refuse a task beyond the schema's maximum
            raise ConfigError(
                f"round.deadline_s must be at most {MAX_DEADLINE_S:.0f} s (a week), got {self.deadline_s}"
            )
        if not 0.0 < self.quorum <= 1.0:
            raise ConfigError(f"round.quorum must be in (0, 1], got {self.quorum}")
        if self.max_attempts < 1:
            raise ConfigError(f"round.max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class FleetConfig:
    """Who takes part.

    Attributes:
        min_devices: registered, live devices needed before a round starts.
        wait_s: how long to wait for them before the run fails.
        heartbeat_timeout_s: a device silent for this long counts as offline.
        memory_margin: share of a device's budget kept free of the peak its
            profile predicts for the width it is given, in [0, 1).
    """

    min_devices: int = 1
    wait_s: float = 120.0
    heartbeat_timeout_s: float = 30.0
    memory_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.min_devices < 1 or self.wait_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ConfigError("fleet.min_devices must be >= 1, wait_s and heartbeat_timeout_s > 0")
        if not 0.0 <= self.memory_margin < 1.0:
            raise ConfigError(f"fleet.memory_margin must be in [0, 1), got {self.memory_margin}")


@dataclass(frozen=True)
class DataConfig:
    """The run's preprocessing pinned by the user (each empty value: agreed from the devices' data reports).

    Attributes:
        mean: per-channel mean of pixels in [0, 1].
        std: per-channel standard deviation.
        classes: class names in label order.
        vocab: the char-LM's characters in id order (out-of-vocabulary characters get id len(vocab)).
    """

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()
    vocab: str = ""

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"data.mean and data.std need one value per channel, std > 0: {self.mean}, {self.std}")

    def pinned(self) -> Preprocessing:
        return Preprocessing(mean=list(self.mean), std=list(self.std), classes=list(self.classes), vocab=self.vocab)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything one coordinator run needs.

    Attributes:
        engine: the algorithm's knobs, shared with the reference engine.
        run_id: names the run's topic subtree (an id: letters, digits, _.-).
        broker: mqtt://host:port.
        username, password: the coordinator's broker credentials (None: anonymous).
        out: output folder (metrics, checkpoints, final model, plots).
        eval_shard: shard folder of held-out data to evaluate the global model on.
        validation_shard: shard folder of data held out of training and of `eval_shard`; at the end
            it chooses which full model the run writes (docs/algorithm.md, "The deployable model").
        backend: the artifact kind devices train ("ort", "executorch" or "torch"); with `backends`, the one a
            device without a usable profile trains.
        backends: every artifact kind the run may use (empty: `backend` alone); each device trains the fastest
            one it runs whose predicted peak fits its budget, or the one its device.toml pins
            (`coordinator/fleet/registry.py`, `choose_backend`).
        artifact_cache: folder of exported artifacts, reused across runs (None: the exporter's default).
        round: per-round knobs.
        fleet: fleet knobs.
        data: preprocessing pinned by the user (the rest is agreed from the devices' data reports).
        task_signing_key: the coordinator's Ed25519 private key (PEM): every task, welcome and stop is
            signed with it (`msfusion/wire/signing.py`; None: the security folder's, else unsigned).
        security: a folder made by `msfusion security init` (coordinator/security): the coordinator
            connects with its client certificate over TLS, signs with its task-signing key and accepts
            a device's results only under that device's result key.
        insecure: allow a plain-TCP ``mqtt://`` broker that is not on this machine (refused otherwise:
            tasks, weights and results would cross the network in clear and unauthenticated).
        mqtt: the MQTT protocol, "3.1.1" or "5".
    """

    engine: EngineConfig
    run_id: str = "run"
    broker: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    out: Path = Path("runs/run")
    eval_shard: Path | None = None
    validation_shard: Path | None = None
    backend: str = "ort"
    backends: tuple[str, ...] = ()
    artifact_cache: Path | None = None
    round: RoundConfig = field(default_factory=RoundConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task_signing_key: Path | None = None
    security: Path | None = None
    insecure: bool = False
    mqtt: str = "3.1.1"

    def __post_init__(self) -> None:
        import re

        if not re.match(ID_PATTERN, self.run_id):
            raise ConfigError(f"run_id {self.run_id!r} is not a safe id ({ID_PATTERN})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "backends", tuple(self.backends))
        if any(b not in BACKENDS for b in self.backends) or len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"backends must name each of {BACKENDS} at most once, got {list(self.backends)}")
        address = parse_broker(self.broker)
        if not address.tls and not self.insecure and not is_loopback(address.host):
            raise ConfigError(
                f"refusing plain mqtt:// to {address.host}, which is not this machine: tasks, weights and results "
                "would cross the network in clear; use mqtts:// with a security folder (`msfusion security init`), "
                "or pass --insecure (insecure = true) on a network you trust"
            )
        if self.security is not None and not address.tls:
            raise ConfigError(f"a security folder needs a TLS broker URL (mqtts://host:port), got {self.broker!r}")
        if self.mqtt not in ("3.1.1", "5"):
            raise ConfigError(f"mqtt must be '3.1.1' or '5', got {self.mqtt!r}")
        object.__setattr__(self, "out", Path(self.out))
        for name in ("eval_shard", "validation_shard", "artifact_cache", "task_signing_key", "security"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


def _convert(kind: Any, value: Any, where: str) -> Any:
    """Turn a TOML value into the annotated type of a dataclass field."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table")
        return build(kind, value, where)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            allowed = [m.value for m in kind]
            raise ConfigError(f"{where} must be one of {allowed}, got {value!r}") from None
    if kind is Fraction:
        try:
            return Fraction(str(value))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{where} must be a fraction like '1/8', got {value!r}") from None
    if kind is Path:
        return Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        return tuple(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def build(cls: type, table: Mapping[str, Any], where: str = "") -> Any:
    """Build the frozen dataclass `cls` from a TOML table, refusing unknown keys.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a failed validation.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where or 'top level'}]; known: {sorted(known)}")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}" if where else key) for key, value in table.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{where or 'top level'}]: {exc}") from exc


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> CoordinatorConfig:
    """Load a run file and apply flag overrides.

    Args:
        path: the TOML file (None: defaults plus overrides only, which must name engine.model).
        overrides: flat keys: a top-level key ("rounds" means engine.rounds),
            or "round.<key>" / "fleet.<key>" / "engine.<key>"; None values are skipped.

    Returns:
        The validated config.

    Raises:
        ConfigError: unreadable TOML, unknown keys, or invalid values.
    """
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run file {path}: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if not section and name in ("rounds", "seed"):
            section = "engine"
        target = table
        for part in section.split(".") if section else []:
            target = target.setdefault(part, {})
        target[name] = value
    if "model" not in table.get("engine", {}):
        raise ConfigError("the run file needs an [engine.model] table (at least arch = ...)")
    config = build(CoordinatorConfig, table)
    if not isinstance(config, CoordinatorConfig):  # for the type checker
        raise ConfigError("internal: not a CoordinatorConfig")
    return config
