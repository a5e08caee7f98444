"""How the front splits a run into jobs for the replicas, and puts their reports back together as one.

A job is the images of one LoRA stack (at most `batch` of them, which may then share a transformer pass), so a
compare is two jobs that two free replicas make at once, and a grid's cells spread over every replica. The merged
report is experiments.run's own for the whole run, with each image's replica and each replica's model facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fluxdemo.pipeline.experiments import ImageSpec
from fluxdemo.pipeline.report import ReplicaReport, RunReport


@dataclass(frozen=True)
class Job:
    """Images for one replica: one stack's (stack_id routes it to a replica that holds that stack)."""

    specs: tuple[ImageSpec, ...]
    stack_id: str


def stack_id(active: Sequence) -> str:
    """The key Ray Serve's multiplexing routes on: each active LoRA's name and SHA-256, strengths left out (a
    strength changes in place); "base" for the base model."""
    return "+".join(f"{entry.name}@{entry.sha256[:16]}" for entry, _ in active) or "base"


def split(todo: Sequence[ImageSpec], resolved: dict, batch: int) -> list[Job]:
    """The images to make as jobs: grouped by stack, in the order asked, `batch` images a job."""
    groups: dict[str, list[ImageSpec]] = {}
    for spec in todo:
        groups.setdefault(stack_id(resolved[spec.stack].active), []).append(spec)
    return [
        Job(tuple(specs[i : i + batch]), key) for key, specs in groups.items() for i in range(0, len(specs), batch)
    ]


def merge(report: RunReport, parts: Sequence, replica_of: dict[str, str], seconds: float) -> RunReport:
    """The front's report for the whole run (experiments' own, with the front's reuses) completed by the parts
    the replicas made: which replica made each image (`replica_of`: label -> replica), their stages, batches and
    model facts."""
    images = {
        label: replace(image, replica=replica_of[label]) if label in replica_of else image
        for label, image in report.images.items()
    }
    replicas = {
        part.replica: ReplicaReport(
            images=list(part.report.images),
            model=part.report.model,
            strategy=part.report.strategy,
            memory=part.report.memory,
            seconds=part.report.seconds,
        )
        for part in parts
    }
    first = parts[0].report
    stages = [s for part in parts for s in part.report.reused if s.startswith("encode")]
    timeline = report.timeline + [
        replace(stage, name=f"{stage.name} [{part.replica}]") for part in parts for stage in part.report.timeline
    ]
    return replace(
        report,
        images=images,
        replicas=replicas,
        reused=list(dict.fromkeys(stages)) + [s for s in report.reused if not s.startswith("encode")],
        model=first.model,
        strategy=first.strategy,
        memory=first.memory,
        events=[event for part in parts for event in part.report.events],
        truncated_tokens=max(part.report.truncated_tokens for part in parts),
        timeline=timeline,
        batches=[labels for part in parts for labels in part.report.batches],
        seconds=seconds,
    )
