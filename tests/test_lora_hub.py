"""LoRAs named by a Hub repo id or URL, against the loopback fake Hub of tests/fake_hub.py (the real client):
found, size-checked, downloaded into the cache, inspected and applied like a local file; every failure a sentence."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import fake_hub as fh
import lora_factory as lf
import pytest
from helpers import open_client, tiny_model
from huggingface_hub import constants
from lora_factory import CLIP, TINY, pairs_for

from fluxdemo.errors import LoraError
from fluxdemo.lora import LoraLibrary
from fluxdemo.lora.hub import HubLoraRef, parse_hub_lora
from fluxdemo.model.tiny_loras import write_lora


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("hub-loras")
    files = {
        fmt: write_lora(d / f"{fmt}.safetensors", fmt, pairs_for(fmt, TINY, seed=i), TINY).read_bytes()
        for i, fmt in enumerate(("kohya", "peft"))
    }
    # no metadata, so no trigger words of its own: the model card's are used
    files["plain"] = lf.save(d / "plain.safetensors", lf.load(d / "kohya.safetensors")).read_bytes()
    return files


@pytest.fixture
def fake(tmp_path, monkeypatch, lora_bytes):
    fh.no_hub_setup(monkeypatch, tmp_path)
    full = fh.safetensors_bytes({"model.embed.weight": 64, "model.norm.weight": 8})
    repos = {
        "bob/style-lora": {"style.safetensors": lora_bytes["plain"], "README.md": fh.CARD, "preview.png": b"png"},
        "bob/two-loras": {"a.safetensors": lora_bytes["kohya"], "b.safetensors": lora_bytes["peft"]},
        "bob/lora-and-model": {"lora.safetensors": lora_bytes["peft"], "model.safetensors": full},
        "bob/a-model": {"model.safetensors": full},
        "bob/gated-lora": {"g.safetensors": lora_bytes["kohya"]},
        "bob/pickled-lora": {"lora.ckpt": b"a pickle", "README.md": fh.CARD},
        fh.PRIVATE: {"p.safetensors": lora_bytes["peft"]},
    }
    for repo, files in repos.items():
        monkeypatch.setitem(fh.FILES, repo, files)
    monkeypatch.setattr(fh, "GATED", fh.GATED | {"bob/gated-lora"})
    hub = fh.LoraHub()
    yield hub
    hub.stop()


@pytest.fixture
def library(fake, tmp_path) -> LoraLibrary:
    (tmp_path / "loras").mkdir()
    return LoraLibrary(tmp_path / "loras", TINY, CLIP, hub_endpoint=fake.endpoint, hub_cache=tmp_path / "hf")


@pytest.mark.parametrize(
    "name, ref",
    [
        ("bob/style-lora", HubLoraRef("bob/style-lora")),
        ("bob/style-lora/style.safetensors", HubLoraRef("bob/style-lora", "style.safetensors")),
        ("bob/style-lora@v1.0", HubLoraRef("bob/style-lora", None, "v1.0")),
        ("bob/style-lora/sub/x.safetensors@main", HubLoraRef("bob/style-lora", "sub/x.safetensors", "main")),
        ("https://huggingface.co/bob/style-lora", HubLoraRef("bob/style-lora")),
        (
            "https://huggingface.co/bob/style-lora/blob/main/style.safetensors",
            HubLoraRef("bob/style-lora", "style.safetensors", "main"),
        ),  # fmt: skip
        (
            "https://hf.co/bob/style-lora/resolve/abc123/style.safetensors?download=true",
            HubLoraRef("bob/style-lora", "style.safetensors", "abc123"),
        ),  # fmt: skip
        ("styles/b.safetensors", None),  # a local sub-folder path
        ("my_lora.safetensors", None),
        ("bob/repo/notes.txt", None),
        ("../etc/passwd", None),
    ],
)
def test_hub_names_are_parsed(name, ref):
    assert parse_hub_lora(name) == ref


def test_repo_id_downloads_inspects_and_takes_the_card_trigger_words(fake, library, lora_bytes):
    entry = library.get("bob/style-lora")
    assert entry.path.read_bytes() == lora_bytes["plain"] and entry.usable
    assert entry.report.name == "bob/style-lora/style.safetensors" and entry.report.trigger_words == ["zkz style"]
    assert ("GET", "/cdn/" + fh.sha256(lora_bytes["plain"])) in fake.requests
    assert not any("preview.png" in p for _, p in fake.requests)  # only what the LoRA needs
    # pinned: the branch is resolved once, then the listing, headers, file and card are all read at that commit
    assert [p for _, p in fake.requests if "/cdn/" not in p and fh.COMMIT not in p] == [
        "/api/models/bob/style-lora/revision/main"
    ]
    downloads = len(fake.requests)
    assert library.get("bob/style-lora") is entry and len(fake.requests) == downloads  # known: no Hub round trip
    assert library.get("https://huggingface.co/bob/style-lora/blob/main/style.safetensors").sha256 == entry.sha256


def test_revision_file_and_several_files(fake, library, lora_bytes):
    entry = library.get("bob/two-loras/b.safetensors@v2")
    assert entry.path.read_bytes() == lora_bytes["peft"]
    # the tag is resolved once, then everything is read at its commit
    assert ("GET", "/api/models/bob/two-loras/revision/v2") in fake.requests
    assert ("GET", f"/bob/two-loras/resolve/{fh.COMMIT}/b.safetensors") in fake.requests
    assert not any("/resolve/v2/" in p or "/tree/v2" in p for _, p in fake.requests)
    several = r"^bob/two-loras holds several LoRA files; name the one you want: bob/two-loras/a.safetensors \(.*\), "
    with pytest.raises(LoraError, match=several + r"bob/two-loras/b.safetensors"):
        library.get("bob/two-loras")
    assert library.get("bob/lora-and-model").path.read_bytes() == lora_bytes["peft"]  # the model file is passed over


@pytest.mark.parametrize(
    "name, message",
    [
        ("bob/nope", r"^There is no repository bob/nope on the Hub \(or it is private\)\. Check the name at https"),
        (fh.PRIVATE, r"^There is no repository alice/private-lora on the Hub \(or it is private\)\. Check the name"),
        ("bob/gated-lora", r"^bob/gated-lora is a gated repository, which this app does not open: accept its terms"),
        ("bob/a-model", r"^bob/a-model has no LoRA: none of its .safetensors files \(model.safetensors\) holds LoRA"),
        (
            "bob/style-lora/other.safetensors",
            r"^bob/style-lora has no file other.safetensors; its .safetensors files: "
            r"style.safetensors\.",
        ),  # fmt: skip
        ("bob/pickled-lora", r"^bob/pickled-lora holds no .safetensors file, so no LoRA this app can load\.$"),
        (
            "bob/style-lora@v3",
            r"^bob/style-lora has no revision 'v3' \(no branch, tag or commit of that name\); see its branches "
            r"and tags at https://huggingface.co/bob/style-lora/tree/main\.$",
        ),  # fmt: skip
        (
            "https://huggingface.co/bob/style-lora/blob/v3/style.safetensors",
            r"^bob/style-lora has no revision 'v3' \(no branch, tag or commit of that name\)",
        ),  # fmt: skip
    ],
    ids=[
        "no-repo",
        "private-no-token",
        "gated",
        "not-a-lora",
        "no-file",
        "no-safetensors",
        "no-revision",
        "no-revision-url",
    ],
)
def test_failures_are_sentences(library, name, message):
    with pytest.raises(LoraError, match=message):
        library.get(name)


def test_the_operators_token_is_never_sent_and_a_lora_token_is_opt_in(fake, library, monkeypatch, tmp_path):
    """HF_TOKEN and the login file are the operator's, for gated model files: a visitor's Hub name must not use them
    (they could list and apply the operator's private LoRAs), and no sentence may tell whether the server has one."""
    with pytest.raises(LoraError) as without:
        library.get(fh.PRIVATE)
    monkeypatch.setenv("HF_TOKEN", fh.GRANTED_TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(fh.GRANTED_TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    fake.auths.clear()
    with pytest.raises(LoraError) as with_token:
        library.get(fh.PRIVATE)
    assert str(with_token.value) == str(without.value)
    assert str(with_token.value).startswith("There is no repository alice/private-lora on the Hub (or it is private)")
    library.get("bob/style-lora")
    assert fake.auths and all(auth is None for _, auth in fake.auths)

    def lora_library(token):
        return LoraLibrary(library.folder, TINY, CLIP, hub_endpoint=fake.endpoint, hub_cache=tmp_path / "hub-loras",
                           hub_token=token)  # fmt: skip

    assert lora_library(fh.GRANTED_TOKEN).get(fh.PRIVATE).usable  # a token for LoRAs only, when the operator sets one
    with pytest.raises(LoraError) as wrong:
        lora_library("hf_wrong").get(fh.PRIVATE)
    assert str(wrong.value) == str(without.value)
    cdn = [auth for path, auth in fake.auths if path.startswith("/cdn/")]
    assert cdn and all(auth is None for auth in cdn)  # the LoRA token goes to the Hub, never on to its CDN


def test_too_big_and_offline_from_this_apps_own_cache(fake, library, monkeypatch, tmp_path, lora_bytes):
    library.hub_max_bytes = 1000
    with pytest.raises(
        LoraError, match=r"^bob/style-lora/style.safetensors is .* over the 1 kB limit for a LoRA; it is probably"
    ):
        library.get("bob/style-lora")
    assert not any(method == "HEAD" for method, _ in fake.requests)  # the listing's size refused it already
    library.hub_max_bytes = 2**30
    cached = library.get("bob/two-loras/a.safetensors")
    assert cached.path.is_relative_to(tmp_path / "hf") and cached.path.read_bytes() == lora_bytes["kohya"]
    library._hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake.requests.clear()
    assert library.get("bob/two-loras/a.safetensors").path == cached.path  # from the cache, named exactly
    with pytest.raises(LoraError) as offline:
        library.get("bob/style-lora")
    assert str(offline.value) == (
        "bob/style-lora is not among the Hub LoRAs this app downloaded before, and offline mode is on "
        "(HF_HUB_OFFLINE=1). Run it again with HF_HUB_OFFLINE=0 to fetch it (a LoRA named with its file, "
        "user/repo/file.safetensors, is then kept for offline use), or, on a machine that reaches the Hub, put the "
        "file in the LoRA folder: hf download bob/style-lora --include '*.safetensors' --local-dir LORA_FOLDER"
    )
    with pytest.raises(LoraError) as pinned:
        library.get("bob/style-lora/my style.safetensors@v1.0")
    assert str(pinned.value).endswith(
        "put the file in the LoRA folder: hf download bob/style-lora 'my style.safetensors' --revision v1.0 "
        "--local-dir LORA_FOLDER"
    )
    assert fake.requests == []


def test_the_default_cache_is_fluxdemos_not_huggingfaces(fake, tmp_path, monkeypatch):
    from fluxdemo.lora.hub import hub_lora_cache_dir

    monkeypatch.setenv("FLUXDEMO_CACHE", str(tmp_path / "fx"))
    assert hub_lora_cache_dir() == tmp_path / "fx" / "hub-loras"
    library = LoraLibrary(tmp_path / "loras", TINY, CLIP, hub_endpoint=fake.endpoint)
    assert library.get("bob/two-loras/a.safetensors").path.is_relative_to(tmp_path / "fx" / "hub-loras")


@contextmanager
def hanging_up() -> Iterator[tuple[str, list[int]]]:
    """A Hub that takes each connection and hangs up at once, as a dead network does: (its endpoint, connections)."""
    seen: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.05)
        done = threading.Event()

        def answer() -> None:
            while not done.is_set():
                with suppress(TimeoutError):
                    server.accept()[0].close()
                    seen.append(1)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
        finally:
            done.set()
            thread.join()


def test_an_unreachable_hub_is_one_request_and_the_cache_still_serves(fake, library, tmp_path, lora_bytes):
    """No network: huggingface_hub's listing would retry five times with back-off (23 s); one request says so."""
    cached = library.get("bob/two-loras/a.safetensors")
    with hanging_up() as (endpoint, connections):
        away = LoraLibrary(library.folder, TINY, CLIP, hub_endpoint=endpoint, hub_cache=tmp_path / "hf")
        assert away.get("bob/two-loras/a.safetensors").path.read_bytes() == lora_bytes["kohya"]
        assert cached.path.read_bytes() == lora_bytes["kohya"] and len(connections) == 1
        with pytest.raises(LoraError, match=r"^bob/style-lora is not among the Hub LoRAs this app downloaded before, "
                                            r"and the Hub could not be reached\. Try again once"):  # fmt: skip
            away.get("bob/style-lora")
        assert len(connections) == 2


def test_a_hub_lora_applies_like_the_same_file_in_the_folder(fake, tmp_path, tiny_kit, lora_bytes):
    from fluxdemo.pipeline import GenerateOptions, generate

    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(lora_bytes["plain"])
    options = GenerateOptions("a fox", seed=2, steps=2, width=32, height=32)
    manager = tiny_model(folder)
    manager.adapters.library.hub_endpoint, manager.adapters.library.hub_cache = fake.endpoint, tmp_path / "hf"
    local = generate(manager, options, "style.safetensors", 0.5).images["lora"]
    hub = generate(manager, options, "bob/style-lora", 0.5)
    assert hub.images["lora"].tobytes() == local.tobytes()
    assert generate(manager, options).images["baseline"].tobytes() != local.tobytes()


@pytest.fixture
def studio_url(fake, tmp_path, monkeypatch):
    """The studio over an empty LoRA folder, its Hub the fake one; the operator holds HF_TOKEN, as on a Space."""
    from fluxdemo.lora import HubLoras
    from fluxdemo.studio import build_studio

    monkeypatch.setenv("HF_TOKEN", fh.GRANTED_TOKEN)
    (tmp_path / "loras").mkdir()
    hub = HubLoras(endpoint=fake.endpoint, cache=tmp_path / "hub-loras")
    manager = tiny_model(tmp_path / "loras", hub_loras=hub)
    demo = build_studio(manager)
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_the_studio_takes_a_lora_from_the_hub(fake, studio_url):
    """The studio's Hub box (its /hub_lora endpoint): a repo id gives a LoRA to pick, compare with and stack; a repo
    without a LoRA gives its sentence; the operator's HF_TOKEN is never sent."""
    from gradio_client.exceptions import AppError

    client = open_client(studio_url)
    assert client.predict("https://huggingface.co/bob/style-lora", api_name="/hub_lora") == (
        "https://huggingface.co/bob/style-lora"
    )
    assert client.predict("bob/style-lora", api_name="/inspect_lora")["trigger_words"] == ["zkz style"]
    with pytest.raises(AppError, match=r"bob/a-model has no LoRA: none of its .safetensors files"):
        client.predict("bob/a-model", api_name="/hub_lora")
    _, report = client.predict("a zkz fox", "bob/style-lora:0.5", 1.0, 2, 2, 3.5, 32, 32, api_name="/compare")
    assert report["images"]["lora"]["loras"][0]["name"] == "bob/style-lora"
    assert report["images"]["lora"]["loras"][0]["strength"] == 0.5
    assert fake.auths and all(auth is None for _, auth in fake.auths)


def test_a_model_job_never_downloads_a_hub_lora(fake, studio_url):
    """From the API a Hub name must be fetched first (/hub_lora, or the page's own step before the job): the job
    is refused before it is queued, and nothing is requested from the Hub."""
    from gradio_client.exceptions import AppError, ValidationError

    client = open_client(studio_url)
    with pytest.raises(ValidationError, match=r"The Hub LoRA bob/style-lora is not downloaded yet: a model job never"):
        client.predict("a fox", "bob/style-lora", 1.0, 2, 2, 3.5, 32, 32, api_name="/compare")
    with pytest.raises(AppError, match=r"bob/style-lora is a Hub LoRA not downloaded yet"):
        client.predict("bob/style-lora", api_name="/inspect_lora")
    assert fake.requests == []


def test_a_grid_of_64_rows_of_hub_names_is_refused_before_any_request(fake, studio_url):
    from gradio_client.exceptions import ValidationError

    rows = "\n".join("+".join(f"u/{r}.{i}" for i in range(4)) for r in range(64))  # within the text limit
    pickers = ("", 1.0, "", 1.0, "", 1.0)
    with pytest.raises(ValidationError) as error:
        open_client(studio_url).predict("a fox", "", rows, "1", "1", 2, 3.5, 16, 16, "", 1.0, *pickers,
                                                  api_name="/grid")  # fmt: skip
    assert "One run can use at most 8 different LoRAs, but this one names 256: split it into smaller runs." in str(
        error.value
    )
    assert fake.requests == []


def test_hub_loras_can_be_turned_off_without_any_request(fake, tmp_path):
    off = LoraLibrary(tmp_path / "loras", TINY, CLIP, hub=False, hub_endpoint=fake.endpoint, hub_cache=tmp_path / "hf")
    with pytest.raises(LoraError, match=r"^LoRAs from the Hub are turned off on this app; put the .safetensors file"):
        off.get("bob/style-lora")
    with pytest.raises(LoraError, match=r"^LoRAs from the Hub are turned off"):
        off.prefetch(["bob/style-lora"])
    assert fake.requests == []


def _cached(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "refs")


def test_the_cache_keeps_its_quota_by_evicting_the_least_recently_used(fake, library, tmp_path, lora_bytes):
    library.hub_quota_bytes = len(lora_bytes["kohya"]) + len(lora_bytes["peft"]) + 100
    a = library.get("bob/two-loras/a.safetensors")
    b = library.get("bob/two-loras/b.safetensors")
    time.sleep(0.01)
    library.get("bob/two-loras/a.safetensors")  # used again: b is now the least recently used
    style = library.get("bob/style-lora")
    assert not b.path.exists() and a.path.exists() and style.path.exists()
    assert sum(p.stat().st_size for p in _cached(tmp_path / "hf")) <= library.hub_quota_bytes
    library.hub_quota_bytes = 1000
    with pytest.raises(LoraError, match=r"is .*, more than the 1 kB this app keeps for Hub LoRAs; put the file in"):
        library.get("bob/two-loras/b.safetensors")


@pytest.mark.parametrize("served_lie", [False, True], ids=["stopped-by-the-served-size", "stopped-while-counting"])
def test_a_file_larger_than_listed_is_stopped_and_leaves_nothing(fake, tmp_path, monkeypatch, lora_bytes, served_lie):
    monkeypatch.setitem(fh.FILES, "bob/liar", {"l.safetensors": lora_bytes["kohya"] + bytes(3 * 2**20)})
    liar = fh.LyingHub()
    liar.served_lie = served_lie
    library = LoraLibrary(tmp_path / "loras", TINY, CLIP, hub_endpoint=liar.endpoint, hub_cache=tmp_path / "hf",
                          hub_max_bytes=2**20)  # fmt: skip
    try:
        with pytest.raises(LoraError) as refused:
            library.get("bob/liar/l.safetensors")  # named: no header read before the download
    finally:
        liar.stop()
    if served_lie:
        assert str(refused.value).startswith(
            "bob/liar/l.safetensors sent more than the 1.05 MB limit for a LoRA; the download was"
        )
    else:
        assert re.match(r"bob/liar/l.safetensors is 3.\d+ MB, over the 1.05 MB limit", str(refused.value))
        assert not any(p.startswith("/cdn/") for _, p in liar.requests)  # refused before the download
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file()]


def test_files_that_fail_inspection_are_deleted(fake, library, monkeypatch, tmp_path):
    garbage = {f"g{i}.safetensors": bytes([i]) * 3000 for i in range(15)}
    garbage["bad-header.safetensors"] = fh.safetensors_bytes({"not.a.lora": 4})[:-3] + b"xyz" + bytes(900)
    monkeypatch.setitem(fh.FILES, "bob/garbage", garbage)
    hub = fh.LoraHub()
    library.hub_endpoint, library.hub_max_bytes, library.hub_quota_bytes = hub.endpoint, 4000, 10_000
    try:
        for name in garbage:
            with pytest.raises(
                LoraError, match=r"^bob/garbage/\S+ is not a usable safetensors file: .* It was deleted"
            ):
                library.get(f"bob/garbage/{name}")
    finally:
        hub.stop()
    assert _cached(tmp_path / "hf") == []


def test_listings_sentences_and_the_memo_are_bounded(fake, library, monkeypatch, lora_bytes):

    files = {f"f{i:04d}.bin": b"x" for i in range(1001)} | {"zz/lora.safetensors": lora_bytes["kohya"]}
    monkeypatch.setitem(fh.FILES, "bob/huge", files)
    hub = fh.LoraHub()
    library.hub_endpoint = hub.endpoint
    try:
        with pytest.raises(LoraError, match=r"^bob/huge holds more than 1,000 files; name the LoRA file: "
                                            r"bob/huge/file.safetensors\.$"):  # fmt: skip
            library.get("bob/huge")
        assert library.get("bob/huge/zz/lora.safetensors").usable  # past the listing's bound: the served size rules
        long = "bob/style-lora/" + "x" * 5_000_000 + ".safetensors"
        for name in (long, "x" * 5_000_000 + ".safetensors"):
            with pytest.raises(LoraError) as wrong:
                library.get(name)
            assert len(str(wrong.value)) < 1000
        monkeypatch.setattr(library._hub, "maxsize", 2)
        for name in ("bob/huge/zz/lora.safetensors", "bob/two-loras/a.safetensors", "bob/two-loras/b.safetensors"):
            library.get(name)
    finally:
        hub.stop()
    assert list(library._hub) == ["bob/two-loras/a.safetensors", "bob/two-loras/b.safetensors"]


def test_a_large_model_card_is_no_card_and_never_fetched(fake, library, monkeypatch, lora_bytes):
    from fluxdemo.untrusted import MAX_CARD_BYTES

    big = fh.CARD + b"\n" * MAX_CARD_BYTES
    monkeypatch.setitem(fh.FILES, "bob/big-card", {"s.safetensors": lora_bytes["plain"], "README.md": big})
    hub = fh.LoraHub()
    library.hub_endpoint = hub.endpoint
    try:
        assert library.get("bob/big-card").report.trigger_words == []
    finally:
        hub.stop()
    assert not any(p.endswith("README.md") for _, p in hub.requests)


def test_is_hub_name_and_prefetch_fetch_before_the_gpu_work(fake, library, lora_bytes):
    from fluxdemo.errors import CancelledError

    (library.folder / "local.safetensors").write_bytes(lora_bytes["kohya"])
    assert library.is_hub_name("bob/style-lora") and library.is_hub_name("https://huggingface.co/bob/style-lora")
    assert not library.is_hub_name("local.safetensors") and not library.is_hub_name("../x/y")
    assert fake.requests == []
    with pytest.raises(CancelledError):
        library.prefetch(["bob/style-lora"], cancelled=lambda: True)
    calls = iter(range(100))
    with pytest.raises(CancelledError):  # asked again between requests and chunks: cancelled part way
        library.prefetch(["bob/two-loras/b.safetensors"], cancelled=lambda: next(calls) >= 2)
    assert _cached(library.hub_cache) == []
    (entry,) = library.prefetch(["local.safetensors", "bob/style-lora"])
    assert entry.name == "bob/style-lora"
    fake.requests.clear()
    assert library.get("bob/style-lora") is entry and fake.requests == []


def test_a_redirect_off_the_cdn_is_not_followed(fake, library, monkeypatch):
    """The Hub may send a download on to its CDN, once; a further hop (to any other host) is never taken."""
    elsewhere = fh.FakeHub()

    class Bouncing(fh.LoraHub):
        def _route_cdn(self, path, auth):
            return 302, {"Location": f"{elsewhere.endpoint}/internal/secret"}, b""

    bouncing = Bouncing()
    library.hub_endpoint = bouncing.endpoint
    try:
        with pytest.raises(LoraError, match=r"^The Hub's download server sent bob/two-loras/a.safetensors on"):
            library.get("bob/two-loras/a.safetensors")
    finally:
        bouncing.stop()
        elsewhere.stop()
    assert elsewhere.requests == []
