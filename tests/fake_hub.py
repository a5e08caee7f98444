"""A small fake Hugging Face Hub on 127.0.0.1 for the real huggingface_hub client, real HTTP.

The fake answers the way huggingface.co does for what fluxdemo uses: HEAD/GET /{repo}/resolve/{rev}/{file} (regular
files answered directly with ETag + X-Repo-Commit, LFS files redirected to a "CDN" on another port with X-Linked-Etag
and X-Linked-Size), /api/models/{repo}/revision/{rev} and /api/models/{repo}/tree/{rev} for snapshot_download, and the
error headers (X-Error-Code: GatedRepo / RepoNotFound / EntryNotFound) that huggingface_hub turns into its errors.
`FILES` is its content: tests add repos with monkeypatch.setitem(fake_hub.FILES, ...). `LoraHub` adds a private repo
and revisions, `LyingHub` a file larger than listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import constants

GGUF_REPO = "city96/FLUX.1-dev-gguf"
GATED_REPO = "black-forest-labs/FLUX.1-dev"
LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
GRANTED_TOKEN = "hf_granted"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def safetensors_bytes(tensors: dict[str, int], *, truncate: int = 0) -> bytes:
    """A valid safetensors file of F32 vectors {name: length}, optionally cut short by `truncate` bytes."""
    header, offset = {}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = len(raw).to_bytes(8, "little") + raw + bytes(offset)
    return data[: len(data) - truncate]


GGUF = b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + b"tensor data"
FILES = {
    GGUF_REPO: {
        "flux1-dev-Q8_0.gguf": GGUF,
        "t5-v1_1-xxl-encoder-Q8_0.gguf": GGUF + b"t5",
        "not-a-gguf.gguf": b"<!DOCTYPE html><html>an error page saved as a model</html>",
        "big-Q8_0.gguf": GGUF + bytes(300_000),
    },
    GATED_REPO: {
        "text_encoder/model.safetensors": safetensors_bytes({"w": 4, "b": 2}),
        "vae/diffusion_pytorch_model.safetensors": safetensors_bytes({"w": 8}),
        "vae/truncated.safetensors": safetensors_bytes({"w": 8}, truncate=5),
        "tokenizer/vocab.json": b'{"a": 0}',
        "tokenizer/merges.txt": b"#version: 0.2\na b\n",
        "tokenizer_2/spiece.model": b"sentencepiece",
        "README.md": b"gated",
    },
}
GATED = {GATED_REPO}


def sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()  # git blob ids are sha1 (identity, not security)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith((".gguf", ".safetensors"))


class FakeHub:
    """Two loopback HTTP servers: the Hub and the CDN it redirects LFS downloads to. `requests` logs every call."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.auths: list[tuple[str, str | None]] = []  # (path, Authorization header) of every call
        self.blobs = {sha256(b): b for files in FILES.values() for b in files.values()}
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, self._route_hub))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, self._route_cdn))
        self.threads = [
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (self.hub, self.cdn)
        ]
        for t in self.threads:
            t.start()
        self.stopped = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def stop(self) -> None:
        if not self.stopped:
            for server in (self.hub, self.cdn):
                server.shutdown()
                server.server_close()
            for t in self.threads:
                t.join(timeout=5)
            self.stopped = True

    def _route_cdn(self, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        blob = self.blobs.get(path.removeprefix("/cdn/"))
        return (200, {}, blob) if blob is not None else (404, {}, b"")

    def _route_hub(self, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        resolve_ = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id = (api or resolve_).group(1) if (api or resolve_) else None
        if repo_id not in FILES:
            return hub_error(401, "RepoNotFound", "Repository not found")
        if repo_id in GATED and auth != f"Bearer {GRANTED_TOKEN}":
            if auth is None:
                return hub_error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
                    "access it. Please log in.",
                )
            return hub_error(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list. Visit "
                f"https://huggingface.co/{repo_id} to ask for access.",
            )
        files = FILES[repo_id]
        if api and api.group(2) == "revision":
            body = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": p} for p in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
        if api:
            tree = []
            for p, b in files.items():
                entry = {"type": "file", "path": p, "size": len(b), "oid": sha1(b)}
                if _is_lfs(p):
                    entry["lfs"] = {"oid": sha256(b), "size": len(b), "pointerSize": 134}
                tree.append(entry)
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        name = resolve_.group(3)
        if name not in files:
            return hub_error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha1(data)}"'}
        if _is_lfs(name):
            # like huggingface.co: LFS files redirect to a CDN, the real etag and size ride on X-Linked-* headers
            cdn = f"http://127.0.0.1:{self.cdn.server_address[1]}/cdn/{sha256(data)}"
            headers |= {"Location": cdn, "X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data))}
            return 302, headers, b""
        return 200, headers, data


def hub_error(status: int, code: str, message: str, extra: dict[str, str] | None = None):
    headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
    return status, headers | (extra or {}), json.dumps({"error": message}).encode()


def _handler(fake: FakeHub, route):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client must not hang the suite

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            fake.requests.append((self.command, path))
            fake.auths.append((path, self.headers.get("Authorization")))
            status, headers, body = route(path, self.headers.get("Authorization"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass  # keep the test output for failures

    return Handler


PRIVATE = "alice/private-lora"
CARD = b"---\nbase_model: black-forest-labs/FLUX.1-dev\ninstance_prompt: zkz style\nwidget:\n- text: a zkz fox\n---\n"


class LoraHub(FakeHub):
    """The fake Hub plus a private repo (without the granted token it is answered like a missing one) and revisions:
    every repo has the branch main, the tag v2 and its commit; any other revision is answered as the Hub does."""

    REVISIONS = {"main", "v2", COMMIT}
    REVISION = re.compile(r"/api/models/[^/]+/[^/]+/(?:revision|tree)/([^/]+)(?:/.*)?|/[^/]+/[^/]+/resolve/([^/]+)/.+")

    def _route_hub(self, path, auth):
        if f"/{PRIVATE}/" in path + "/" and auth != f"Bearer {GRANTED_TOKEN}":
            return hub_error(401, "RepositoryNotFound", "Repository not found")
        answer = super()._route_hub(path, auth)  # a missing, gated or private repo is refused before its revision
        revision = self.REVISION.fullmatch(path)
        if answer[0] < 400 and revision and (revision[1] or revision[2]) not in self.REVISIONS:
            return hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision[1] or revision[2]}")
        return answer


class LyingHub(LoraHub):
    """bob/liar's file is listed as 1,000 bytes and, with `served_lie`, announced so too; its CDN sends all of it."""

    served_lie = True

    def _route_hub(self, path, auth):
        status, headers, body = super()._route_hub(path, auth)
        if path.startswith("/api/models/bob/liar/tree/"):
            body = json.dumps(
                [e | {"size": 1000, "lfs": e["lfs"] | {"size": 1000}} for e in json.loads(body)]
            ).encode()
        elif path.startswith("/bob/liar/resolve/") and self.served_lie:
            headers = headers | {"X-Linked-Size": "1000"}
        return status, headers, body


def no_hub_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing of this machine's Hugging Face setup may leak in: no token, no offline flag, no login file."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
