"""One round over a real Mosquitto with scripted devices: merge, NaN rejection, duplicates, malformed bytes, quorum."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import msgspec
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
    ChunkRequest,
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

    def get(self, widths: Mapping[str, int], kind: str = "") -> tuple[BulkRef, bytes]:
        data = repr((kind, sorted(widths.items()))).encode()
        return make_manifest(f"a-{abs(hash(data)) % 10**12}", "artifact", data), data


Behaviour = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | None]


@dataclass
class ScriptedDevice:
    """A device played by a thread: answers each task with `behaviour(weights)` (None: never answers)."""

    device_id: str
    url_port: int
    behaviour: Behaviour
    extra: Callable[["ScriptedDevice", TrainTask, bytes, SliceResult], None] | None = None
    n_samples: int = 64

    def start(self) -> None:
        self.transport = MqttTransport(f"fake-{self.device_id}", "127.0.0.1", self.url_port)
        self.transport.connect()
        for f in topics.device_filters(RUN, self.device_id):
            self.transport.subscribe(f)
        cap = Capacity(memory_budget_bytes=1 << 30, cores=1, arch="x86_64", backends=["ort"], max_width_ratio=0.5)
        reg = Registration(run_id=RUN, device_id=self.device_id, capacity=cap, runtime_version="test")
        self.transport.publish(topics.register(RUN, self.device_id), encode(reg))
        self.stop = threading.Event()
        self.tasks: list[TrainTask] = []  # every task received, in order
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            event = self.transport.get(0.2)
            if not isinstance(event, Received) or not event.topic.endswith("/task"):
                continue
            task = decode(event.payload)
            assert isinstance(task, TrainTask)
            self.tasks.append(task)
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
                n_samples=self.n_samples,
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
        n_samples: Mapping[str, int] | None = None,
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
        devices = [
            ScriptedDevice(d, mosquitto.port, b, (extra or {}).get(d), (n_samples or {}).get(d, 64))
            for d, b in behaviours.items()
        ]
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


# ---------------------------------------------------------------- a hostile client on the wire (no credentials)


def _plain_merge(ctx: RoundContext, weights: dict[str, np.ndarray], state: RunState, devices: list[str]) -> Any:
    from msfusion.algorithm.planning import plan_round

    plan = plan_round(ctx.spec, ctx.fleet.participants(time.monotonic()), 0, state.overlap, ctx.engine.plan)
    updates = [
        SliceUpdate(d, 0, plan.units(d), shifted(slice_weights(weights, ctx.spec, plan.units(d))), 64) for d in devices
    ]
    expected, _ = merge_slices(weights, ctx.spec, updates, 0)
    return expected


def test_a_result_declaring_huge_sizes_is_refused_and_the_genuine_slice_merges(make_round: Any) -> None:
    # Prepare: before its genuine reply, dev000's topic carries results whose manifests claim 2^45 chunks,
    # and 4 GiB for a slice of kilobytes (encoded without validation, as a hostile client can).
    def hostile(device: ScriptedDevice, task: TrainTask, data: bytes, result: SliceResult) -> None:
        for total, chunk in ((2**45, 1), (4 << 30, 1 << 20)):
            ref = BulkRef(
                transfer_id=f"s-huge-{chunk}",
                kind="slice",
                total_bytes=total,
                sha256="0" * 64,
                n_chunks=-(-total // chunk),
                chunk_bytes=chunk,
            )
            forged = msgspec.structs.replace(result, weights=ref)
            device.transport.publish(topics.result(RUN, device.device_id), msgspec.msgpack.encode(forged))

    ctx, _ = make_round({"dev000": shifted, "dev001": shifted}, extra={"dev000": hostile})
    weights, state = _state()
    # Execute
    outcome, _, _ = run_round(ctx, weights, state, attempt=0)
    # Assert: no MemoryError; both genuine slices merged
    assert outcome.merged
    assert outcome.replies == {"dev000": "merged", "dev001": "merged"}


def test_a_nan_slice_sent_first_under_a_devices_id_does_not_drop_its_genuine_slice(
    make_round: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a forged NaN slice under dev000's id and task, judged before dev000's own reply arrives.
    def forge_first(device: ScriptedDevice, task: TrainTask, data: bytes, result: SliceResult) -> None:
        bad = pack_weights(nan_slice(unpack_weights(data)))
        ref = make_manifest(f"s-forged-{device.device_id}", "slice", bad)
        BulkSender(device.transport, topics.up(RUN, device.device_id, ref.transfer_id), ref, bad).send()
        forged = msgspec.structs.replace(result, weights=ref)
        device.transport.publish(topics.result(RUN, device.device_id), encode(forged))
        time.sleep(0.5)

    ctx, _ = make_round({"dev000": shifted, "dev001": shifted}, extra={"dev000": forge_first})
    weights, state = _state()
    # Execute
    with caplog.at_level("WARNING"):
        outcome, merged, _ = run_round(ctx, weights, state, attempt=0)
    # Assert: the genuine slice is the one merged; the forgery's rejection is logged with its reason
    assert outcome.replies == {"dev000": "merged", "dev001": "merged"}
    expected = _plain_merge(ctx, weights, state, ["dev000", "dev001"])
    for name in expected:
        np.testing.assert_array_equal(merged[name], expected[name])
    assert any("dev000" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("claimed", [10**6, 64])
def test_a_finite_poisoned_slice_is_rejected_by_its_sample_count_or_its_update_norm(
    make_round: Any, caplog: pytest.LogCaptureFixture, claimed: int
) -> None:
    # Prepare: three honest devices; dev003 answers -50x the weights it was sent, claiming `claimed` samples.
    honest = {d: shifted for d in ("dev000", "dev001", "dev002")}
    ctx, _ = make_round(
        {**honest, "dev003": lambda w: {k: -50.0 * v for k, v in w.items()}}, n_samples={"dev003": claimed}
    )
    weights, state = _state()
    # Execute
    with caplog.at_level("WARNING"):
        outcome, merged, _ = run_round(ctx, weights, state, attempt=0)
    # Assert: merged without it, like a plain merge of the honest three; the reason is in the reply and the log
    assert outcome.merged
    assert {d: outcome.replies[d] for d in honest} == {d: "merged" for d in honest}
    reply = outcome.replies["dev003"]
    assert reply.startswith("rejected: ")
    assert ("n_samples" in reply) if claimed == 10**6 else ("update norm" in reply), reply
    expected = _plain_merge(ctx, weights, state, sorted(honest))
    for name in expected:
        np.testing.assert_allclose(merged[name], expected[name], rtol=0, atol=1e-6)
    assert any("dev003" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


def test_chunk_requests_cannot_make_the_coordinator_push_more_than_a_few_copies(make_round: Any) -> None:
    # Prepare: dev000 asks 300 times for every chunk of its weights and of the artifact, and asks for the
    # artifact under an id that was sent no task.
    def flood(device: ScriptedDevice, task: TrainTask, data: bytes, result: SliceResult) -> None:
        for transfer in (task.weights, task.artifact):
            ask = ChunkRequest(run_id=RUN, device_id=device.device_id, transfer_id=transfer.transfer_id, missing=[0])
            for _ in range(300):
                device.transport.publish(topics.req(RUN, device.device_id), encode(ask))
        intruder = ChunkRequest(run_id=RUN, device_id="intruder", transfer_id=task.artifact.transfer_id, missing=[0])
        device.transport.publish(topics.req(RUN, "intruder"), encode(intruder))
        time.sleep(1.0)

    ctx, _ = make_round({"dev000": shifted, "dev001": shifted}, extra={"dev000": flood})
    weights, state = _state()
    # Execute
    outcome, _, _ = run_round(ctx, weights, state, attempt=0)
    # Assert: a few copies at most, and nothing to a device that was sent no task
    assert outcome.replies == {"dev000": "merged", "dev001": "merged"}
    assert outcome.bytes_down["dev000"] <= 6 * outcome.bytes_down["dev001"], outcome.bytes_down
    assert ctx.link.bytes_down["intruder"] == 0


def test_tasks_name_as_negative_only_a_slice_merged_in_a_merged_round(make_round: Any) -> None:
    # Prepare: dev001 stays silent in round 0's first attempt (below a quorum of 1.0), then answers.
    calls = {"n": 0}

    def flaky(w: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        calls["n"] += 1
        return None if calls["n"] == 1 else shifted(w)

    ctx, devices = make_round({"dev000": shifted, "dev001": flaky}, quorum=1.0, deadline_s=3.0)
    weights, state = _state()
    # Execute: round 0 attempt 0 (not merged), attempt 1 (merged), round 1
    first, weights, state = run_round(ctx, weights, state, attempt=0)
    second, weights, state = run_round(ctx, weights, state, attempt=1)
    third, weights, state = run_round(ctx, weights, state, attempt=0)
    # Assert: attempt 0's discarded slice is never a negative; round 1 names round 0's merged slice
    assert (first.merged, second.merged, third.merged) == (False, True, True)
    for device in devices:
        named = [t.negative_task_id for t in device.tasks]
        assert named == ["", "", device.tasks[1].task_id], named
    _, saved = load_checkpoint(ctx.checkpoint_dir)
    assert saved.negatives == {d.device_id: d.tasks[2].task_id for d in devices}
