"""The typed run report: read by field, written as the JSON users always got (keys, order, what is left out)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from fluxdemo.lru import LRU
from fluxdemo.pipeline import GenerateOptions, LoraChoice, RunReport, compare, generate, grid
from fluxdemo.pipeline.limits import for_visitor
from fluxdemo.records import optional, plain

OPTS = GenerateOptions("a report", seed=7, steps=1, width=16, height=16)
TOP = ["options", "model", "images", "loras", "lora", "strengths", "text_encoder_lora", "truncated_tokens", "reused",
       "strategy", "events", "timeline", "seconds", "memory", "batches"]  # fmt: skip
SUMMARY = ["name", "sha256", "format", "rank", "alpha", "targets", "modules", "text_encoder", "trigger_words"]
HOST = {"plan", "peak_rss_bytes", "peak_anon_rss_bytes", "peak_file_rss_bytes", "predicted_ram_bytes"}


def test_a_compare_report_is_typed_and_writes_the_same_json_keys_in_order(manager, kit_lora) -> None:
    report = compare(manager, OPTS, kit_lora, 0.5).report
    assert isinstance(report, RunReport) and report.lora.strength == 0.5 and report.lora.name == kit_lora
    assert report.images["lora"].loras[0].sha256 == report.loras[0].sha256 and report.images["baseline"].loras == []
    data = json.loads(json.dumps(report.to_dict()))
    assert list(data) == TOP
    assert list(data["model"]) == [
        "preset",
        "transformer_quant",
        "t5_quant",
        "dtype",
        "device",
        "weights",
        "weights_reason",
        "compiled",
    ]
    assert data["model"]["compiled"] is False  # --compile off: no compile_setup sentence
    assert data["options"] == {"prompt": "a report", "seed": 7, "steps": 1, "guidance": 3.5, "width": 16,
                               "height": 16, "max_sequence_length": 512, "fast": False}  # fmt: skip
    assert list(data["images"]) == ["baseline", "lora"]
    assert list(data["images"]["lora"]) == ["options", "loras", "reused"]
    assert data["images"]["lora"]["loras"] == [{"name": kit_lora, "sha256": report.loras[0].sha256, "strength": 0.5}]
    assert list(data["loras"][0]) == SUMMARY and list(data["lora"]) == [*SUMMARY, "strength"]
    assert data["strengths"] == {"baseline": None, "lora": 0.5}
    assert list(data["timeline"][0]) == ["name", "seconds", "start", "detail"]
    memory = ["strategy", "ram", "plan", "events", "predicted_peak_bytes", "predicted_stage_bytes",
              "predicted_ram_bytes", "peak_rss_bytes", "peak_anon_rss_bytes", "peak_file_rss_bytes"]  # fmt: skip
    assert list(data["memory"]) == memory  # on a CPU under Linux: no device peaks
    assert data["batches"] == [["baseline"], ["lora"]]
    assert "fast" not in data and "skipped_steps" not in data["images"]["lora"]  # exact: tests/test_fast.py has fast


def test_a_report_without_a_lora_writes_null_and_a_visitor_sees_no_host_facts(manager) -> None:
    report = generate(manager, OPTS).report
    assert report.to_dict()["lora"] is None and report.to_dict()["loras"] == []
    public = for_visitor(report)
    assert set(report.to_dict()["memory"]) - set(public.to_dict()["memory"]) == HOST
    assert public.memory.strategy == report.memory.strategy and report.memory.plan  # the run's own report is kept


def test_a_grid_report_lists_its_cells_as_the_design_says(manager, kit_lora) -> None:
    report = grid(manager, OPTS, ["a report"], [1], [kit_lora], [0, 1]).report
    assert [c.loras for c in report.cells] == [[LoraChoice(kit_lora, 0.0)], [LoraChoice(kit_lora, 1.0)]]
    assert report.grid.rows == ["peft:1"] and report.grid.strengths == [0, 1]
    cells = replace(report, cells=[replace(c, file=f"{c.label}.png") for c in report.cells]).to_dict()["cells"]
    assert cells[1] == {"prompt": "a report", "seed": 1, "strength": 1, "row": 0, "column": 1,
                        "loras": [{"name": kit_lora, "strength": 1.0}], "label": "p1 seed 1 row 1 x1",
                        "file": "p1 seed 1 row 1 x1.png"}  # fmt: skip
    assert "file" not in report.to_dict()["cells"][0] and list(report.to_dict())[-2:] == ["cells", "grid"]


def test_an_optional_field_is_left_out_only_while_none() -> None:
    @dataclass(frozen=True)
    class Example:
        always: int | None
        sometimes: tuple | None = optional()

    assert plain(Example(None)) == {"always": None}
    assert plain(Example(1, (2, Example(3)))) == {"always": 1, "sometimes": [2, {"always": 3}]}


def test_the_lru_spares_what_it_is_told_and_returns_what_it_evicts() -> None:
    lru = LRU(2)
    assert lru.put("a", 1) == [] and lru.put("b", 2) == []
    assert lru.put("c", 3, spare={"a", "c"}) == [2] and lru.keys() == ["a", "c"]
    assert lru.put("d", 4, spare={"a", "c", "d"}) == [] and len(lru) == 3  # all spared: over its size until next put
    assert lru.put("e", 5) == [1, 3] and lru.items() == [("d", 4), ("e", 5)]
