"""Reports as dataclasses that become JSON by one rule: Record.to_dict() (fluxdemo.pipeline.report, model.memory).

Fields are written in class order, nested dataclasses as objects, tuples as lists. A field made with optional() is
left out while it is None (a fact unknown on this machine, or one a public page hides); any other None is null.
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Any

_OPTIONAL = "optional"


def optional(**kwargs: Any) -> Any:
    """A field that defaults to None and is left out of to_dict() while None."""
    return field(default=None, metadata={_OPTIONAL: True}, **kwargs)


def plain(value: Any) -> Any:
    """`value` as JSON-able data: dataclasses (records or not) as dicts, sequences as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        present = ((f, getattr(value, f.name)) for f in fields(value))
        return {f.name: plain(v) for f, v in present if v is not None or not f.metadata.get(_OPTIONAL)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class Record:
    """A report dataclass's to_dict(): what the CLI writes, the studio shows and its API returns."""

    def to_dict(self) -> dict:
        return plain(self)
