"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium, for UI tests.

Chromium runs as root here, so it needs ``--no-sandbox``; everything that would reach the
internet (sync, component updates, QUIC, background networking) is off, and each browser gets a
fresh profile directory that is removed afterwards together with chromedriver and every
Chromium process.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextmanager
def chromium(
    width: int = 1600, height: int = 1000, log_path: Path | None = None
) -> Iterator[webdriver.Chrome]:
    """A headless Chromium session; quits the browser and chromedriver and removes the profile on exit."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            raise FileNotFoundError(f"{binary} missing (Debian packages chromium, chromium-driver)")
    profile = Path(tempfile.mkdtemp(prefix="amibake-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(log_path) if log_path else None)
    try:
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()  # ends Chromium and stops chromedriver
    finally:
        service.stop()  # idempotent; covers a browser that failed to start
        shutil.rmtree(profile, ignore_errors=True)
