"""What a LoRA file can make the app hold or show is bounded (issue 10): report size, metadata paths, folder quotas,
uploads that leave nothing behind, and a folder scan that never opens what is not a regular file."""

from __future__ import annotations

import json
import os
import tempfile
import threading

import lora_factory as lf
import pytest
import torch
from helpers import HANG_S
from lora_factory import CLIP, TINY, pairs_for

from fluxdemo.errors import LoraError
from fluxdemo.lora import (
    REPORT_MAX_ITEMS,
    LoraLibrary,
    bounded,
    check_upload_count,
    inspect_lora,
    paths_to_file_names,
    save_upload,
)
from fluxdemo.model.tiny_loras import write_lora


def test_a_huge_trigger_phrase_and_key_list_give_a_small_report(tmp_path):
    phrase = ", ".join(f"word{i}" for i in range(150_000))
    many = {f"junk.{i}.weight": torch.zeros(1) for i in range(2_181)}  # unmatched keys, and not LoRA keys at all
    path = write_lora(tmp_path / "big.safetensors", "kohya", pairs_for("kohya", TINY), TINY,
                      {"modelspec.trigger_phrase": phrase, "ss_training_comment": "x" * 1_000_000})  # fmt: skip
    big = lf.save(tmp_path / "big2.safetensors", lf.load(path) | many, {"modelspec.trigger_phrase": phrase})
    for p in (path, big):
        report = inspect_lora(p, TINY, clip_config=CLIP)
        data = json.dumps(report.to_dict())
        assert len(data) < 100_000, len(data)
        assert report.trigger_words[:2] == ["word0", "word1"] and len(report.trigger_words) == 12
    d = inspect_lora(big, TINY, clip_config=CLIP).to_dict()
    assert len(d["unmatched"]) == REPORT_MAX_ITEMS + 1 and d["unmatched"][-1] == "and 2,131 more"


def test_bounded_caps_every_list_dict_and_string():
    value = bounded({"s": "y" * 1000, "l": list(range(3000)), "d": {str(i): i for i in range(60)}})
    assert value["s"].endswith("... (700 more characters)") and len(value["s"]) < 330
    assert value["l"][-1] == "and 2,950 more" and len(value["d"]) == 51 and value["d"]["..."] == "and 10 more"


def test_paths_in_metadata_are_reduced_to_file_names(tmp_path):
    meta = {
        "ss_sd_model_name": "/home/alice/ComfyUI/models/unet/flux1-dev.safetensors",
        "ss_output_name": r"D:\training\out\my_lora",
        "ss_training_comment": "data in /srv/data/dogs/ at 1024/768, see https://example.com/a/b",
    }
    path = write_lora(tmp_path / "m.safetensors", "kohya", pairs_for("kohya", TINY), TINY, meta)
    report = inspect_lora(path, TINY, clip_config=CLIP)
    assert report.metadata["ss_sd_model_name"] == "flux1-dev.safetensors"
    assert report.metadata["ss_output_name"] == "my_lora"
    assert report.metadata["ss_training_comment"] == "data in dogs at 1024/768, see https://example.com/a/b"
    assert "alice" not in json.dumps(report.to_dict()) and paths_to_file_names("~/a/b.txt") == "b.txt"


def test_a_fifo_in_the_folder_is_skipped_without_being_opened(tmp_path):
    folder = tmp_path / "loras"
    write_lora(folder / "a.safetensors", "kohya", pairs_for("kohya", TINY), TINY)
    os.mkfifo(folder / "pipe.safetensors")
    result = []
    scan = threading.Thread(target=lambda: result.append(LoraLibrary(folder, TINY, CLIP).refresh()), daemon=True)
    scan.start()
    scan.join(HANG_S)  # a hang guard: a scan that blocks on the FIFO never ends
    assert result, "the folder scan blocked on the FIFO"
    assert [e.name for e in result[0]] == ["a.safetensors"]
    with pytest.raises(LoraError, match=r"pipe.safetensors is not a regular file \(a pipe, device or folder\)"):
        inspect_lora(folder / "pipe.safetensors", TINY, clip_config=CLIP)


def test_upload_quotas_and_no_stray_files(tmp_path):
    folder = tmp_path / "loras"
    temp_before = set(os.listdir(tempfile.gettempdir()))
    good = write_lora(tmp_path / "up", "kohya", pairs_for("kohya", TINY), TINY)
    size = good.stat().st_size
    save_upload(good, folder, "one.safetensors")
    other = write_lora(tmp_path / "up2", "peft", pairs_for("peft", TINY), TINY)
    with pytest.raises(LoraError, match=r"The LoRA folder already holds 1 LoRA files, its limit is 1; remove some"):
        save_upload(other, folder, "two.safetensors", max_files=1)
    with pytest.raises(LoraError, match=r"would take the LoRA folder past its 1e-06 GB limit"):
        save_upload(other, folder, "two.safetensors", max_folder_bytes=1000)
    with pytest.raises(LoraError, match=r"notes.safetensors is a text file .*, not a safetensors file at all"):
        save_upload(_text(tmp_path), folder, "t.safetensors")
    assert sorted(os.listdir(folder)) == ["one.safetensors"] and (folder / "one.safetensors").stat().st_size == size
    assert set(os.listdir(tempfile.gettempdir())) - temp_before == set()
    check_upload_count(4)
    with pytest.raises(LoraError, match=r"5 files in one upload; at most 4 at a time"):
        check_upload_count(5)


def _text(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("my notes about this LoRA " * 10)
    return path
