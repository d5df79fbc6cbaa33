"""A real `psearch serve` process on 127.0.0.1: health, a search, bad input, concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_served_search_over_loopback(live_server):
    assert live_server.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=live_server, timeout=30) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/version").json()["index_matches_model"] is True
        page = client.get("/")
        assert page.status_code == 200 and "psearch" in page.text
        result = client.post("/search", data={"image_id": 5, "box": "5,8,30,80", "top_k": 3})
        assert result.status_code == 200 and len(result.json()["matches"]) == 3
        bad = client.post("/search", data={"image_id": 5, "box": "175,8,30,80"})
        assert bad.status_code == 400 and "outside the image" in bad.json()["error"]

        def one(_):
            return client.post("/search", data={"image_id": 4, "box": "50,25,32,85"}).status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(one, range(16))) == {200}
