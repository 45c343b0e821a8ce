"""Authenticated results: the coordinator's link takes a reply only under its device's result key (real Mosquitto)."""

from __future__ import annotations

import secrets
import time
from typing import Any, Iterator

import msgspec
import pytest

from msfusion.coordinator.fleet.link import CoordinatorLink, Inbound
from msfusion.wire import topics
from msfusion.wire.protocol import BulkRef, SliceResult, TaskFailed, encode
from msfusion.wire.signing import ResultAuthenticator
from msfusion.wire.transport import MqttTransport

RUN = "macs"
KEYS = {device: ResultAuthenticator(secrets.token_bytes(32)) for device in ("dev000", "dev001")}


def _result(device: str, task_id: str = "s1-r0-a0", n_samples: int = 64) -> SliceResult:
    ref = BulkRef(transfer_id=f"s-{device}", kind="slice", total_bytes=8, sha256="a" * 64, n_chunks=1, chunk_bytes=8)
    return SliceResult(
        run_id=RUN,
        round_idx=0,
        device_id=device,
        task_id=task_id,
        weights=ref,
        n_samples=n_samples,
        loss_curve=[1.0, float("nan")],
        step_time_s=0.1,
        peak_rss_bytes=1,
        wall_s=0.2,
    )


@pytest.fixture
def link_and_probe(mosquitto: Any) -> Iterator[tuple[CoordinatorLink, MqttTransport]]:
    coordinator = MqttTransport("coord-macs", mosquitto.host, mosquitto.port)
    coordinator.connect()
    link = CoordinatorLink(coordinator, RUN, results=KEYS)
    link.subscribe()
    probe = MqttTransport("probe-macs", mosquitto.host, mosquitto.port)
    probe.connect()
    yield link, probe
    probe.close()
    coordinator.close()


def _inbound(link: CoordinatorLink, timeout_s: float = 1.5) -> list[Any]:
    got, deadline = [], time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = link.poll(left)
        if isinstance(event, Inbound):
            got.append(event.message)
    return got


def test_only_replies_sealed_with_their_devices_key_reach_the_round(
    link_and_probe: tuple[CoordinatorLink, MqttTransport], caplog: pytest.LogCaptureFixture
) -> None:
    link, probe = link_and_probe
    genuine = KEYS["dev000"].seal(_result("dev000"))
    failed = KEYS["dev001"].seal(
        TaskFailed(run_id=RUN, round_idx=0, device_id="dev001", task_id="s1-r0-a0", code="data", reason="no data")
    )
    forgeries = {
        "unsealed": _result("dev000"),
        "sealed with another device's key": KEYS["dev001"].seal(_result("dev000")),
        "altered after sealing": msgspec.structs.replace(genuine, n_samples=10**6),
        "another task under a copied MAC": msgspec.structs.replace(genuine, task_id="s1-r0-a1"),
        "a device with no key": ResultAuthenticator(secrets.token_bytes(32)).seal(_result("dev009")),
    }
    # Execute: every forgery, then the genuine replies, each on its device's own topic.
    with caplog.at_level("WARNING"):
        for forged in forgeries.values():
            probe.publish(topics.result(RUN, forged.device_id), encode(forged))
        probe.publish(topics.result(RUN, "dev000"), encode(genuine))
        probe.publish(topics.result(RUN, "dev001"), encode(failed))
        got = _inbound(link)
    # Assert: exactly the genuine two arrive; every forgery was dropped with a reason
    assert [encode(m) for m in got] == [encode(genuine), encode(failed)]  # (encoded: the loss curve holds NaN)
    drops = [r.getMessage() for r in caplog.records if "dropped a" in r.getMessage()]
    assert len(drops) == len(forgeries), drops
    assert sum("unauthenticated" in d for d in drops) == 1
    assert sum("does not match" in d for d in drops) == 3
    assert sum("no result key" in d for d in drops) == 1
