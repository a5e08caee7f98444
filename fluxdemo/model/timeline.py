"""The stage timeline: every load, encode, denoise step and decode, with seconds. The product teaches, so it logs
each stage as it ends and keeps the list for reports and the UI's run panel."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str  # "load transformer", "encode", "baseline step 3/28", "decode"
    seconds: float
    start: float  # seconds since the timeline began
    detail: str = ""


@dataclass
class Timeline:
    stages: list[Stage] = field(default_factory=list)
    origin: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, detail, start=start)

    def add(self, name: str, seconds: float, detail: str = "", *, start: float | None = None) -> None:
        begin = (start if start is not None else time.perf_counter() - seconds) - self.origin
        self.stages.append(Stage(name, seconds, begin, detail))
        logger.info("%-28s %8.3f s%s", name, seconds, f"  {detail}" if detail else "")

    def total(self, prefix: str = "") -> float:
        return sum(s.seconds for s in self.stages if s.name.startswith(prefix))
