"""gradio's start-up check of its own page, made patient.

gradio's launch asks its local URL with 3-second HEAD requests and gives up at the first timeout, then exits ("When
localhost is not accessible, a shareable link must be created"); on a busy machine a page that is up can take longer
to answer, so `python app.py` died at start-up beside other work. Here the check waits up to PAGE_WAIT_S, as a hang
guard; the page must still answer.
"""

from __future__ import annotations

import contextlib
import time

import gradio.networking
import httpx

PAGE_WAIT_S = 240
REQUEST_TIMEOUT_S = 30
ANSWERS = (200, 401, 301, 302, 303, 307, 308)  # gradio's own list: a login or a redirect is a page that is up


def patient_url_ok(url: str) -> bool:
    deadline = time.monotonic() + PAGE_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.head(url, timeout=REQUEST_TIMEOUT_S, verify=False).status_code in ANSWERS:
                return True
        time.sleep(0.5)
    return False


def be_patient() -> None:
    """gradio's launch check, patient from now on in this process."""
    gradio.networking.url_ok = patient_url_ok
