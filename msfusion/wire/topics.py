"""Every MQTT topic name of the fleet, built and parsed in one place.

Layout, under one prefix per run and one subtree per device::

    msfusion/<run>/dev/<device>/register          device -> coordinator  Registration, ProfileReport
    msfusion/<run>/dev/<device>/status            device -> coordinator  Heartbeat (retained; last will)
    msfusion/<run>/dev/<device>/result            device -> coordinator  SliceResult, TaskFailed
    msfusion/<run>/dev/<device>/req               device -> coordinator  ChunkRequest (for bulk/...)
    msfusion/<run>/dev/<device>/up/<transfer>     device -> coordinator  Chunk (slices)
    msfusion/<run>/dev/<device>/task              coordinator -> device  TrainTask
    msfusion/<run>/dev/<device>/ctl               coordinator -> device  Welcome, RunControl
    msfusion/<run>/dev/<device>/bulk/<transfer>   coordinator -> device  Chunk (artifacts, weights)
    msfusion/<run>/dev/<device>/upreq             coordinator -> device  ChunkRequest (for up/...)

Because everything a device reads or writes lies under its own subtree, a
Mosquitto ACL file confines each device, logged in with its device id as
username, to that subtree (``%u`` is the username)::

    # acl_file: the coordinator sees every run; a device only its own subtree
    user coordinator
    topic readwrite msfusion/#

    pattern readwrite msfusion/+/dev/%u/#

with ``allow_anonymous false``, a ``password_file`` and ``acl_file`` in
mosquitto.conf.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from msfusion.errors import ProtocolError
from msfusion.wire.protocol import ID_PATTERN

PREFIX = "msfusion"

REGISTER = "register"
STATUS = "status"
RESULT = "result"
REQ = "req"
UP = "up"
TASK = "task"
CTL = "ctl"
BULK = "bulk"
UPREQ = "upreq"

DEVICE_KINDS = frozenset({REGISTER, STATUS, RESULT, REQ, UP, TASK, CTL, BULK, UPREQ})
_WITH_TRANSFER = frozenset({UP, BULK})  # kinds whose topic ends in a transfer id
_ID = re.compile(ID_PATTERN)


class Topic(NamedTuple):
    """A parsed device topic; `extra` is the transfer id for up/bulk, else ""."""

    run_id: str
    device_id: str
    kind: str
    extra: str


def _check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ProtocolError(f"{what} {value!r} is not a safe id (pattern {ID_PATTERN})")
    return value


def run_prefix(run_id: str) -> str:
    """``msfusion/<run>``: everything of one run lies below it."""
    return f"{PREFIX}/{_check_id(run_id, 'run id')}"


def device_root(run_id: str, device_id: str) -> str:
    """``msfusion/<run>/dev/<device>``: everything of one device lies below it."""
    return f"{run_prefix(run_id)}/dev/{_check_id(device_id, 'device id')}"


def device_topic(run_id: str, device_id: str, kind: str, transfer_id: str = "") -> str:
    """Build any device topic.

    Args:
        run_id: the run.
        device_id: the device whose subtree it is.
        kind: one of `DEVICE_KINDS`.
        transfer_id: required for `UP` and `BULK`, forbidden otherwise.

    Returns:
        The topic name.

    Raises:
        ProtocolError: unknown kind, unsafe id, or a transfer id where none belongs.
    """
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown topic kind {kind!r}")
    root = f"{device_root(run_id, device_id)}/{kind}"
    if kind in _WITH_TRANSFER:
        return f"{root}/{_check_id(transfer_id, 'transfer id')}"
    if transfer_id:
        raise ProtocolError(f"topic kind {kind!r} takes no transfer id")
    return root


def register(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, REGISTER)


def status(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, STATUS)


def result(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, RESULT)


def req(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, REQ)


def up(run_id: str, device_id: str, transfer_id: str) -> str:
    return device_topic(run_id, device_id, UP, transfer_id)


def task(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, TASK)


def ctl(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, CTL)


def bulk(run_id: str, device_id: str, transfer_id: str) -> str:
    return device_topic(run_id, device_id, BULK, transfer_id)


def upreq(run_id: str, device_id: str) -> str:
    return device_topic(run_id, device_id, UPREQ)


def all_devices(run_id: str, kind: str) -> str:
    """Wildcard filter over every device's `kind` topic, e.g. ``msfusion/r/dev/+/result``."""
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown topic kind {kind!r}")
    suffix = "/+" if kind in _WITH_TRANSFER else ""
    return f"{run_prefix(run_id)}/dev/+/{kind}{suffix}"


def coordinator_filters(run_id: str) -> list[str]:
    """What the coordinator subscribes to: everything devices send."""
    return [all_devices(run_id, kind) for kind in (REGISTER, STATUS, RESULT, REQ, UP)]


def device_filters(run_id: str, device_id: str) -> list[str]:
    """What a device subscribes to: everything sent to it."""
    root = device_root(run_id, device_id)
    return [f"{root}/{TASK}", f"{root}/{CTL}", f"{root}/{BULK}/+", f"{root}/{UPREQ}"]


def parse(topic: str) -> Topic:
    """Split a device topic into its parts.

    Args:
        topic: a topic name built by this module.

    Returns:
        `Topic(run_id, device_id, kind, extra)`.

    Raises:
        ProtocolError: the topic is not one of ours.
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != PREFIX or parts[2] != "dev":
        raise ProtocolError(f"not a device topic: {topic!r}")
    run_id, device_id, kind = parts[1], parts[3], parts[4]
    _check_id(run_id, "run id")
    _check_id(device_id, "device id")
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"unknown topic kind {kind!r} in {topic!r}")
    expected_len = 6 if kind in _WITH_TRANSFER else 5
    if len(parts) != expected_len:
        raise ProtocolError(f"topic {topic!r} has {len(parts)} levels, expected {expected_len}")
    extra = _check_id(parts[5], "transfer id") if kind in _WITH_TRANSFER else ""
    return Topic(run_id, device_id, kind, extra)
