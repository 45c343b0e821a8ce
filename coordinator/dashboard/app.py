"""The dashboard's ASGI app (Starlette): pages, static files, a JSON API and server-sent events.

API (read-only; every response is JSON unless said otherwise):

====================================== =====================================================
``GET /api/runs``                      ``[{id, out, state, strategy, model, rounds,
                                       rounds_done, final_metrics, live}]``, live run first
``GET /api/runs/{id}``                 the run's picture (`events.fold`): ``run``,
                                       ``rounds`` (per attempt: round_idx, attempt, merged,
                                       timings_s, replies, metrics, wall_s), ``curve``
                                       ([[round, value]]), ``metric``, ``failures``,
                                       ``excluded``, ``events`` (how many so far), and
                                       ``devices`` without their history
``GET /api/runs/{id}/devices``         ``{device_id: {state, progress, width, budget_bytes,
                                       peak_rss_bytes, step_time_s, bytes_down_total,
                                       bytes_up_total, failures, last_failure, history:
                                       [{round_idx, attempt, reply, width, peak_rss_bytes,
                                       bytes_down, bytes_up, step_time_s}]}}``
``GET /api/runs/{id}/events?since=N``  ``text/event-stream``: every event from sequence
                                       number N on, then new ones as they happen (SSE
                                       ``id`` = seq, ``event`` = kind, ``data`` = the event
                                       as JSON, fields as in `fleet/events.py`)
====================================== =====================================================

Pages: ``/`` (fleet table, round timeline, metric curve, failures; ``?run=ID``
picks a run) and ``/devices/{device_id}?run=ID`` (one device's history). The
pages are plain HTML and JavaScript with uPlot (a 51 kB charting library
shipped in ``static/``, MIT): no build step, no CDN, they work offline.

Authentication: with a token (the server sets one when bound beyond
loopback), every request needs ``Authorization: Bearer TOKEN``, or the
``msfusion_token`` cookie that a first visit with ``?token=TOKEN`` sets
(EventSource cannot send headers).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msfusion.coordinator.fleet.events import EVENTS_FILE, Folder, RunEvents, fold, read_events, run_state

STATIC = Path(__file__).parent / "static"
COOKIE = "msfusion_token"
POLL_S = 0.25  # how often a stream looks for new events


class RunsView:
    """The runs a dashboard shows: live ones (this process's event streams) and finished ones under a folder.

    Args:
        root: a folder whose subfolders are run folders (None: live runs only).
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.live: dict[str, RunEvents] = {}
        self._folders_live: dict[str, Folder] = {}
        self._lock = threading.Lock()

    def add_live(self, run_id: str, events: RunEvents) -> None:
        self.live[run_id] = events

    def _folders(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.root is not None and self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if (folder / EVENTS_FILE).is_file():
                    found[folder.name] = folder
        return found

    def picture(self, run_id: str) -> dict[str, Any] | None:
        """The run's picture (`events.fold`); a live run's is folded incrementally, new events only."""
        if run_id in self.live:
            with self._lock:
                folder = self._folders_live.setdefault(run_id, Folder())
                for event in self.live[run_id].since(folder.next_seq):
                    folder.add(event)
                return folder.picture()
        events = self.events(run_id)
        if events is None:
            return None
        picture = fold(events)
        if self.root is not None:
            picture["run"]["state"] = run_state(self.root / run_id, events)
        return picture

    def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]] | None:
        """Events of a run from `since` on (None: no such run)."""
        if run_id in self.live:
            return self.live[run_id].since(since)
        folder = self._folders().get(run_id)
        if folder is None:
            return None
        return [e for e in read_events(folder) if e.get("seq", 0) >= since]

    def summary(self) -> list[dict[str, Any]]:
        out = []
        seen = set()
        for run_id, events in self.live.items():
            out.append(_row(run_id, str(events.out), events.since(0), live=True))
            seen.add(str(events.out.resolve()))
        for name, folder in self._folders().items():
            if str(folder.resolve()) in seen:
                continue
            events_list = read_events(folder)
            row = _row(name, str(folder), events_list, live=False)
            row["state"] = run_state(folder, events_list)
            out.append(row)
        return out


def _row(run_id: str, out: str, events: list[dict[str, Any]], live: bool) -> dict[str, Any]:
    run = fold(events)["run"]
    return {
        "id": run_id,
        "out": out,
        "state": run.get("state"),
        "strategy": run.get("strategy"),
        "model": run.get("model"),
        "rounds": run.get("rounds"),
        "rounds_done": run.get("rounds_done", 0),
        "final_metrics": run.get("final_metrics", {}),
        "live": live,
    }


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    given = request.headers.get("authorization", "")
    candidates = [given[7:] if given.lower().startswith("bearer ") else "", request.cookies.get(COOKIE, "")]
    candidates.append(request.query_params.get("token", ""))
    return any(c and hmac.compare_digest(c, token) for c in candidates)


def make_app(view: RunsView, token: str | None = None) -> Starlette:
    """The dashboard app over `view`; `token` (None: none) guards every route."""

    async def runs(request: Request) -> Response:
        return JSONResponse(view.summary())

    def _picture(run_id: str) -> dict[str, Any] | None:
        return view.picture(run_id)

    async def run(request: Request) -> Response:
        picture = _picture(request.path_params["run_id"])
        if picture is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        picture["devices"] = {d: {k: v for k, v in r.items() if k != "history"} for d, r in picture["devices"].items()}
        return JSONResponse(picture)

    async def devices(request: Request) -> Response:
        picture = _picture(request.path_params["run_id"])
        if picture is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse(picture["devices"])

    async def stream(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            since = max(0, int(request.query_params.get("since", "0")))
        except ValueError:
            return JSONResponse({"error": "since must be an integer"}, status_code=400)
        if view.events(run_id, since) is None:
            return JSONResponse({"error": "no such run"}, status_code=404)

        async def generate() -> AsyncIterator[dict[str, Any]]:
            seq = since
            while True:
                batch = view.events(run_id, seq) or []
                for event in batch:
                    seq = int(event["seq"]) + 1
                    yield {"id": str(event["seq"]), "event": str(event["kind"]), "data": json.dumps(event, default=str)}
                if batch and batch[-1].get("kind") == "run_finished" and run_id not in view.live:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_S)

        return EventSourceResponse(generate(), ping=15)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def device_page(request: Request) -> Response:
        return FileResponse(STATIC / "device.html")

    routes = [
        Route("/", index),
        Route("/devices/{device_id}", device_page),
        Route("/api/runs", runs),
        Route("/api/runs/{run_id}", run),
        Route("/api/runs/{run_id}/devices", devices),
        Route("/api/runs/{run_id}/events", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Guard, token=token)])


class _Guard:
    """ASGI middleware: the bearer token on every request (a pure ASGI class, so streams are not buffered)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not _authorized(request, self.token):
            await JSONResponse({"error": "a bearer token is required"}, status_code=401)(scope, receive, send)
            return
        set_cookie = self.token is not None and request.query_params.get("token") == self.token

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Cache-Control"] = "no-store"
                if set_cookie:
                    headers.append("set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")
            await send(message)

        await self.app(scope, receive, sending)
