"""Headless Chromium for tests of pages: the DOM after the page's scripts ran, and a screenshot.

WebGL runs on SwiftShader (Chromium's CPU rasteriser; recent versions need
``--enable-unsafe-swiftshader`` to allow it), so no GPU or display is needed. Virtual time lets
the page's scripts and media events finish before the DOM is dumped or the picture taken.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_or_skip() -> str:
    """The browser's path; skip (locally) or fail (under CI, which installs it) without one."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    message = ("no Chromium on PATH (tried " + ", ".join(BROWSERS) + "): install it with "
               "`sudo apt-get install -y chromium` (.ci/run does)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _run(browser: str, profile: Path, url: str, *flags: str, window: tuple[int, int]) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
               "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--force-device-scale-factor=1",
               "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
               f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=20000", *flags, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def dump_dom(browser: str, page: Path, profile: Path, window: tuple[int, int]) -> str:
    return _run(browser, profile, page.resolve().as_uri(), "--dump-dom", window=window).stdout


def screenshot(browser: str, page: Path, profile: Path, out: Path, window: tuple[int, int]) -> Path:
    _run(browser, profile, page.resolve().as_uri(), f"--screenshot={out}", window=window)
    assert out.is_file(), "Chromium wrote no screenshot"
    return out
