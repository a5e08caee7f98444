"""How a LoRA is named: a Hub reference (user/repo, user/repo/file.safetensors, ...@revision, a huggingface.co URL) or
a name in the LoRA folder, with or without its .safetensors. Plain text rules, no I/O and no heavy imports, so that
the CLI can judge its --lora values before it imports torch."""

from __future__ import annotations

import re
from dataclasses import dataclass

LORA_SUFFIX = ".safetensors"
MAX_NAME_CHARS = 1000  # a repo id is at most 96 characters; a longer name is no Hub name and is never parsed

HUB_URL = re.compile(
    r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)"
    r"(?:/(?:blob|resolve|tree)/(?P<rev>[^/?#]+))?(?:/(?P<file>[^?#]+?))?/?(?:[?#].*)?"
)
HUB_NAME = re.compile(r"(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?P<file>(?:/[\w.\- ]+)*)(?:@(?P<rev>[\w.\-/]+))?")


@dataclass(frozen=True)
class HubLoraRef:
    """Where a LoRA lives on the Hub: a repo, optionally one file in it and a revision (branch, tag or commit)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return "".join(
            (self.repo_id, f"/{self.filename}" * bool(self.filename), f"@{self.revision}" * bool(self.revision))
        )


def parse_hub_lora(name: str) -> HubLoraRef | None:
    """A Hub reference in `name` (user/repo, user/repo/file.safetensors, user/repo@rev, or a huggingface.co URL),
    or None when `name` is not one. A two-part name ending in .safetensors is a local path, never a repo."""
    if len(name) > MAX_NAME_CHARS:
        return None
    m = HUB_URL.fullmatch(name.strip())
    if m:
        return HubLoraRef(m["repo"], m["file"] or None, m["rev"])
    m = HUB_NAME.fullmatch(name.strip())
    if m is None or m["repo"].lower().endswith(".safetensors") or m["repo"].startswith(".") or ".." in name:
        return None
    filename = m["file"].lstrip("/") or None
    if filename and not filename.lower().endswith(".safetensors"):
        return None
    return HubLoraRef(m["repo"], filename, m["rev"])
