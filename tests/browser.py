"""A real headless browser for the tests: Debian's Chromium and its chromedriver, driven by Selenium.

`headless_chromium()` yields a Selenium driver that records the page's console. Without Chromium, chromedriver or
Selenium the test is skipped with the reason; in CI (CI=true, where `.ci/run` installs them) it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser test, but {reason} (.ci/run installs chromium and chromium-driver)")
    pytest.skip(f"no headless browser: {reason} (apt-get install chromium chromium-driver; pip install selenium)")


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900):
    browser = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        _unavailable(f"{'chromium' if browser is None else 'chromedriver'} is not on PATH")
    if importlib.util.find_spec("selenium") is None:
        _unavailable("selenium is not installed")
    from selenium import webdriver  # the test extra; imported once it is known to be there
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
