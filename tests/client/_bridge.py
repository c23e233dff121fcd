"""Runs `hivewire.api` against the real server app in process.

Starlette's TestClient is built on httpx2, so it cannot serve as an `httpx` transport itself; this transport
hands each request to it (and so to the app, its lifespan and database) and copies the answer back.
"""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient


class AppTransport(httpx.BaseTransport):
    """An `httpx` transport whose server is the ASGI app behind `client`."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.client.request(
            request.method,
            str(request.url),
            headers=list(request.headers.multi_items()),
            content=request.read(),
            follow_redirects=False,
        )
        headers = [(name, value) for name, value in answer.headers.multi_items() if name != "content-encoding"]
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)
