"""A real headless browser for the dashboard's tests: Debian's chromium driven through its
chromedriver by Selenium, both found at /usr/bin (apt-get install chromium chromium-driver;
.ci/run installs them). Nothing here downloads a browser or a driver: the paths are given, and
Selenium Manager is kept offline.

Where they are missing those tests are skipped, saying how to install them; with
``DDM_REQUIRE_CHROMIUM=1`` (CI sets it) they fail instead, so that nothing is hidden there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require_module

REQUIRED = "DDM_REQUIRE_CHROMIUM"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def require_chromium() -> None:
    """Call at the top of a test module, before importing selenium."""
    require_module("selenium", REQUIRED, "selenium is not installed: pip install -e '.[test]'")
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    why = f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
    if os.environ.get(REQUIRED):
        pytest.fail(f"{REQUIRED} is set but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1500) -> Iterator:
    """A headless chromium (a Selenium WebDriver) with a window of this size; quit at the end."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
