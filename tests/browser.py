"""Driving Debian's chromium with Playwright, shared by the browser tests (the search page,
the MLflow UI): the marks that skip without chromium, a page whose script errors are kept,
and where screenshots go (docs/img when PSEARCH_SCREENSHOT=docs, else pytest's tmp_path).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("PSEARCH_CHROMIUM", "/usr/bin/chromium"))
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"
    ),
]


def screenshot_dir(tmp_path: Path) -> Path:
    """docs/img when PSEARCH_SCREENSHOT=docs (to refresh the docs' pictures), else tmp_path."""
    shots = DOCS_IMAGES if os.environ.get("PSEARCH_SCREENSHOT") == "docs" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 760) -> Iterator[tuple[Any, list[str]]]:
    """(page, errors): a headless chromium page; `errors` collects its uncaught script errors."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()
