"""What a visitor may read of an error: the library's sentence without the machine's paths, or a short note."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import gradio as gr

from fluxdemo.errors import CancelledError, FluxdemoError

logger = logging.getLogger(__name__)

# An absolute path of two or more parts, e.g. /root/.cache/huggingface/hub (quotes and brackets end it); not the path
# of a URL such as https://huggingface.co/settings/tokens, which a sentence gives so that people can follow it.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"`()]+/)+[^\s/'\"`()]*")


def without_paths(message: str) -> str:
    """The library's sentence with the machine's absolute paths cut to their last part: a page may be public, and
    where the server keeps its files is none of a visitor's business (the server log keeps the full message)."""
    return _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def for_people(fn: Callable) -> Callable:
    """Turn a handler's errors into what a person can read: the library's sentence for errors they can act on, and
    for anything else a short note while the traceback goes to the server log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except CancelledError as e:
            logger.info("%s", e)
            raise gr.Error(without_paths(str(e)), title="Cancelled", print_exception=False) from None
        except FluxdemoError as e:
            logger.warning("%s: %s", fn.__name__, e)
            raise gr.Error(without_paths(str(e)), print_exception=False) from None
        except Exception as e:
            logger.exception("%s failed", fn.__name__)
            # Only the kind of error: its text can hold paths and internals, which a public page must not show.
            raise gr.Error(
                f"Something went wrong on the server ({type(e).__name__}); the details are in the server log.",
                print_exception=False,
            ) from None

    return wrapper
