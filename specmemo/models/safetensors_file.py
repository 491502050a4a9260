"""A safetensors file's header, read and checked with plain file reads (no torch).

Layout: an 8-byte little-endian header length n, n bytes of JSON ({name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}), then the tensor data. Every length and
offset is checked against the file before anything is allocated from it.
"""

import json
import math
import struct
from pathlib import Path

MAX_HEADER = 100 << 20   # safetensors' own limit on the JSON header
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, byte offset where the data starts). Raises ValueError naming the file and what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    name = path.name

    def bad(what: str) -> ValueError:
        return ValueError(f"{name} is not a valid safetensors file: {what}")

    with path.open("rb") as f:
        if size < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of a header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"its header declares {n:,} bytes, but the file has {size - 8:,} after the length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON ({e.__class__.__name__.replace('JSONDecodeError', 'bad JSON')})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {key!r} has an unknown dtype {dtype!r}")
        if not 0 <= begin <= end <= data:
            raise bad(f"tensor {key!r} lies at bytes {begin:,}..{end:,} of {data:,} data bytes; is it truncated?")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {key!r} holds {end - begin:,} bytes, not the {math.prod(shape) * DTYPE_BYTES[dtype]:,} "
                      f"of its {dtype} shape {shape}")
    return header, 8 + n
