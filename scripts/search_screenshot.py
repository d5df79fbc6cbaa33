"""A screenshot of the search page over a trained model: the docs' picture of what a user sees.

Starts `psearch serve` on 127.0.0.1 (a free port) over INDEX and MODEL, opens the page in
Debian's chromium (Playwright), picks gallery image N, takes its first detected person as the
query, searches, and saves the page. Usage, after `make demo` (run from the project root):

    .venv/bin/python scripts/search_screenshot.py --index runs/index --model runs/model \
        --out docs/img/search-demo.png [--image 3] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"psearch serve exited with {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not healthy after {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image", type=int, default=0, help="gallery button to pick (0-based)")
    parser.add_argument(
        "--chromium", default=os.environ.get("PSEARCH_CHROMIUM", "/usr/bin/chromium")
    )
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "psearch", "serve", "--index", str(args.index),
        "--model", args.model, "--port", str(port), "--reload-interval", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    with subprocess.Popen(command) as server:
        try:
            wait_healthy(url, server)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(url + "/")
                page.wait_for_selector(".gallery button")
                page.locator(".gallery button").nth(args.image).click()
                page.wait_for_function("document.getElementById('scene').complete")
                page.wait_for_selector("#overlay rect.det")
                page.locator("#overlay rect.det").first.focus()
                page.keyboard.press("Enter")
                page.wait_for_function(
                    "document.getElementById('status-text').textContent.includes('matches in')"
                )
                page.wait_for_function(
                    "[...document.querySelectorAll('#results img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)"
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            server.terminate()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
