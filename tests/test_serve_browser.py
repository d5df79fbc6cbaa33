"""The search page in a real browser (Playwright driving Debian's chromium): load the page,
pick a gallery image, draw a box, see ranked crops, open a match in its scene.

Saves the page as a screenshot (docs/img/search-page.png when PSEARCH_SCREENSHOT=docs, else
under pytest's tmp_path) — the README's picture comes from here.
"""

from __future__ import annotations

import pytest
from browser import BROWSER_MARKS, chromium_page, screenshot_dir

pytestmark = BROWSER_MARKS


def test_draw_a_box_and_open_a_match(live_server, tmp_path):
    shots = screenshot_dir(tmp_path)
    with chromium_page() as (page, errors):
        page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
        page.goto(live_server + "/")
        page.wait_for_selector(".gallery button")
        assert page.locator(".gallery button").count() == 8
        assert "detections" in page.locator("#version").inner_text()

        page.locator('.gallery button[data-image-id="5"]').click()
        page.wait_for_function("document.getElementById('scene').complete")
        page.wait_for_selector("#overlay rect.det")
        # Drag a box around the person at (5, 8, 30, 80) in the 180 x 100 image.
        overlay = page.locator("#overlay").bounding_box()
        sx, sy = overlay["width"] / 180, overlay["height"] / 100
        page.mouse.move(overlay["x"] + 5 * sx, overlay["y"] + 8 * sy)
        page.mouse.down()
        page.mouse.move(overlay["x"] + 20 * sx, overlay["y"] + 40 * sy, steps=4)
        page.mouse.move(overlay["x"] + 35 * sx, overlay["y"] + 88 * sy, steps=4)
        page.mouse.up()
        drawn = [int(v) for v in page.locator("#box").input_value().split(",")]
        assert drawn == pytest.approx([5, 8, 30, 80], abs=2)

        page.locator("#search").click()
        page.wait_for_selector("#results li button")
        page.wait_for_function(
            "!document.body.getAttribute('aria-busy') || document.body.getAttribute('aria-busy') === 'false'"
        )
        assert page.locator("#results li").count() == 7
        assert "matches in" in page.locator("#status-text").inner_text()
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=str(shots / "search-page.png"), full_page=True)

        # Open the top match with the keyboard: its scene, with the box drawn.
        page.locator("#results li button").first.focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#viewer[open] #viewer-overlay rect.match")
        assert "Match #1" in page.locator("#viewer-title").inner_text()
        page.screenshot(path=str(shots / "search-match.png"))
        page.keyboard.press("Escape")
        page.wait_for_selector("#viewer:not([open])", state="attached")

        # A detected box is a keyboard-reachable button too.
        page.locator("#overlay rect.det").first.focus()
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('status-text').textContent.includes('matches in')"
        )
        assert errors == []
    assert (shots / "search-page.png").stat().st_size > 10_000
