"""gradio's upload route under a per-client quota (fluxdemo/studio/upload_quota.py), driven through a real ASGI app."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fluxdemo.studio import upload_quota
from fluxdemo.studio.upload_quota import UploadQuota


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def app(clock: Clock, per_minute: int = 3) -> Starlette:
    async def ok(request) -> PlainTextResponse:
        return PlainTextResponse("stored")

    routes = [Route("/gradio_api/upload", ok, methods=["POST"]), Route("/gradio_api/info", ok)]
    return Starlette(routes=routes, middleware=[Middleware(UploadQuota, per_minute=per_minute, clock=clock)])


async def statuses(client: httpx.AsyncClient, n: int) -> list[int]:
    return [(await client.post("/gradio_api/upload", files={"files": b"x"})).status_code for _ in range(n)]


@pytest.mark.anyio
async def test_a_client_past_its_quota_gets_429_and_a_sentence_and_others_do_not() -> None:
    clock = Clock()
    transport = httpx.ASGITransport(app=app(clock), client=("10.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert await statuses(client, 4) == [200, 200, 200, 429]
        refused = await client.post("/gradio_api/upload", files={"files": b"x"})
        assert (
            refused.text == "Too many uploads: at most 3 a minute from one client. Wait a minute, then upload again."
        )
        assert (await client.get("/gradio_api/info")).status_code == 200  # only uploads are counted
        clock.now += upload_quota.WINDOW_SECONDS
        assert await statuses(client, 1) == [200]  # a minute later the window has moved on
    other = httpx.ASGITransport(app=app(clock), client=("10.0.0.2", 1))
    async with httpx.AsyncClient(transport=other, base_url="http://test") as client:
        assert await statuses(client, 3) == [200, 200, 200]


def test_the_table_of_clients_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(upload_quota, "MAX_CLIENTS_TRACKED", 5)
    quota = UploadQuota(app=None, per_minute=1, clock=Clock())
    assert all(quota._admit(f"10.0.0.{i}") for i in range(20))
    assert list(quota._seen) == [f"10.0.0.{i}" for i in range(15, 20)]
