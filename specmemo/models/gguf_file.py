"""A GGUF file's metadata and tensor table, read with plain file reads.

gguf-py's GGUFReader memory-maps the file and builds a numpy array per metadata item (the
tokenizer's 49,152 tokens each become one): opening SmolLM2-135M's 92 MiB file cost 157 MiB of
resident memory. Here scalar metadata is kept, arrays are skipped (their length kept), and tensor
rows are read on demand, so loading holds little beyond the weights it builds.

Layout (GGUF v2/v3): magic, version u32, tensor count u64, metadata count u64; metadata items
(key string, value type u32, value); tensor infos (name, n_dims u32, dims u64…, type u32, offset
u64); tensor data from the next multiple of general.alignment (default 32).
"""

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # GGUF order: shape[0] is the contiguous (input) dimension
    type_id: int             # a gguf.GGMLQuantizationType value
    offset: int              # absolute byte offset of the data in the file

    @property
    def kind(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.type_id).name

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.type_id)]
        return self.shape[0] // block * size


class GGUFFile:
    """metadata: key -> scalar or string (arrays: ("array", length)); tensors: name -> GGUFTensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{self.path.name} is not a GGUF file")
            version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                raise ValueError(f"{self.path.name}: GGUF version {version} is too old")
            self.metadata = {}
            for _ in range(n_kv):
                key = self._string(f)
                self.metadata[key] = self._value(f, struct.unpack("<I", f.read(4))[0])
            infos = []
            for _ in range(n_tensors):
                name = self._string(f)
                (n_dims,) = struct.unpack("<I", f.read(4))
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                type_id, offset = struct.unpack("<IQ", f.read(12))
                infos.append((name, dims, type_id, offset))
            align = int(self.metadata.get("general.alignment", 32))
            start = -(-f.tell() // align) * align
        self.tensors = {n: GGUFTensor(n, tuple(int(d) for d in dims), t, start + o) for n, dims, t, o in infos}

    @staticmethod
    def _string(f) -> str:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", errors="replace")

    def _value(self, f, kind: int):
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
        if kind == _STRING:
            return self._string(f)
        if kind == _ARRAY:
            item, count = struct.unpack("<IQ", f.read(12))
            if item in _SCALARS:
                f.seek(count * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self._value(f, item)
            return ("array", count)
        raise ValueError(f"{self.path.name}: unknown metadata value type {kind}")

    def read_rows(self, tensor: GGUFTensor, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 as raw bytes [r1 − r0, row_bytes] (one file read, no mapping)."""
        buf = bytearray((r1 - r0) * tensor.row_bytes)
        read_into(self.path, tensor.offset + r0 * tensor.row_bytes, memoryview(buf), tensor.name)
        return np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, tensor.row_bytes)


def read_into(path: Path, offset: int, view: memoryview, what: str) -> None:
    """Fill `view` from `path` at `offset` with plain reads (no mapping: mapped pages would count
    as our resident memory until the mapping closes)."""
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path.name} ends inside {what}")
            got += n


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed header of a GGUF file, parsed once per process (resolving, choosing the dtype and
    loading all ask; the parse takes ~40 ms for SmolLM2's 49k-token vocabulary)."""
    path = Path(path).resolve()
    st = path.stat()
    return _open_cached(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)
