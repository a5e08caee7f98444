"""A soak of the studio on a public link (issue 16): six visitors at once, each sending a fixed number of mixed
requests (compare, generate, a grid, an upload, a Hub LoRA fetched then compared, PNGs dropped for their settings)
and hostile ones (a Hub name never fetched, a Hub file larger than listed, a 3,000-newline card, 32 kB of A1111 text,
a 12,992x12,992 PNG bomb, a 52 MB zipped chunk), while a pinger asks /gradio_api/info. No wall-clock bound here: the
figures (ping latency, RSS, disk over a duration) are bench/soak.py's. This asserts what must hold however busy the
machine: every model result equals its solo run pixel for pixel, every hostile request gets its sentence, the pings
are answered, memory and the Hub cache stay bounded, and the app still answers afterwards.
"""

from __future__ import annotations

import tempfile

import helpers
import soak_mix as sm
from huggingface_hub import constants

CLIENTS = 6  # concurrent enough to mix requests on the shared model
# Each visitor starts at its own place in the mix of 13 kinds: six visitors of ten requests send every kind 3 to 9
# times, and 10 different model requests (soak_mix.soak numbers them so); the whole mix each sent only 7 different.
REQUESTS_EACH = 10
HUB_QUOTA = 400_000  # the three Hub LoRAs fit; the liar's 3 MB never does
RSS_GROWTH = 300 * 2**20


def test_mixed_visitors_at_once(app_manager, clean, lora_dir, tiny_kit, tmp_path, monkeypatch) -> None:
    """Each model result equals its solo run, each hostile request gets its sentence, and the app stays well."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the studio's run folders, measured apart
    kit_lora = tiny_kit / "loras" / "peft.safetensors"
    pngs = sm.hostile_pngs(tmp_path / "pngs")
    folders = {"hub_cache": tmp_path / "hub-loras", "gradio_cache": tmp_path / "gradio", "runs": tmp_path / "tmp",
               "lora_folder": lora_dir}  # fmt: skip
    with sm.fake_hub(tiny_kit / "loras") as hub:
        sm.use_hub(app_manager, hub.endpoint, folders["hub_cache"], HUB_QUOTA, helpers.MAX_UPLOAD)
        sm.use_hub(clean, hub.endpoint, tmp_path / "clean-hub", HUB_QUOTA, helpers.MAX_UPLOAD)
        with helpers.launched(app_manager, queue_size=64, public=True) as url:
            warm = sm.model_values("compare", 0)
            helpers.open_client(url, download_files=str(tmp_path)).predict(*warm, api_name="/compare")
            before = sm.footprint(folders)
            pinger = sm.Pinger(url)
            pinger.start()
            try:
                outcomes = sm.soak(url, CLIENTS, pngs, kit_lora, tmp_path / "downloads", requests_each=REQUESTS_EACH)
            finally:
                pinger.stop()
            after = sm.footprint(folders)
            client = helpers.open_client(url, download_files=str(tmp_path))
            last = client.predict(*warm, api_name="/compare")
            long_card = client.predict("soak/long-card", api_name="/inspect_lora")
        found = sm.problems(outcomes, clean, lora_dir, kit_lora)
        expected_last = sm.solo(clean, "compare", warm)

    assert len(outcomes) == CLIENTS * REQUESTS_EACH
    assert found == {"mixups": [], "unanswered": [], "errors": []}, found
    kinds = {o.kind for o in outcomes}
    assert kinds == set(sm.mix_of(hostile=True)), kinds
    ping = pinger.summary()
    assert ping["pings"] > 0 and ping["failures"] == {}, ping
    assert after["rss_bytes"] - before["rss_bytes"] < RSS_GROWTH, (before, after)
    assert 0 < after["hub_cache_bytes"] <= HUB_QUOTA, after
    assert after["lora_folder_bytes"] == before["lora_folder_bytes"], (before, after)  # uploads of a known file
    assert helpers.same(sm.served("compare", last), expected_last)
    assert long_card["name"] == "soak/long-card/lc.safetensors" and not long_card["problems"]  # 3,000-line card
