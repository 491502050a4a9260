"""Malformed weight files are refused in one line, exit 1, from every command, before any work.

Each variant is a real file written with the `gguf` package or safetensors, then damaged where a
reader could be led astray: truncated anywhere, a length or count the file cannot hold, a tensor
whose type, rank or data lies outside what the format allows. `plan` and `generate` run in
process (typer's runner) on every one; neither may print more than one line or a traceback.
"""

import json
import struct

import gguf
import numpy as np
import pytest

from tests.test_quant import write_tiny_gguf

HUGE = 1 << 62


def _put(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    b[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


def gguf_variants(path) -> list[tuple[str, bytes]]:
    """Damaged copies of a valid GGUF file, each named by what was done to it."""
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    out = [("empty", b""), ("magic", b"GGUX" + data[4:]), ("version 1", _put(data, 4, "<I", 1)),
           ("1 KB", data[:1024]), ("23 bytes", data[:23]),
           ("2^62 tensors", _put(data, 8, "<Q", HUGE)), ("2^62 metadata items", _put(data, 16, "<Q", HUGE)),
           ("more tensors than declared infos", _put(data, 8, "<Q", len(reader.tensors) + 1))]
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        key_len = int(field.parts[0][0])
        out.append((f"{name}: 2^40-byte key", _put(data, field.offset, "<Q", 1 << 40)))
        out.append((f"{name}: unknown value type", _put(data, field.offset + 8 + key_len, "<I", 99)))
    data_end = 0
    for t in reader.tensors:
        off = t.field.offset
        name_len = len(t.name.encode())
        dims_at = off + 8 + name_len
        n_dims = int(struct.unpack_from("<I", data, dims_at)[0])
        type_at = dims_at + 4 + 8 * n_dims
        out.append((f"{t.name}: 9 dimensions", _put(data, dims_at, "<I", 9)))
        out.append((f"{t.name}: unknown type", _put(data, type_at, "<I", 999)))
        out.append((f"{t.name}: data past the end", _put(data, type_at + 4, "<Q", 1 << 50)))
        data_end = max(data_end, int(t.data_offset) + int(t.n_bytes))
    for cut in np.linspace(24, data_end - 1, 80).astype(int):
        out.append((f"cut at {cut} of {len(data)}", data[:cut]))
    return out


def safetensors_variants(path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    rng = np.random.default_rng(0)

    def with_header(h: dict) -> bytes:
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + n :]

    first = next(k for k in header if k != "__metadata__")
    out = [("empty", b""), ("7 bytes", data[:7]), ("header length 2^62", _put(data, 0, "<Q", HUGE)),
           ("header length past the file", _put(data, 0, "<Q", len(data))), ("not JSON", data[:8] + b"\xff" * n + data[8 + n :]),
           ("a JSON array", with_header([])),  # type: ignore[arg-type]
           ("offsets past the data", with_header({**header, first: {**header[first], "data_offsets": [0, 1 << 40]}})),
           ("wrong byte count", with_header({**header, first: {**header[first], "shape": [3, 3]}})),
           ("unknown dtype", with_header({**header, first: {**header[first], "dtype": "Q9"}})),
           ("no offsets", with_header({**header, first: {"dtype": "F32", "shape": [1]}}))]
    out += [(f"random bytes {i}", rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
            for i, size in enumerate([8, 64, 4096, 65536])]
    for cut in np.linspace(8, len(data) - 1, 40).astype(int):
        out.append((f"cut at {cut} of {len(data)}", data[:cut]))
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """[(label, model argument)] for every damaged GGUF and safetensors model."""
    from specmemo.models.synthetic import llama_config, save_random_model

    root = tmp_path_factory.mktemp("damaged")
    good_gguf = root / "good.gguf"
    write_tiny_gguf(good_gguf)
    good_dir = save_random_model(llama_config(96), root / "good")
    cases = []
    for i, (label, data) in enumerate(gguf_variants(good_gguf)):
        path = root / f"g{i}.gguf"
        path.write_bytes(data)
        cases.append((f"gguf {label}", str(path)))
    for i, (label, data) in enumerate(safetensors_variants(good_dir / "model.safetensors")):
        model = root / f"s{i}"
        model.mkdir()
        (model / "config.json").write_text((good_dir / "config.json").read_text())
        (model / "model.safetensors").write_bytes(data)
        cases.append((f"safetensors {label}", str(model)))
    return cases


def test_the_undamaged_files_read_and_every_variant_differs(tmp_path):
    from specmemo.models.gguf_file import GGUFFile
    from specmemo.models.safetensors_file import read_header
    from specmemo.models.synthetic import llama_config, save_random_model

    write_tiny_gguf(tmp_path / "good.gguf")
    assert len(GGUFFile(tmp_path / "good.gguf").tensors) == 20   # 9 per layer, the embedding, the final norm
    good = save_random_model(llama_config(96), tmp_path / "good")
    assert "lm_head.weight" in read_header(good / "model.safetensors")[0]
    originals = {"gguf": (tmp_path / "good.gguf").read_bytes(), "st": (good / "model.safetensors").read_bytes()}
    variants = [("gguf", d) for _, d in gguf_variants(tmp_path / "good.gguf")] + \
               [("st", d) for _, d in safetensors_variants(good / "model.safetensors")]
    assert len(variants) >= 200 and all(data != originals[kind] for kind, data in variants)


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_every_damaged_file_is_one_line_and_exit_1(cli, damaged, command):
    args = {"plan": ["--draft", "ngram"], "generate": ["--draft", "ngram", "--prompt", "Hi", "-m", "4"]}[command]
    failures = []
    for label, model in damaged:
        r = cli(command, "--target", model, *args)
        lines = r.stderr.strip().splitlines()
        if r.exit_code != 1 or len(lines) != 1 or "Traceback" in r.stderr or not lines[0].startswith("error: "):
            failures.append(f"{label}: exit {r.exit_code}, stderr {r.stderr.strip()[:200]!r}")
    assert failures == [], f"{len(failures)} of {len(damaged)}:\n" + "\n".join(failures[:20])
