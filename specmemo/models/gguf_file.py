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


MAX_DIMS = 4           # GGML_MAX_DIMS
MAX_STRING = 1 << 26   # a key or string value past 64 MiB is a corrupt length, not text


class _Bounded:
    """Reads from a file that never reads past its end or allocates what the file cannot hold:
    every length and count is checked against the bytes left before it is used."""

    def __init__(self, f, size: int, name: str):
        self.f, self.size, self.name = f, size, name

    def left(self) -> int:
        return self.size - self.f.tell()

    def bad(self, what: str) -> ValueError:
        return ValueError(f"{self.name} is not a valid GGUF file: {what} (at byte {self.f.tell()} of {self.size})")

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.bad(f"{what} of {n:,} bytes runs past the end of the file")
        return self.f.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """A declared count of items of at least item_bytes each, checked against the bytes left."""
        if n * item_bytes > self.left():
            raise self.bad(f"it declares {n:,} {what}, more than the file can hold")
        return n

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", f"the length of {what}")
        if n > MAX_STRING:
            raise self.bad(f"{what} declares a length of {n:,} bytes")
        return self.take(n, what).decode("utf-8", errors="replace")


class GGUFFile:
    """metadata: key -> scalar or string (arrays: ("array", length)); tensors: name -> GGUFTensor.
    A malformed file (truncated, a length or count the file cannot hold, a tensor whose data lies
    outside it) raises ValueError naming the file and what is wrong, before anything is allocated
    from its declarations."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            r = _Bounded(f, size, self.path.name)
            if size < 24 or f.read(4) != b"GGUF":
                raise ValueError(f"{self.path.name} is not a GGUF file" + (" (it is shorter than a GGUF header)"
                                                                            if size < 24 else ""))
            version, n_tensors, n_kv = r.unpack("<IQQ", "the header")
            if version < 2:
                raise ValueError(f"{self.path.name}: GGUF version {version} is too old")
            self.metadata = {}
            for _ in range(r.count(n_kv, 12, "metadata items")):     # a key length and a value type at least
                key = r.string("a metadata key")
                self.metadata[key] = self._value(r, r.unpack("<I", f"the type of {key}")[0], key)
            infos = []
            for _ in range(r.count(n_tensors, 24, "tensors")):       # name length, dims count, type, offset
                name = r.string("a tensor name")
                (n_dims,) = r.unpack("<I", f"the dimensions of {name}")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise r.bad(f"tensor {name} declares {n_dims} dimensions")
                dims = r.unpack(f"<{n_dims}Q", f"the shape of {name}")
                type_id, offset = r.unpack("<IQ", f"the type and offset of {name}")
                if type_id not in set(t.value for t in gguf.GGMLQuantizationType):
                    raise r.bad(f"tensor {name} has an unknown type {type_id}")
                infos.append((name, dims, type_id, offset))
            align = self.metadata.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise r.bad(f"general.alignment is {align!r}, not a power of two")
            start = -(-f.tell() // align) * align
        self.tensors = {n: GGUFTensor(n, tuple(int(d) for d in dims), t, start + o) for n, dims, t, o in infos}
        for t in self.tensors.values():
            self._check_extent(t, size)

    def _check_extent(self, t: GGUFTensor, size: int) -> None:
        import gguf

        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type_id)]
        if any(d == 0 for d in t.shape) or t.shape[0] % block:
            raise ValueError(f"{self.path.name} is not a valid GGUF file: tensor {t.name} has shape {list(t.shape)}, "
                             f"which its type {t.kind} cannot hold (rows of whole {block}-value blocks)")
        nbytes = t.rows * (t.shape[0] // block) * block_bytes
        if t.offset + nbytes > size:
            raise ValueError(f"{self.path.name} is not a valid GGUF file: tensor {t.name} ({nbytes:,} bytes at "
                             f"{t.offset:,}) lies past the end of the file ({size:,} bytes); is it truncated?")

    def _value(self, r: _Bounded, kind: int, key: str, depth: int = 0):
        if kind in _SCALARS:
            return r.unpack(_SCALARS[kind], f"the value of {key}")[0]
        if kind == _STRING:
            return r.string(f"the value of {key}")
        if kind == _ARRAY and depth < MAX_DIMS:
            item, count = r.unpack("<IQ", f"the array header of {key}")
            if item in _SCALARS:
                n = r.count(count, struct.calcsize(_SCALARS[item]), f"items in {key}")
                r.f.seek(n * struct.calcsize(_SCALARS[item]), 1)
            elif item in (_STRING, _ARRAY):
                for _ in range(r.count(count, 8, f"items in {key}")):
                    self._value(r, item, key, depth + 1)
            else:
                raise r.bad(f"{key} is an array of an unknown type {item}")
            return ("array", count)
        raise r.bad(f"{key} has an unknown value type {kind}")

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
