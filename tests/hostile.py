"""Hostile files for the reliability tests: valid files, damaged the ways crafted files and broken downloads are.

Safetensors cases follow safetensors' own fuzzing (bit flips, truncations, lying header lengths, offsets that overlap
or leave gaps, huge shapes, non-UTF-8 and non-JSON headers) and add what our inspector reads beyond the layout:
metadata JSON (nesting bombs, regular expressions, numbers that overflow), NaN/Inf weights and alphas, and pickles
under a .safetensors name. GGUF cases rewrite the counts, dims, types, offsets and string lengths of a valid file's
header in place. Everything is deterministic from the generator passed in, so a failure names a case to rebuild.

The last section holds what must survive them, shared by the library and app tests: the hash of the transformer's
base weights, and the manager's state at rest (adapters, where each component is, how many bytes it holds).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import httpx
import torch
from helpers import HANG_S

# Numbers that break size arithmetic: signed/unsigned 32- and 64-bit edges, past float64's exact integers, huge.
EDGE_INTS = (0, 1, -1, 2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30)
JSON_BYTES = b'{}[]":,-+0123456789eE.\\ \x00\x7f\xff'


@dataclass(frozen=True)
class Case:
    """One hostile file: its bytes, and optionally a larger size it is extended to (sparse, so no disk is used)."""

    name: str
    data: bytes
    size: int = 0

    def write(self, path: Path) -> Path:
        with path.open("wb") as f:
            f.write(self.data)
            if self.size > len(self.data):
                f.truncate(self.size)
        return path


# --- safetensors --------------------------------------------------------------------------------------------------


def pack(header: object, data: bytes = b"") -> bytes:
    """A safetensors file from a header (any JSON value, or raw bytes) and a data section; nothing is checked."""
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(body)) + body + data


def unpack(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _with_header(blob: bytes, change: Callable[[dict], None]) -> bytes:
    header, data = unpack(blob)
    change(header)
    return pack(header, data)


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _set_values(blob: bytes, key_part: str, value: float) -> bytes:
    """The file with the first element of every tensor whose name contains key_part set to value (F32 data)."""
    header, data = unpack(blob)
    data = bytearray(data)
    for name in _tensors(header):
        if key_part in name:
            begin = header[name]["data_offsets"][0]
            data[begin : begin + 4] = struct.pack("<f", value)
    return pack(header, bytes(data))


def with_metadata(blob: bytes, drop: tuple[str, ...] = (), **entries: str) -> bytes:
    def change(h: dict) -> None:
        meta = h.setdefault("__metadata__", {})
        meta.update(entries)
        for key in drop:
            meta.pop(key, None)

    return _with_header(blob, change)


def _first_tensor(blob: bytes, **fields: object) -> bytes:
    return _with_header(blob, lambda h: h[_tensors(h)[0]].update(fields))


def _duplicate_first(blob: bytes) -> bytes:
    """The first tensor's name twice: a huge-shaped entry, then the real one (Python's json keeps the last, other
    parsers may keep the first; the layout check and the loader must not disagree)."""
    header, data = unpack(blob)
    name = _tensors(header)[0]
    fake = json.dumps({name: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}})[1:-1]
    real = json.dumps(header, separators=(",", ":"))
    return pack(("{" + fake + "," + real[1:]).encode(), data)


def _zero_size(shapes: dict[str, list[int]]) -> bytes:
    """Tensors of zero bytes (one dim 0) whose other dims are huge: a consistent layout that claims a giant matrix."""
    return pack({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()})


def _shift_offsets(blob: bytes, by: int) -> bytes:
    """The second tensor starts `by` bytes off its place: negative overlaps the first, positive leaves a gap."""

    def change(h: dict) -> None:
        second = h[sorted(_tensors(h), key=lambda k: h[k]["data_offsets"])[1]]
        second["data_offsets"] = [o + by for o in second["data_offsets"]]

    return _with_header(blob, change)


def _nest(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def malicious_pickle(canary: Path) -> bytes:
    """A protocol-0 pickle that, if ever unpickled, creates `canary` (the test checks the file never appears)."""
    return f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()


def torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, buffer)  # what a .pt LoRA renamed looks like
    return buffer.getvalue()


def structured_cases(peft: bytes, kohya: bytes, max_header_bytes: int, canary: Path) -> list[Case]:
    """Every named attack once, on the kit's PEFT file (it has lora_adapter_metadata) and kohya file (alphas)."""
    n = struct.unpack("<Q", peft[:8])[0]
    lora_b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    module = "transformer.transformer_blocks.0.attn.to_q"
    one_float = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    cases = [
        # the 8-byte header length
        Case("empty file", b""),
        Case("3 bytes", b"\x01\x02\x03"),
        Case("length field only", peft[:8]),
        *(Case(f"header length {v}", struct.pack("<Q", v) + peft[8:]) for v in (0, 1, 2, n - 1, n + 1)),
        *(Case(f"header length {v}", struct.pack("<Q", v) + peft[8:]) for v in (len(peft) - 8, len(peft) - 7)),
        *(Case(f"header length {v}", struct.pack("<Q", v) + peft[8:]) for v in (2**32, 2**63, 2**64 - 1)),
        Case(
            "header length one over the limit (sparse file that size)",
            struct.pack("<Q", max_header_bytes + 1) + b"{",
            size=max_header_bytes + 1 + 8 + 16,
        ),
        Case("header length at the limit, file far shorter", struct.pack("<Q", max_header_bytes) + peft[8:]),
        # header text
        Case("non-UTF-8 header", pack(b'{"\xff\xfe":1}')),
        Case("lone surrogate in a name", pack({"\ud800": one_float}, b"1234")),
        Case("UTF-8 BOM before the JSON", pack(b'\xef\xbb\xbf{"__metadata__":{}}')),
        *(Case(f"not JSON: {raw!r}", pack(raw)) for raw in (b"{", b'{"a":}', b"{} trailing", b"{'a': 1}")),
        *(Case(f"non-standard JSON: {raw!r}", pack(raw)) for raw in (b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1e999}')),
        *(Case(f"JSON but not an object: {raw!r}", pack(raw)) for raw in (b"[]", b'"x"', b"1", b"null")),
        Case("nesting bomb in the header", pack(_nest(100_000).encode())),
        Case("array nesting bomb in the header", pack(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        Case("empty header object", pack({})),
        Case("a 1 MB tensor name", pack({"transformer." + "a." * 500_000 + "lora_A.weight": one_float}, b"1234")),
        Case(
            "10000 zero-byte tensors",
            pack(
                {
                    f"{module}{i}.lora_A.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                    for i in range(10_000)
                }
            ),
        ),  # fmt: skip
        Case("duplicate tensor name, the first claiming a huge shape", _duplicate_first(peft)),
        # metadata
        *(
            Case(f"__metadata__ is {value!r}", _with_header(peft, lambda h, v=value: h.update(__metadata__=v)))
            for value in ([], "x", {"a": 1}, {"a": {"b": "c"}}, {"a": None})
        ),
        *(
            # without a trigger phrase, so that the tag counts are read for trigger words
            Case(
                f"ss_tag_frequency {value[:40]!r}",
                with_metadata(kohya, ("modelspec.trigger_phrase",), ss_tag_frequency=value),
            )
            for value in ('{"a": {"t": 1e400}}', '{"a": {"t": "x"}}', '{"a": 5}', "[1]", "null", _nest(50_000))
        ),
        *(
            Case(f"lora_adapter_metadata {value[:60]!r}", with_metadata(peft, lora_adapter_metadata=value))
            for value in (
                '{"transformer.lora_alpha": "x"}',
                '{"transformer.lora_alpha": [1]}',
                '{"transformer.lora_alpha": null}',
                '{"transformer.lora_alpha": 1e400}',
                '{"transformer.lora_alpha": 1e300}',
                '{"transformer.alpha_pattern": [1]}',
                '{"transformer.alpha_pattern": {"(": 1}}',
                '{"transformer.alpha_pattern": {"transformer_blocks.0.attn.to_q": "x"}}',
                # catastrophic backtracking: a regex engine needs ages to reject this against a module name
                '{"transformer.alpha_pattern": {"(.*)*x": 1}}',
                '{"transformer.alpha_pattern": {"(\\\\w|\\\\w)+x": 1}}',
                '{"transformer.use_rslora": "yes", "transformer.r": -1}',
                "[1, 2]",
                _nest(50_000),
            )
        ),
        Case("a 4 MB trigger phrase of commas", with_metadata(peft, **{"modelspec.trigger_phrase": "," * 4_000_000})),
        # one tensor entry
        *(
            Case(f"tensor entry {fields!r}", _first_tensor(peft, **fields))
            for fields in (
                {"dtype": "F128"},
                {"dtype": 3},
                {"dtype": None},
                {"shape": "4"},
                {"shape": [-1, 4]},
                {"shape": [4.0, 32]},
                {"shape": [True, 4, 32]},
                {"shape": [2**62, 2**62]},
                {"shape": [2**64, 0]},
                {"shape": [1] * 10_000 + [4, 32]},
                {"data_offsets": [-1, 511]},
                {"data_offsets": [512, 0]},
                {"data_offsets": [0, 2**70]},
                {"data_offsets": [0, 256, 512]},
                {"data_offsets": ["0", "512"]},
                {"dtype": "I32"},
                {"dtype": "BOOL", "shape": [4, 128]},
            )
        ),
        Case("tensor entry is a number", _with_header(peft, lambda h: h.update({_tensors(h)[0]: 5}))),
        Case("tensor entry is empty", _with_header(peft, lambda h: h.update({_tensors(h)[0]: {}}))),
        Case("offsets overlap", _shift_offsets(peft, -4)),
        Case("offsets leave a gap", _shift_offsets(peft, 4)),
        Case("16 bytes after the last tensor", peft + b"\x00" * 16),
        Case("data section missing", peft[: 8 + n]),
        Case(
            "rank 0 (zero-size factors)",
            _zero_size({f"{module}.lora_A.weight": [0, 32], f"{module}.lora_B.weight": [32, 0]}),
        ),  # fmt: skip
        Case(
            "zero-size factors claiming a 2**40 x 2**40 delta",
            _zero_size({f"{module}.lora_A.weight": [0, 2**40], f"{module}.lora_B.weight": [2**40, 0]}),
        ),  # fmt: skip
        Case(
            "zero-size LoKr factors claiming a huge delta",
            _zero_size({f"{module}.lokr_w1": [2**20, 0], f"{module}.lokr_w2": [0, 2**20]}),
        ),  # fmt: skip
        # values
        Case("NaN in lora_B", _set_values(peft, lora_b, float("nan"))),
        Case("+Inf in lora_A", _set_values(peft, lora_b.replace("lora_B", "lora_A"), float("inf"))),
        Case("largest float32 in every lora_B", _set_values(peft, "lora_B", 3.4e38)),
        *(Case(f"every kohya alpha {v}", _set_values(kohya, ".alpha", v)) for v in (float("nan"), float("inf"))),
        *(Case(f"every kohya alpha {v}", _set_values(kohya, ".alpha", v)) for v in (0.0, -4.0, 3.4e38)),
        # what the file really is
        Case("torch.save zip under a .safetensors name", torch_zip()),
        *(
            Case(f"pickle protocol {p}", pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=p))
            for p in range(pickle.HIGHEST_PROTOCOL + 1)
        ),
        Case("malicious pickle (os.system)", malicious_pickle(canary)),
        Case("malicious pickle behind a header length", struct.pack("<Q", 40) + malicious_pickle(canary)),
        Case("GGUF magic", b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16),
        Case("Git LFS pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"),
        Case("HTML error page", b"<!DOCTYPE html><html><body>404</body></html>"),
    ]
    return cases


def random_cases(bases: list[bytes], rng: random.Random, count: int) -> list[Case]:
    """count mutations of the base files: bit flips, byte splats in the header, truncations, edge numbers in the
    header, appended junk; in proportions that put most of them where the parsers are."""
    kinds = [(_bit_flips, 40), (_splat, 20), (_truncate, 10), (_edge_number, 20), (_append, 5), (_swap_bytes, 5)]
    cases = []
    for i in range(count):
        mutate = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        base = bases[i % len(bases)]
        name, data = mutate(base, rng)
        cases.append(Case(f"random {i}: {name}", data))
    return cases


def _header_end(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def _bit_flips(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(blob)
    # half the flips land in the length and header, which is small next to the data section
    end = _header_end(blob) if rng.random() < 0.5 else len(blob)
    positions = [rng.randrange(end) for _ in range(rng.randint(1, 8))]
    for p in positions:
        data[p] ^= 1 << rng.randrange(8)
    return f"bit flips at {positions}", bytes(data)


def _splat(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(blob)
    positions = [rng.randrange(8, _header_end(blob)) for _ in range(rng.randint(1, 4))]
    for p in positions:
        data[p] = rng.choice(JSON_BYTES)
    return f"JSON bytes splatted at {positions}", bytes(data)


def _truncate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    cut = rng.randrange(len(blob))
    return f"truncated to {cut} bytes", blob[:cut]


def _edge_number(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    header, data = unpack(blob)
    name = rng.choice(_tensors(header))
    field = rng.choice(["shape", "data_offsets"])
    values = header[name][field]
    if not values:
        values.append(0)
    i = rng.randrange(len(values))
    values[i] = rng.choice(EDGE_INTS) if rng.random() < 0.7 else values[i] + rng.choice((-4, -1, 1, 4))
    return f"{name} {field} -> {values}", pack(header, data)


def _append(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    junk = rng.randbytes(rng.choice((1, 7, 64, 4096)))
    return f"{len(junk)} junk bytes appended", blob + junk


def _swap_bytes(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(blob)
    a, b = rng.randrange(len(data)), rng.randrange(len(data))
    data[a], data[b] = data[b], data[a]
    return f"bytes {a} and {b} swapped", bytes(data)


# --- GGUF ---------------------------------------------------------------------------------------------------------


def _tensor_info(reader: gguf.GGUFReader, index: int) -> dict[str, int]:
    """Byte offsets of one tensor's n_dims, dims, type and data offset in the header."""
    t = reader.tensors[index]
    name_len = len(t.name.encode())
    n_dims_at = t.field.offset + 8 + name_len
    dims_at = n_dims_at + 4
    type_at = dims_at + 8 * len(t.shape)
    return {"n_dims": n_dims_at, "dims": dims_at, "type": type_at, "offset": type_at + 4}


def gguf_cases(path: Path, rng: random.Random, flips: int) -> list[Case]:
    """A valid GGUF with its header rewritten: huge counts, dims, string lengths; unknown types; far offsets."""
    valid = path.read_bytes()
    reader = gguf.GGUFReader(path)
    last = len(reader.tensors) - 1
    matrix = next(i for i, t in enumerate(reader.tensors) if len(t.shape) == 2)
    fused = next((i for i, t in enumerate(reader.tensors) if t.name.endswith("qkv.weight")), matrix)

    def put(offset: int, fmt: str, value: int) -> bytes:
        data = bytearray(valid)
        struct.pack_into(fmt, data, offset, value)
        return bytes(data)

    first, middle, two = _tensor_info(reader, 0), _tensor_info(reader, last // 2), _tensor_info(reader, matrix)
    rows = _tensor_info(reader, fused)
    arch = reader.fields["general.architecture"]
    cases = [
        Case("version 99", put(4, "<I", 99)),
        *(Case(f"tensor count {v}", put(8, "<Q", v)) for v in (2**40, 2**64 - 1, len(reader.tensors) + 1)),
        *(Case(f"metadata count {v}", put(16, "<Q", v)) for v in (2**40, 2**64 - 1)),
        Case("string length 2**62", put(arch.offset + 8 + len(b"general.architecture") + 4, "<Q", 2**62)),
        Case("metadata value type 99", put(arch.offset + 8 + len(b"general.architecture"), "<I", 99)),
        *(Case(f"n_dims {v}", put(first["n_dims"], "<I", v)) for v in (0, 5, 2**31)),
        Case("dim 2**40", put(first["dims"], "<Q", 2**40)),
        Case("dim 2**40 in the middle tensor", put(middle["dims"], "<Q", 2**40)),
        Case("dims 2**32 x 2**32 (product wraps to 0)", _two_dims(valid, two, 2**32, 2**32)),
        Case("dims 2**63 x 2 (product wraps to 0)", _two_dims(valid, two, 2**63, 2)),
        Case("dim 0", put(first["dims"], "<Q", 0)),
        # one row more (of a fused qkv where there is one): its data still lies inside the file, so the reader takes it
        Case("rows + 1", put(rows["dims"] + 8, "<Q", int(reader.tensors[fused].shape[1]) + 1)),
        *(Case(f"tensor type {v}", put(first["type"], "<I", v)) for v in (31, 999, 2**32 - 1)),
        *(Case(f"data offset {v}", put(middle["offset"], "<Q", v)) for v in (2**60, len(valid), 1)),
        *(Case(f"truncated to {c}", valid[:c]) for c in (4, 24, first["dims"], int(reader.data_offset) - 1)),
    ]
    header_end = int(reader.data_offset)
    for i in range(flips):
        data = bytearray(valid)
        positions = [rng.randrange(header_end) for _ in range(rng.randint(1, 4))]
        for p in positions:
            data[p] ^= 1 << rng.randrange(8)
        cases.append(Case(f"header bit flips {i} at {positions}", bytes(data)))
    return cases


def _two_dims(valid: bytes, info: dict[str, int], a: int, b: int) -> bytes:
    """A two-dimensional tensor's dims rewritten as [a, b]."""
    data = bytearray(valid)
    struct.pack_into("<QQ", data, info["dims"], a, b)
    return bytes(data)


# --- what must survive ------------------------------------------------------------------------------------------


def finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.numel())


def base_weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the base weights (packed GGUF bytes and dense ones), by name, leaving out LoRA layers: it must not
    change whatever adapters come and go (PEFT renames a wrapped weight "<module>.base_layer.weight")."""
    digest = hashlib.sha256()
    named = {n.replace(".base_layer.", "."): t for n, t in (*module.named_parameters(), *module.named_buffers())}
    for name in sorted(n for n in named if ".lora_" not in n):
        tensor = named[name].detach().as_subclass(torch.Tensor).cpu().contiguous()
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapters_on(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(adapters in the model's peft_config, adapters present in any LoRA layer) of one component."""
    in_layers = {name for m in module.modules() for name in (getattr(m, "lora_A", None) or {})}
    return sorted(getattr(module, "peft_config", None) or {}), sorted(in_layers)


def rest_state(manager) -> dict:
    """The manager between requests: what a fault must leave as it found (fluxdemo.pipeline.Model)."""
    from fluxdemo.model.loading import module_bytes

    components = sorted(manager.loaded())  # a strategy may drop a component between requests; never load one here
    return {
        "on_device": sorted(manager.on_device_now()),
        "loaded": sorted(lora.adapter for lora in manager.adapters.loaded()),
        "attached": {c: adapters_on(manager.get(c)) for c in ("transformer", "text_encoder") if c in components},
        "bytes": {c: module_bytes(manager.get(c)) for c in components},
        "device_bytes": torch.cuda.memory_allocated(manager.device) if manager.device.type == "cuda" else 0,
    }


def check_consistent(manager) -> None:
    """No adapter half-loaded: what the adapter cache holds is exactly what sits on the transformer (and, for LoRAs
    with a CLIP part, on the text encoder); every component is where the strategy keeps it at rest."""
    loaded = manager.adapters.loaded()
    expected = {
        "transformer": sorted(lora.adapter for lora in loaded),
        "text_encoder": sorted(lora.adapter for lora in loaded if lora.affects_text_encoder),
    }
    for component, names in expected.items():
        if component in manager.loaded():  # the disk strategy reattaches adapters when it reads the file again
            attached = adapters_on(manager.get(component))
            assert attached == (names, names), f"{component} adapters (config, layers) {attached} != loaded {names}"
    at_rest = sorted(manager.loaded()) if manager.strategy == "resident" else []
    assert sorted(manager.on_device_now()) == at_rest, f"on the device at rest: {manager.on_device_now()}"


# --- what a visitor can send the app: raw HTTP to gradio's queue ---------------------------------------------------


def fn_index(base_url: str, api_name: str) -> int:
    """The index of the event with this API name, as the page's /config lists it (what a browser reads)."""
    config = httpx.get(f"{base_url.rstrip('/')}/config", timeout=HANG_S).json()  # a hang guard
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def join_body(fn: int, data: list, session_hash: str) -> bytes:
    """A /gradio_api/queue/join body as raw JSON bytes: built once, so a 10 MB prompt is not rebuilt per request,
    and allowed to carry NaN and Infinity, which a JSON library refuses to write but a script can send."""
    return json.dumps({"data": data, "fn_index": fn, "session_hash": session_hash, "event_data": None}).encode()


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def join(http: httpx.Client, body: bytes | str) -> httpx.Response:
    """POST a raw body to gradio's queue, as JSON (a body without the content type is not read as JSON)."""
    return http.post("/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
