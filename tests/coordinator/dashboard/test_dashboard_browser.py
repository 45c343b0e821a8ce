"""A real browser on the live dashboard: headless Chromium watches a real simulated run through SSE.

Chromium and chromedriver are Debian's (`tests/browser.py`; `scripts/setup.sh`
installs them); missing, the test fails with that hint: it never skips.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from browser import chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def browser() -> Iterator[object]:
    with chromium(1400, 1000) as driver:
        yield driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the page is still loading
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_dashboard_shows_a_live_run_without_reloading(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    # Prepare: a real simulated run (3 device daemons, a private Mosquitto) serving its dashboard.
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "msfusion.coordinator.cli.main", "simulate", "--devices", "3", "--rounds", "12"]
    command += ["--local-samples", "64", "--samples-per-device", "600", "--channels", "8,16,32"]
    command += ["--out", str(tmp_path / "run"), "--dashboard", f"127.0.0.1:{port}"]
    log = open(tmp_path / "simulate.log", "wb")  # noqa: SIM115
    run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: httpx.get(url + "api/runs", timeout=2).json(), 240, "the dashboard to list the run")
        # Execute: open the page once; everything after comes over the event stream.
        browser.get(url)
        browser.execute_script("window.__loadedOnce = 'yes';")
        rows = _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")) == 3, 120, "3 devices")
        start = int(_wait(lambda: browser.find_element(By.ID, "round-counter").text, 30, "the round counter"))
        _wait(lambda: int(browser.find_element(By.ID, "round-counter").text) > start + 1, 240, "two more rounds")
        # Assert: the same page (never reloaded) shows the devices, the rounds and the curve.
        assert rows and browser.execute_script("return window.__loadedOnce") == "yes"
        assert browser.find_element(By.ID, "state").text == "running"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")) >= start + 2
        assert browser.find_elements(By.CSS_SELECTOR, "#curve canvas")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        # The fleet table is re-rendered by every event: a link found may be replaced before it is clicked.
        _wait(lambda: browser.find_element(By.LINK_TEXT, "dev000").click() or True, 30, "a click on dev000")
        _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#history tbody tr"), 60, "the device's history")
        _wait(lambda: browser.find_element(By.ID, "device-id").text == "dev000", 30, "the device page of dev000")
        assert _wait(lambda: "MB" in browser.find_element(By.ID, "budget").text, 30, "the device's budget in MB")
        browser.save_screenshot(str(tmp_path / "device.png"))
    finally:
        run.terminate()
        run.wait(60)
        log.close()
    for name in ("dashboard.png", "device.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    print(f"screenshots: {tmp_path / 'dashboard.png'} {tmp_path / 'device.png'}")
