"""Topic names: one subtree per device, parse inverts build, filters match what they should."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub

from msfusion.errors import ProtocolError
from msfusion.wire import topics

RUN, DEV, OTHER = "run-7", "pi.4_a", "jetson-2"


def _all_topics(device_id: str) -> dict[str, str]:
    return {
        topics.REGISTER: topics.register(RUN, device_id),
        topics.STATUS: topics.status(RUN, device_id),
        topics.RESULT: topics.result(RUN, device_id),
        topics.REQ: topics.req(RUN, device_id),
        topics.UP: topics.up(RUN, device_id, "slice-r3"),
        topics.TASK: topics.task(RUN, device_id),
        topics.CTL: topics.ctl(RUN, device_id),
        topics.BULK: topics.bulk(RUN, device_id, "art-1"),
        topics.UPREQ: topics.upreq(RUN, device_id),
    }


def test_layout() -> None:
    assert topics.task(RUN, DEV) == "msfusion/run-7/dev/pi.4_a/task"
    assert topics.bulk(RUN, DEV, "art-1") == "msfusion/run-7/dev/pi.4_a/bulk/art-1"
    assert topics.all_devices(RUN, topics.RESULT) == "msfusion/run-7/dev/+/result"
    assert topics.all_devices(RUN, topics.UP) == "msfusion/run-7/dev/+/up/+"
    assert set(_all_topics(DEV)) == topics.DEVICE_KINDS


@pytest.mark.parametrize("kind", sorted(topics.DEVICE_KINDS))
def test_parse_inverts_build(kind: str) -> None:
    topic = _all_topics(DEV)[kind]
    parsed = topics.parse(topic)
    assert (parsed.run_id, parsed.device_id, parsed.kind) == (RUN, DEV, kind)
    assert parsed.extra == {topics.UP: "slice-r3", topics.BULK: "art-1"}.get(kind, "")
    assert topics.device_topic(*parsed) == topic


def test_every_device_topic_lies_in_the_device_acl_subtree() -> None:
    # The ACL line `pattern readwrite msfusion/+/dev/%u/#` with %u = the device id.
    acl = f"msfusion/+/dev/{DEV}/#"
    assert all(topic_matches_sub(acl, t) for t in _all_topics(DEV).values())
    assert not any(topic_matches_sub(acl, t) for t in _all_topics(OTHER).values())


def test_filters_split_the_traffic_by_direction() -> None:
    to_coordinator = {topics.REGISTER, topics.STATUS, topics.RESULT, topics.REQ, topics.UP}
    coordinator = topics.coordinator_filters(RUN)
    device = topics.device_filters(RUN, DEV)
    for device_id in (DEV, OTHER):
        for kind, topic in _all_topics(device_id).items():
            assert any(topic_matches_sub(f, topic) for f in coordinator) == (kind in to_coordinator), topic
            expected_by_device = kind not in to_coordinator and device_id == DEV
            assert any(topic_matches_sub(f, topic) for f in device) == expected_by_device, topic
    assert not any(topic_matches_sub(f, topics.task("run-8", DEV)) for f in coordinator + device)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "$SYS", "dev 1", "x" * 65])
def test_unsafe_ids_cannot_build_topics(bad: str) -> None:
    with pytest.raises(ProtocolError, match="not a safe id"):
        topics.task(RUN, bad)
    with pytest.raises(ProtocolError, match="not a safe id"):
        topics.status(bad, DEV)
    with pytest.raises(ProtocolError, match="not a safe id"):
        topics.bulk(RUN, DEV, bad)


def test_build_rejects_unknown_kinds_and_misplaced_transfer_ids() -> None:
    with pytest.raises(ProtocolError, match="unknown topic kind"):
        topics.device_topic(RUN, DEV, "shell")
    with pytest.raises(ProtocolError, match="takes no transfer id"):
        topics.device_topic(RUN, DEV, topics.TASK, "t1")
    with pytest.raises(ProtocolError, match="unknown topic kind"):
        topics.all_devices(RUN, "shell")


@pytest.mark.parametrize(
    "topic",
    [
        "other/run-7/dev/pi/task",
        "msfusion/run-7/devices/pi/task",
        "msfusion/run-7/dev/pi",
        "msfusion/run-7/dev/pi/shell",
        "msfusion/run-7/dev/pi/task/extra",
        "msfusion/run-7/dev/pi/bulk",
        "msfusion/run-7/dev/+/task",
        "msfusion/run 7/dev/pi/task",
        "msfusion/run-7/dev/pi/up/a+b",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(ProtocolError):
        topics.parse(topic)
