"""A quota on gradio's upload route: each client may send at most so many uploads a minute.

gradio bounds each uploaded file's size (`max_file_size`) but not how many a client sends: every upload lands in its
cache until `delete_cache` clears it a day later, so one script could fill the disk. This ASGI middleware counts
`POST .../gradio_api/upload` per client address in a sliding minute and answers 429 with a sentence past the quota;
every other request passes untouched.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

UPLOADS_PER_MINUTE = 30  # a page sends one per file a person picks; a script would need more
WINDOW_SECONDS = 60.0
MAX_CLIENTS_TRACKED = 10_000  # the table of clients is bounded too: the oldest are forgotten first


class UploadQuota:
    """ASGI middleware: at most `per_minute` uploads per client address in any WINDOW_SECONDS."""

    def __init__(self, app, per_minute: int = UPLOADS_PER_MINUTE, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.per_minute, self.clock = app, per_minute, clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/gradio_api/upload"):
            client = (scope.get("client") or ("unknown", 0))[0]
            if not self._admit(client):
                body = (
                    f"Too many uploads: at most {self.per_minute} a minute from one client. Wait a minute, then "
                    "upload again."
                ).encode()
                await send({"type": "http.response.start", "status": 429,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _admit(self, client: str) -> bool:
        now = self.clock()
        with self._lock:
            times = self._seen.pop(client, deque())
            while times and now - times[0] >= WINDOW_SECONDS:
                times.popleft()
            admitted = len(times) < self.per_minute
            if admitted:
                times.append(now)
            self._seen[client] = times  # re-inserted: the dict's order is the clients' last use
            while len(self._seen) > MAX_CLIENTS_TRACKED:
                del self._seen[next(iter(self._seen))]
            return admitted
