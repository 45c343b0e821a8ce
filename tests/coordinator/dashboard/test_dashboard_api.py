"""The dashboard's JSON API and event stream, over a real uvicorn server, read with httpx."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from msfusion.coordinator.dashboard.app import STATIC, RunsView
from msfusion.coordinator.dashboard.server import TOKEN_FILE, Dashboard, DashboardOptions, parse_bind
from msfusion.coordinator.fleet.events import RunEvents
from msfusion.errors import ConfigError


class _Record:
    """The fields of `registry.DeviceRecord` that a fleet snapshot reads."""

    def __init__(self, state: str, failures: int = 0, last_failure: str = "") -> None:
        self.state, self.progress, self.max_ratio, self.memory_cap = state, 0.5, 0.25, 1.0
        self.memory_budget_bytes, self.sized_by = 512 << 20, "budget"
        self.failures, self.last_failure = failures, last_failure


def _round(i: int, replies: dict[str, str]) -> dict[str, object]:
    return {
        "round_idx": i,
        "attempt": 0,
        "merged": True,
        "overlap": 0.9,
        "replies": replies,
        "metrics": {"loss": 2.0 - i, "accuracy": 0.3 + 0.1 * i},
        "timings_s": {"plan_s": 0.01, "collect_s": 1.5, "merge_s": 0.1},
        "bytes_down": {d: 1000 for d in replies},
        "bytes_up": {d: 500 for d in replies},
        "peak_rss_bytes": {d: 400 << 20 for d in replies},
        "width_ratios": {d: 0.25 for d in replies},
        "step_time_s": {d: 0.02 for d in replies},
        "wall_s": 1.7,
    }


@pytest.fixture
def run(tmp_path: Path) -> RunEvents:
    events = RunEvents(tmp_path / "runs" / "demo")
    events.emit("run_started", run_id="demo", pid=1, strategy="msfusion", model="cnn", rounds=3, params=94410)
    events.fleet(
        {"dev000": _Record("idle"), "dev001": _Record("training", 1, "deadline <script>")},
        {"dev000": True, "dev001": True},
        {},
    )
    events.emit("round", **_round(0, {"dev000": "merged", "dev001": "failed: deadline"}))
    return events


def test_the_api_serves_runs_a_runs_picture_and_its_devices(run: RunEvents) -> None:
    view = RunsView(root=run.out.parent)
    view.add_live("demo", run)
    server = Dashboard(view, DashboardOptions()).start()
    try:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            runs = client.get("/api/runs").json()
            picture = client.get("/api/runs/demo").json()
            devices = client.get("/api/runs/demo/devices").json()
            missing = client.get("/api/runs/nope")
    finally:
        server.stop()
    assert [(r["id"], r["state"], r["live"], r["rounds_done"]) for r in runs] == [("demo", "running", True, 1)]
    assert picture["curve"] == [[1, pytest.approx(0.3)]] and picture["metric"] == "accuracy"
    assert picture["failures"] == [{"round": 0, "device": "dev001", "reason": "failed: deadline"}]
    assert "history" not in picture["devices"]["dev000"]
    assert devices["dev001"]["last_failure"] == "deadline <script>"
    assert (
        devices["dev000"]["history"][0] | {"reply": "merged", "width": 0.25, "bytes_down": 1000}
        == devices["dev000"]["history"][0]
    )
    assert missing.status_code == 404


def test_the_event_stream_replays_and_then_delivers_new_events_as_they_happen(run: RunEvents) -> None:
    view = RunsView()
    view.add_live("demo", run)
    server = Dashboard(view, DashboardOptions()).start()
    got: list[dict[str, object]] = []

    def later() -> None:
        time.sleep(0.5)
        run.emit("round", **_round(1, {"dev000": "merged", "dev001": "merged"}))

    try:
        threading.Thread(target=later, daemon=True).start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            with client.stream("GET", "/api/runs/demo/events", params={"since": 1}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        got.append(json.loads(line[5:]))
                    if len(got) == 3:
                        break
    finally:
        server.stop()
    # Replayed from seq 1 (the fleet snapshot and round 1), then round 2 as it was emitted.
    assert [(e["seq"], e["kind"]) for e in got] == [(1, "fleet"), (2, "round"), (3, "round")]
    assert got[2]["round_idx"] == 1


def test_beyond_loopback_every_request_needs_the_token(run: RunEvents, tmp_path: Path) -> None:
    view = RunsView()
    view.add_live("demo", run)
    server = Dashboard(view, DashboardOptions(host="0.0.0.0"), token_dir=run.out).start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert server.token and server.generated_token
        token_file = run.out / TOKEN_FILE
        assert token_file.read_text().strip() == server.token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with httpx.Client(base_url=url, timeout=5) as client:
            assert client.get("/api/runs").status_code == 401
            assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/api/runs", headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
            first = client.get("/", params={"token": server.token})  # a browser's first visit sets the cookie
            assert first.status_code == 200 and "msfusion_token" in first.headers["set-cookie"]
            assert client.get("/api/runs/demo").status_code == 200  # now by cookie
    finally:
        server.stop()
    local = Dashboard(view, DashboardOptions(host="127.0.0.1")).start()
    try:
        assert local.token is None and httpx.get(f"{local.url}api/runs", timeout=5).status_code == 200
    finally:
        local.stop()


def test_the_pages_work_offline_and_their_weight_is_small(run: RunEvents) -> None:
    view = RunsView()
    view.add_live("demo", run)
    server = Dashboard(view, DashboardOptions()).start()
    try:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            pages = {path: client.get(path) for path in ("/", "/devices/dev000")}
            assets = sorted(set(re.findall(r'(?:src|href)="(/static/[^"]+)"', pages["/"].text)))
            weights = {a: len(client.get(a).content) for a in assets}
    finally:
        server.stop()
    assert all(p.status_code == 200 for p in pages.values())
    assert assets == [
        "/static/dashboard.css",
        "/static/dashboard.js",
        "/static/uPlot.iife.min.js",
        "/static/uPlot.min.css",
    ]
    for path in [*STATIC.glob("*.html"), *STATIC.glob("*.js"), *STATIC.glob("*.css")]:
        if path.name.startswith("uPlot"):
            continue
        assert not re.search(r"https?://", path.read_text()), f"{path.name} reaches outside the package"
    total = len(pages["/"].content) + sum(weights.values())
    print(f"dashboard page weight: {total} bytes ({weights})")
    assert total < 100_000


@pytest.mark.parametrize(
    ("text", "expected"), [("8080", ("127.0.0.1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:9", ("::1", 9))]
)
def test_a_bind_address_is_a_port_or_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


def test_a_bad_bind_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PORT or HOST:PORT"):
        parse_bind("localhost:http")


def test_with_a_certificate_the_dashboard_serves_https_only(run: RunEvents, tmp_path: Path) -> None:
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    view = RunsView()
    view.add_live("demo", run)
    server = Dashboard(view, DashboardOptions(tls_cert=cert, tls_key=key)).start()
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{server.url}api/runs", verify=context, timeout=5).json()[0]["id"] == "demo"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/api/runs", timeout=5)
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="both"):
        Dashboard(view, DashboardOptions(tls_cert=cert))
