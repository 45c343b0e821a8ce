"""The coordinator's own event stream: one JSON line per event in `events.jsonl`, and live subscribers.

Everything that watches a run reads this stream: the dashboard (live, in the
coordinator's process), `msfusion runs list | show | follow` (from the file, in
any process, for running, finished or crashed runs). Emitting is an append to
an in-memory list and one line written to an open file: a round never waits for
a reader.

Events (every one has ``seq``, ``t`` (wall clock) and ``kind``):

=============== ============================================================
kind            fields
=============== ============================================================
run_started     run_id, pid, strategy, model (arch), rounds, params, backend,
                out, min_devices
fleet           devices: {id: {state, progress, width, budget_bytes,
                sized_by, board, arch, cores, failures, last_failure,
                online}}, excluded
round           the round attempt's line of metrics.jsonl (`RoundOutcome`
                fields and wall_s)
run_finished    ok, state ("finished", "failed", "stopped"), reason,
                rounds, final_metrics, deployable
=============== ============================================================

`fold` turns a list of events into the run's current picture (what the
dashboard and `runs show` display); it is pure, so the live view and the
view from disk agree.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"  # written by `msfusion runs stop`; the coordinator stops after the current round
MAX_LIVE_EVENTS = 100_000  # kept in memory for live readers (the file keeps all)


class RunEvents:
    """Append-only event stream of one run (file + memory). Thread-safe for one writer and many readers.

    Args:
        out: the run folder; events go to `out/events.jsonl` (appended on resume).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = read_events(out)  # a resumed run continues its stream
        self._handle: IO[str] | None = open(out / EVENTS_FILE, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._changed = threading.Condition(self._lock)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record one event; returns it (with its sequence number)."""
        with self._lock:
            event = {"seq": len(self._events), "t": time.time(), "kind": kind, **fields}
            self._events.append(event)
            if len(self._events) > MAX_LIVE_EVENTS:  # the oldest fleet snapshots go first
                del self._events[1 : 1 + len(self._events) - MAX_LIVE_EVENTS]
            if self._handle is not None:
                self._handle.write(json.dumps(event, allow_nan=True, default=str) + "\n")
            self._changed.notify_all()
        return event

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Events with a sequence number >= `seq`, in order."""
        with self._lock:
            start = 0
            if self._events and self._events[0]["seq"] > 0:
                start = max(0, seq - self._events[0]["seq"])
            else:
                start = max(0, seq)
            return [e for e in self._events[start:] if e["seq"] >= seq]

    def wait(self, seq: int, timeout_s: float) -> bool:
        """Block until an event with sequence number >= `seq` exists (or the timeout); True if one does."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._events) and self._events[-1]["seq"] >= seq, timeout_s)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    # What the runner reports.

    def fleet(self, devices: Mapping[str, Any], online: Mapping[str, bool], excluded: Mapping[str, str]) -> None:
        """A snapshot of every device record (`registry.DeviceRecord`) with its liveness."""
        self.emit(
            "fleet",
            devices={
                d: {
                    "state": r.state if online.get(d) else "offline",
                    "progress": r.progress,
                    "width": min(r.max_ratio, r.memory_cap),
                    "budget_bytes": r.memory_budget_bytes,
                    "sized_by": r.sized_by,
                    "backend": getattr(r, "backend", ""),
                    "backend_chosen_by": getattr(r, "backend_chosen_by", ""),
                    "step_time_s": getattr(r, "step_time_s", 0.0),
                    "predicted_peak_bytes": getattr(r, "predicted_peak_bytes", 0),
                    "board": getattr(r, "board", ""),
                    "arch": getattr(r, "arch", ""),
                    "cores": getattr(r, "cores", 0),
                    "failures": r.failures,
                    "last_failure": r.last_failure,
                    "online": bool(online.get(d)),
                }
                for d, r in sorted(devices.items())
            },
            excluded=dict(excluded),
        )

    def stop_requested(self) -> str | None:
        """The reason given to `msfusion runs stop`, if it was called for this run (None otherwise)."""
        path = self.out / STOP_FILE
        if not path.exists():
            return None
        try:
            return path.read_text(encoding="utf-8").strip() or "stopped on request"
        except OSError:
            return "stopped on request"

    def clear_stop(self) -> None:
        (self.out / STOP_FILE).unlink(missing_ok=True)


def read_events(out: Path) -> list[dict[str, Any]]:
    """Every event of the run in `out` (a torn last line, from a crash, is skipped)."""
    path = out / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Folder:
    """Folds events one at a time into the run's picture (what `fold` returns), so a live view pays per new event."""

    def __init__(self) -> None:
        self.run: dict[str, Any] = {"state": "starting", "rounds_done": 0, "final_metrics": {}}
        self.devices: dict[str, dict[str, Any]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.excluded: dict[str, str] = {}
        self.curve: list[list[float]] = []
        self.metric = "accuracy"
        self.count = 0
        self.next_seq = 0

    def add(self, event: Mapping[str, Any]) -> None:
        self.count += 1
        self.next_seq = int(event.get("seq", self.next_seq)) + 1
        kind = event.get("kind")
        if kind == "run_started":
            self.run.update({k: v for k, v in event.items() if k not in ("seq", "kind")})
            self.run["state"] = "running"
        elif kind == "fleet":
            self.excluded = dict(event.get("excluded", {}))
            for d, fields in event.get("devices", {}).items():
                self.devices.setdefault(d, {"history": []}).update(fields)
        elif kind == "round":
            self._round(event)
        elif kind == "run_finished":
            self.run.update({k: v for k, v in event.items() if k not in ("seq", "kind", "t")})

    def _round(self, event: Mapping[str, Any]) -> None:
        keys = ("round_idx", "attempt", "merged", "timings_s", "replies", "metrics", "wall_s", "overlap")
        self.rounds.append({k: event.get(k) for k in keys})

        def of(key: str, device: str, default: Any = None) -> Any:
            return (event.get(key) or {}).get(device, default)

        for d, reply in (event.get("replies") or {}).items():
            record = self.devices.setdefault(d, {"history": []})
            record["history"].append(
                {
                    "round_idx": event.get("round_idx"),
                    "attempt": event.get("attempt"),
                    "reply": reply,
                    "width": of("width_ratios", d),
                    "peak_rss_bytes": of("peak_rss_bytes", d),
                    "bytes_down": of("bytes_down", d, 0),
                    "bytes_up": of("bytes_up", d, 0),
                    "step_time_s": of("step_time_s", d),
                }
            )
            for key in ("peak_rss_bytes", "step_time_s"):
                if of(key, d) is not None:
                    record[key] = of(key, d)
            record["width_this_round"] = of("width_ratios", d)
            record["bytes_down_total"] = record.get("bytes_down_total", 0) + of("bytes_down", d, 0)
            record["bytes_up_total"] = record.get("bytes_up_total", 0) + of("bytes_up", d, 0)
            if reply != "merged":
                self.failures.append({"round": event.get("round_idx"), "device": d, "reason": reply})
        figures = event.get("metrics") or {}
        if event.get("merged"):
            self.run["rounds_done"] = int(event.get("round_idx", 0)) + 1
            self.run["final_metrics"] = figures
            self.metric = "perplexity" if "perplexity" in figures else "accuracy"
            if self.metric in figures:
                self.curve.append([int(event.get("round_idx", 0)) + 1, float(figures[self.metric])])

    def picture(self) -> dict[str, Any]:
        """A copy of the picture (see `fold`)."""
        return copy.deepcopy(
            {
                "run": self.run,
                "devices": self.devices,
                "rounds": self.rounds,
                "curve": self.curve,
                "metric": self.metric,
                "failures": self.failures,
                "excluded": self.excluded,
                "events": self.count,
            }
        )


def fold(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's current picture from its events (pure).

    Returns:
        {"run": {...run_started fields, state, rounds_done, final_metrics},
         "devices": {id: {...latest fleet fields, history: [per round]}},
         "rounds": [per attempt: round_idx, attempt, merged, timings_s, replies, metrics, wall_s],
         "curve": [[round_idx + 1, metric] for merged rounds], "metric": "accuracy" | "perplexity",
         "failures": [{"round", "device", "reason"}], "excluded": {id: reason}, "events": count}
    """
    folder = Folder()
    for event in events:
        folder.add(event)
    return folder.picture()


def run_state(out: Path, events: list[dict[str, Any]] | None = None) -> str:
    """running / finished / failed / stopped / interrupted (a dead process without a finish event)."""
    events = read_events(out) if events is None else events
    picture = fold(events)["run"]
    state = str(picture.get("state", "starting"))
    if state in ("running", "starting"):
        pid = picture.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return "interrupted"
    return state
