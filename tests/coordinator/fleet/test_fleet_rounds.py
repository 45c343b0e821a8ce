"""One round over a real Mosquitto with scripted devices: merge, NaN rejection, duplicates, malformed bytes, quorum."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pytest

from msfusion.algorithm.merging import SliceUpdate, merge_slices
from msfusion.algorithm.slicing import slice_weights
from msfusion.coordinator.fleet.checkpoint import RunState, load_checkpoint
from msfusion.coordinator.fleet.config import RoundConfig
from msfusion.coordinator.fleet.link import CoordinatorLink
from msfusion.coordinator.fleet.registry import Fleet
from msfusion.coordinator.fleet.rounds import RoundContext, run_round
from msfusion.coordinator.fleet.runner import wait_for_devices
from msfusion.data.datasets import ArrayDataset
from msfusion.models.config import ModelConfig
from msfusion.models.registry import build_model, model_spec, state_to_numpy
from msfusion.recipe import EngineConfig, LocalTrainConfig
from msfusion.wire import topics
from msfusion.wire.bulk import BulkSender, make_manifest, receive
from msfusion.wire.protocol import (
    BulkRef,
    Capacity,
    Registration,
    SliceResult,
    TrainTask,
    decode,
    encode,
)
from msfusion.wire.transport import MqttTransport, Received
from msfusion.wire.weights import pack_weights, unpack_weights

pytestmark = pytest.mark.e2e

MODEL = ModelConfig(arch="cnn", channels=(8, 16, 32))
RUN = "rounds-test"


class FakeArtifacts:
    """Artifacts are not used by scripted devices: a few bytes per shape."""

    def get(self, widths: Mapping[str, int]) -> tuple[BulkRef, bytes]:
        data = repr(sorted(widths.items())).encode()
        return make_manifest(f"a-{abs(hash(data)) % 10**12}", "artifact", data), data


Behaviour = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | None]


@dataclass
class ScriptedDevice:
    """A device played by a thread: answers each task with `behaviour(weights)` (None: never answers)."""

    device_id: str
    url_port: int
    behaviour: Behaviour
    extra: Callable[["ScriptedDevice", TrainTask, bytes, SliceResult], None] | None = None

    def start(self) -> None:
        self.transport = MqttTransport(f"fake-{self.device_id}", "127.0.0.1", self.url_port)
        self.transport.connect()
        for f in topics.device_filters(RUN, self.device_id):
            self.transport.subscribe(f)
        cap = Capacity(memory_budget_bytes=1 << 30, cores=1, arch="x86_64", backends=["ort"], max_width_ratio=0.5)
        reg = Registration(run_id=RUN, device_id=self.device_id, capacity=cap, runtime_version="test")
        self.transport.publish(topics.register(RUN, self.device_id), encode(reg))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            event = self.transport.get(0.2)
            if not isinstance(event, Received) or not event.topic.endswith("/task"):
                continue
            task = decode(event.payload)
            assert isinstance(task, TrainTask)
            topic = topics.bulk(RUN, self.device_id, task.weights.transfer_id)
            weights = unpack_weights(receive(self.transport, task.weights, topic, 5.0))
            trained = self.behaviour(weights)
            if trained is None:
                continue
            data = pack_weights(trained)
            manifest = make_manifest(f"s-{task.task_id}-{self.device_id}", "slice", data)
            BulkSender(self.transport, topics.up(RUN, self.device_id, manifest.transfer_id), manifest, data).send()
            result = SliceResult(
                run_id=RUN,
                round_idx=task.round_idx,
                device_id=self.device_id,
                task_id=task.task_id,
                weights=manifest,
                n_samples=64,
                loss_curve=[1.0],
                step_time_s=0.0,
                peak_rss_bytes=1,
                wall_s=0.0,
            )
            if self.extra is not None:
                self.extra(self, task, data, result)
            self.transport.publish(topics.result(RUN, self.device_id), encode(result))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.transport.close()


def shifted(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v + 0.01 for k, v in weights.items()}


def nan_slice(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(weights)
    name = sorted(out)[0]
    out[name] = np.full_like(out[name], np.nan)
    return out


@pytest.fixture
def make_round(mosquitto: Any, tmp_path: Path) -> Iterator[Callable[..., tuple[RoundContext, list[ScriptedDevice]]]]:
    made: list[Any] = []

    def make(
        behaviours: Mapping[str, Behaviour],
        quorum: float = 0.5,
        deadline_s: float = 10.0,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[RoundContext, list[ScriptedDevice]]:
        spec = model_spec(MODEL)
        transport = MqttTransport(f"coord-{tmp_path.name}", mosquitto.host, mosquitto.port)
        transport.connect()
        link = CoordinatorLink(transport, RUN, stall_s=1.0)
        link.subscribe()
        made.append(transport)
        rng = np.random.default_rng(0)
        test = ArrayDataset(rng.standard_normal((20, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 20))
        ctx = RoundContext(
            run_id=RUN,
            backend="ort",
            engine=EngineConfig(model=MODEL, local=LocalTrainConfig()),
            round=RoundConfig(deadline_s=deadline_s, quorum=quorum),
            spec=spec,
            fleet=Fleet(spec, RUN, "ort", 30.0),
            link=link,
            artifacts=FakeArtifacts(),
            test=test,
            checkpoint_dir=tmp_path / "ckpt",
        )
        devices = [ScriptedDevice(d, mosquitto.port, b, (extra or {}).get(d)) for d, b in behaviours.items()]
        for device in devices:
            device.start()
            made.append(device)
        wait_for_devices(ctx, len(devices), 10.0, None)
        return ctx, devices

    yield make
    for item in made:
        item.close()


def _state() -> tuple[dict[str, np.ndarray], RunState]:
    weights = state_to_numpy(build_model(MODEL, seed=0))
    engine = EngineConfig(model=MODEL)
    return weights, RunState(RUN, "abcd1234", 0, engine.overlap.initial, None, "ort")


def test_round_merges_good_slices_and_rejects_a_nan_slice(make_round: Any) -> None:
    # Prepare
    ctx, _ = make_round({"dev000": shifted, "dev001": nan_slice, "dev002": shifted})
    weights, state = _state()
    # Execute
    outcome, merged, next_state = run_round(ctx, weights, state, attempt=0)
    # Assert: the NaN slice is left out of the counts; the rest equals a plain merge of the good slices.
    assert outcome.merged
    assert outcome.replies["dev000"] == outcome.replies["dev002"] == "merged"
    assert outcome.replies["dev001"].startswith("rejected") and "non-finite" in outcome.replies["dev001"]
    from msfusion.algorithm.planning import plan_round

    plan = plan_round(ctx.spec, ctx.fleet.participants(time.monotonic()), 0, state.overlap, ctx.engine.plan)
    updates = [
        SliceUpdate(d, 0, plan.units(d), shifted(slice_weights(weights, ctx.spec, plan.units(d))), 64)
        for d in ("dev000", "dev002")
    ]
    expected, _ = merge_slices(weights, ctx.spec, updates, 0)
    for name in expected:
        np.testing.assert_array_equal(merged[name], expected[name])
    saved, saved_state = load_checkpoint(ctx.checkpoint_dir)
    assert saved_state == next_state and saved_state.next_round == 1
    for name in merged:
        assert np.array_equal(saved[name], merged[name])


def test_redelivered_and_stale_results_are_merged_once(make_round: Any) -> None:
    # Prepare: dev000 sends its result and chunks twice, plus a result of a task that is not this round's.
    def twice(device: ScriptedDevice, task: TrainTask, data: bytes, result: SliceResult) -> None:
        device.transport.publish(topics.result(RUN, device.device_id), encode(result))
        stale = SliceResult(**{**{f: getattr(result, f) for f in result.__struct_fields__}, "task_id": "old-task"})
        device.transport.publish(topics.result(RUN, device.device_id), encode(stale))
        BulkSender(
            device.transport, topics.up(RUN, device.device_id, result.weights.transfer_id), result.weights, data
        ).send()

    ctx, _ = make_round({"dev000": shifted, "dev001": shifted}, extra={"dev000": twice})
    weights, state = _state()
    # Execute
    outcome, _, _ = run_round(ctx, weights, state, attempt=0)
    # Assert
    assert outcome.replies == {"dev000": "merged", "dev001": "merged"}


def test_malformed_bytes_from_a_device_are_logged_not_fatal(make_round: Any) -> None:
    # Prepare
    def garbage(device: ScriptedDevice, task: TrainTask, data: bytes, result: SliceResult) -> None:
        device.transport.publish(topics.result(RUN, device.device_id), b"\x93not msgpack")
        device.transport.publish(topics.up(RUN, device.device_id, "s-bogus"), b"\x00\x01")

    ctx, _ = make_round({"dev000": shifted, "dev001": shifted}, extra={"dev001": garbage})
    weights, state = _state()
    # Execute
    outcome, _, _ = run_round(ctx, weights, state, attempt=0)
    # Assert
    assert outcome.replies == {"dev000": "merged", "dev001": "merged"}


def test_a_round_below_quorum_is_not_merged(make_round: Any) -> None:
    # Prepare: dev001 never answers; quorum needs both.
    ctx, _ = make_round({"dev000": shifted, "dev001": lambda w: None}, quorum=1.0, deadline_s=2.0)
    weights, state = _state()
    # Execute
    outcome, after, after_state = run_round(ctx, weights, state, attempt=0)
    # Assert
    assert not outcome.merged
    assert outcome.replies == {"dev000": "merged", "dev001": "no reply"}
    assert after is weights and after_state is state
    assert not (ctx.checkpoint_dir / "state.json").exists()
