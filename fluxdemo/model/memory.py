"""What memory there is: this process's RSS, the RAM and device memory free, and the manager's memory report.

Read from /proc (Linux) because psutil is not a dependency; elsewhere a figure is None, and the planner does without.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass

import torch

from fluxdemo.model.planner import Plan
from fluxdemo.records import Record, optional

logger = logging.getLogger(__name__)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def proc_status() -> dict[str, int]:
    """This process's memory figures in bytes from /proc/self/status (Linux; empty elsewhere): RssAnon, RssFile,
    VmHWM (peak RSS), ..."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def ram_available(*, free_pages: bool = False) -> int | None:
    """Bytes of RAM available now: Linux's MemAvailable, else (free_pages=True) the free pages, an underestimate
    that leaves out the page cache; else None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        if not free_pages:
            return None
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None


def free_device_memory(device: torch.device) -> int | None:
    """Device memory this process could use: free plus what torch's allocator already holds (ours to reuse).
    None on the CPU, and where the device cannot tell yet (a ZeroGPU Space's main process holds no GPU)."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device)
        if device.type == "mps":
            allocated = torch.mps.current_allocated_memory()
            return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory() + allocated
    except RuntimeError as e:
        logger.info("free memory of %s unknown (%s); planning without it", device, e)
    return None


@dataclass
class RssPeaks:
    """Peaks of this process's anonymous and file-backed RSS (Linux), sampled: the kernel keeps no peak of either."""

    anon: int = 0
    file: int = 0

    def sample(self) -> None:
        status = proc_status()
        self.anon = max(self.anon, status.get("RssAnon", 0))
        self.file = max(self.file, status.get("RssFile", 0))


@dataclass(frozen=True, kw_only=True)
class MemoryReport(Record):
    """The plan, what happened, and peaks. Host facts (the plan's free memory, this process's RSS) are optional:
    fluxdemo.pipeline.limits.for_visitor leaves them out of what a public page shows."""

    strategy: str
    ram: str
    plan: str | None = optional()
    events: list[str]
    predicted_peak_bytes: int
    predicted_stage_bytes: dict[str, int]
    predicted_ram_bytes: int | None = optional()
    peak_rss_bytes: int | None = optional()
    peak_anon_rss_bytes: int | None = optional()  # Linux only
    peak_file_rss_bytes: int | None = optional()
    stage_peak_bytes: dict[str, int] | None = optional()  # CUDA only: measured
    peak_device_bytes: int | None = optional()


def memory_report(
    plan: Plan, strategy: str, events: list[str], device: torch.device, stage_peaks: dict[str, int], rss: RssPeaks
) -> MemoryReport:
    """The plan, what happened, and peaks: per stage on CUDA (measured), the planned peak and RSS everywhere.

    RSS in two kinds (Linux): anonymous (copies, activations: what RAM must hold) and file-backed (mapped weights:
    page cache the kernel may take back). The kernel keeps a peak of their sum only (peak_rss_bytes); the peaks of
    each kind are sampled at every move and stage end, so a peak inside a stage can be higher."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss.sample()
    cuda = device.type == "cuda"
    return MemoryReport(
        strategy=strategy,
        ram=plan.ram,
        plan=plan.reason,
        events=list(events),
        predicted_peak_bytes=plan.predicted_peak,
        predicted_stage_bytes=dict(plan.stages),
        predicted_ram_bytes=plan.ram_need,
        peak_rss_bytes=max_rss if sys.platform == "darwin" else max_rss * 1024,  # macOS counts bytes, Linux KiB
        peak_anon_rss_bytes=rss.anon or None,
        peak_file_rss_bytes=rss.file if rss.anon else None,
        stage_peak_bytes=dict(stage_peaks) if cuda else None,
        peak_device_bytes=max(stage_peaks.values(), default=0) if cuda else None,
    )
