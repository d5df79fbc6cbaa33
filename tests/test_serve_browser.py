"""The search page in a real browser (Playwright driving Debian's chromium): load the page,
pick a gallery image, draw a box, see ranked crops, open a match in its scene; over an index
of video footage, each match's video, time and frame.

Saves the page as a screenshot (docs/img/search-page.png when PSEARCH_SCREENSHOT=docs, else
under pytest's tmp_path) — the README's picture comes from here.
"""

from __future__ import annotations

import pytest
from browser import BROWSER_MARKS, chromium_page, screenshot_dir
from video_fixtures import FPS, FRAMES, PLANTED, PLANTED_BOX

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


def _place(frame: int) -> str:
    """The page's text for a frame of the footage: 'street.mp4 @ 0:01.25 (frame 5)'."""
    return f"street.mp4 @ 0:{frame / FPS:05.2f} (frame {frame})"


def test_a_video_index_shows_each_match_time(video_live_server, tmp_path):
    """Over an index of footage (psearch extract --video, the street model): the gallery is
    the video's frames, and a box typed around the planted person in frame 5 lists the other
    frames holding them first, each with its video, time and frame on the page."""
    shots = screenshot_dir(tmp_path)
    with chromium_page() as (page, errors):
        page.goto(video_live_server + "/")
        page.wait_for_selector(".gallery button")
        assert page.locator(".gallery button").count() == FRAMES
        frame5 = page.locator('.gallery button[data-image-id="5"]')
        assert _place(5) in frame5.get_attribute("aria-label")

        frame5.click()
        page.wait_for_function("document.getElementById('scene').complete")
        page.wait_for_selector("#overlay rect.det")
        # The planted person stands inside detected boxes (a press there picks the detection):
        # type the box, as a keyboard user does.
        page.locator("#box").fill(",".join(str(v) for v in PLANTED_BOX))
        page.wait_for_selector("#overlay rect.drawn")
        page.locator("#search").click()
        page.wait_for_selector("#results li button")
        page.wait_for_function(
            "document.getElementById('status-text').textContent.includes('matches in')"
        )
        shown = page.locator("#results li .meta").all_inner_texts()
        others = len(PLANTED) - 1  # the query's own frame is never a match
        top = [text.rsplit("· ", 1)[-1] for text in shown[:others]]
        assert sorted(top) == sorted(_place(f) for f in PLANTED if f != 5), shown
        page.screenshot(path=str(shots / "search-video.png"), full_page=True)

        page.locator("#results li button").first.click()
        page.wait_for_selector("#viewer[open] #viewer-overlay rect.match")
        title = page.locator("#viewer-title").inner_text()
        assert title.startswith("Match #1 in ") and title.removeprefix("Match #1 in ") == top[0]
        assert errors == []
