"""Headless Debian Chromium driven by Playwright for Python, for the browser tours.

The browser is the system's ``/usr/bin/chromium`` (Debian's package, installed by ``make
browser``); Playwright never downloads one. :func:`browser_problem` says why no browser can run
here, so a test can skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("COUPONOPS_TEST_CHROMIUM", "/usr/bin/chromium"))
#: What headless Chromium needs in a container without a GPU, a sandbox or a network.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
VIEWPORT = {"width": 1280, "height": 800}


def browser_problem() -> str | None:
    """Return why no browser test can run here, or ``None`` when one can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is missing: run `make venv` (it is a dev dependency)"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """Yield a Playwright ``Browser`` of the system Chromium, headless, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str, folders: list[Path]) -> Path:  # noqa: ANN401 - a Playwright Page
    """Save a PNG of the page's viewport as ``name.png`` in every folder; return the first copy."""
    first: Path | None = None
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        if first is None:
            page.screenshot(path=str(path), full_page=False)
            first = path
        else:
            shutil.copyfile(first, path)
    assert first is not None, "no folder to save the screenshot in"
    return first
