"""Headless Chromium for tests that look at a page in a real browser (the run report, the dashboard).

    from browser import chromium, screenshot

    with chromium() as driver:
        driver.get(path.as_uri())
        screenshot(driver, tmp_path / "page.png")

Debian's `/usr/bin/chromium` driven by `/usr/bin/chromedriver` (package
chromium-driver) through selenium. A missing browser or driver fails the test,
never skips it: `scripts/setup.sh` installs them. Importable from any test
(tests/ is on sys.path through tests/conftest.py, as for memory_limits.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
MAX_HEIGHT = 12_000  # a full-page screenshot stops here (px)


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1024) -> Iterator["WebDriver"]:
    """A headless Chromium WebDriver with a `width` x `height` window, quit on exit.

    Raises:
        pytest.fail.Exception: Chromium, chromedriver or selenium is missing (run scripts/setup.sh).
    """
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: run scripts/setup.sh (Debian packages chromium and chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed ({exc}): run scripts/setup.sh")
    options = Options()
    for argument in (*ARGUMENTS, f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: "WebDriver", path: Path) -> Path:
    """Save the whole page (up to `MAX_HEIGHT` px tall) as a PNG at `path`."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    width = int(driver.get_window_size()["width"])
    driver.set_window_size(width, min(max(height, 100), MAX_HEIGHT))
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"chromium could not save a screenshot to {path}")
    return path
