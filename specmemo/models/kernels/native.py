"""Kernels specmemo compiles itself: C sources beside this file, built once per machine with the
system C compiler (`CC`, else cc) into the cache (SPECMEMO_CACHE, default ~/.cache/specmemo) under
a name keyed by the source, the flags, the compiler and the CPU, and loaded with ctypes. Where
there is no compiler or the build fails, `exact_attention()` returns None and the decoder keeps
its torch path; SPECMEMO_NATIVE=0 asks for that path outright.

exact_attention.c: half-precision verification rows attended as one-token steps attend, reading
each key once for all rows, KV heads split across torch's OpenMP threads (see that file, and
LlamaModel.attend). row_matmul.c: a q4 model's layer products and bf16 LM head with every row
rounding as that row alone, the weights read once for all rows, columns split across torch's
OpenMP threads (see that file, and models/quant.NativeQ4).
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from specmemo.atomic import atomic_write
from specmemo.budget.footprint import exact_attention_fits
from specmemo.host import c_compiler, cpu_flags
from specmemo.paths import cache_root

SOURCE = Path(__file__).with_name("exact_attention.c")
MATMUL_SOURCE = Path(__file__).with_name("row_matmul.c")
# -march=native: the vector width and FMA of the machine that runs it (the cache key holds the CPU).
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=gnu11", "-shared", "-fPIC"]
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float


def cache_dir() -> Path:
    return cache_root() / "kernels"


def build(source: Path, compiler: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    """The shared library for `source` (with `extra` flags), compiled now unless the cache has it.
    Raises RuntimeError with the compiler's first error line when it cannot be built."""
    cc = compiler or c_compiler()
    if not cc or not shutil.which(cc):
        raise RuntimeError(f"no C compiler found (tried {cc or 'CC, cc, gcc'}); set CC")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS + list(extra)), version, " ".join(sorted(cpu_flags()))]).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def compile_to(partial: str) -> None:
        try:
            done = subprocess.run([cc, *FLAGS, *extra, "-o", partial, str(source)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cc} took over 300 s to build {source.name}") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise RuntimeError(f"{cc} could not build {source.name}: {first}")

    atomic_write(target, compile_to)   # a concurrent build or a crash never leaves half a library
    return target


class ExactAttention:
    """attend_rows from exact_attention.c, with a work buffer kept across calls."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self.path = path
        self._attend = lib.attend_rows
        self._attend.restype = _I
        self._attend.argtypes = [_P, _L, _L, _L, _P, _P, _I, _L, _L, _P, _L, _L, _L, _L, _L, _L,
                                 _P, _P, _P, _F, _P]
        self._work_floats = lib.attention_work_floats
        self._work_floats.restype = _L
        self._work_floats.argtypes = [_L, _L, _L, _L]
        self._work = torch.empty(0)

    @staticmethod
    def reads(dtype: torch.dtype) -> bool:
        """Key/value dtypes the kernel reads in place (others are widened to fp32 first)."""
        return dtype in (torch.float32, torch.bfloat16)

    @staticmethod
    def fits(head_dim: int, rows: int, group: int) -> bool:
        """Shapes the kernel takes (budget.footprint.exact_attention_fits: the plan counts by them too)."""
        return exact_attention_fits(head_dim, rows, group)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: "Rows",
               scale: float) -> torch.Tensor:
        """q [B, H, R, D] (any float dtype; D contiguous) over keys/values [B, Hkv, S, D] (fp32 or
        bf16, each head's S rows contiguous: a store view) -> [B, R, H, D] fp32. Row r sees keys
        0..rows.prefix[r]-1 and rows.extra of its own (see exact_attention.c)."""
        B, H, R, D = q.shape
        Hkv, S = keys.shape[1], keys.shape[2]
        q = q.float()
        if q.stride(3) != 1:
            q = q.contiguous()
        if (keys.stride(2), keys.stride(3)) != (D, 1) or keys.stride() != values.stride() or keys.dtype != values.dtype:
            keys, values = keys.contiguous(), values.contiguous()
        need = self._work_floats(S, D, R, H // Hkv)
        if self._work.numel() < need:
            self._work = torch.empty(0)
            self._work = torch.empty(need + need // 4)   # room to grow with the context
        out = torch.empty(B, R, H, D)
        done = self._attend(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                            keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16),
                            keys.stride(0), keys.stride(1), out.data_ptr(), B, Hkv, H // Hkv, R, D, S,
                            rows.prefix.data_ptr(), rows.extra_at.data_ptr(), rows.extra.data_ptr(),
                            scale, self._work.data_ptr())
        if done != 0:
            raise ValueError(f"exact attention refused its inputs (code {done}): S={S}, rows={R}, head_dim={D}")
        return out


class Rows:
    """Which keys each of R query rows sees: keys 0..prefix[r]-1, then extra[extra_at[r]:extra_at[r+1]]
    (ascending). Built once per forward and shared by its layers."""

    def __init__(self, prefix: list[int], extras: list[list[int]]):
        self.prefix = torch.tensor(prefix, dtype=torch.int32)
        at = [0]
        for e in extras:
            at.append(at[-1] + len(e))
        self.extra_at = torch.tensor(at, dtype=torch.int32)
        self.extra = torch.tensor([k for e in extras for k in e] + [0], dtype=torch.int32)

    @classmethod
    def causal(cls, keys: int, n: int) -> "Rows":
        """The last n of `keys` positions, each seeing itself and every key before it."""
        return cls([keys - n + i + 1 for i in range(n)], [[] for _ in range(n)])

    @classmethod
    def tree(cls, prefix: int, paths: list[list[int]]) -> "Rows":
        """Candidate-tree nodes behind a committed prefix: node i sees the prefix and its path."""
        return cls([prefix] * len(paths), [[prefix + j for j in path] for path in paths])


class RowMatmul:
    """q4_matmul and bf16_matmul from row_matmul.c, with a work buffer kept across calls."""

    MAX_ROWS = 256   # rows one call takes (MAX_M there); more are multiplied in slices

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self.path = path
        self._q4, self._bf16 = lib.q4_matmul, lib.bf16_matmul
        self._q4.argtypes = [_P, _L, _L, _L, _P, _P, _P, _L, _P]   # x, M, K, N, nibbles, dm, y, ldy, work
        self._bf16.argtypes = [_P, _L, _L, _L, _P, _P, _L, _P]     # x, M, K, N, rows, y, ldy, work
        self._q4.restype = self._bf16.restype = _I
        self._work = torch.empty(0, dtype=torch.uint8)

    def _multiply(self, kernel, x: torch.Tensor, weights: tuple[torch.Tensor, ...], N: int,
                  dtype: torch.dtype) -> torch.Tensor:
        """x [..., K] -> [..., N] in `dtype` through `kernel` (its weight pointers: `weights`), in
        slices of ≤ MAX_ROWS rows. A decode step makes 121 products: kept to a few µs of Python each."""
        K = x.shape[-1]
        flat = x.reshape(-1, K)
        if flat.dtype != torch.bfloat16 or not flat.is_contiguous():
            flat = flat.to(torch.bfloat16).contiguous()
        M = flat.shape[0]
        # Work bytes of either kernel: bf16's rows in fp32 (4MK); q4's in int16 with two floats a
        # group and 8 of slack (2MK + MK/4 + 32).
        need = 4 * min(M, self.MAX_ROWS) * K + 32
        if self._work.numel() < need:
            self._work = torch.empty(0, dtype=torch.uint8)
            self._work = torch.empty(need, dtype=torch.uint8)
        y = torch.empty(M, N, dtype=dtype)
        pointers = [w.data_ptr() for w in weights]
        for r in range(0, M, self.MAX_ROWS):
            a, out = (flat, y) if M <= self.MAX_ROWS else (flat[r:r + self.MAX_ROWS], y[r:r + self.MAX_ROWS])
            if kernel(a.data_ptr(), a.shape[0], K, N, *pointers, out.data_ptr(), N, self._work.data_ptr()):
                raise ValueError(f"row_matmul refused its inputs: {a.shape[0]} x {K} -> {N}")
        return y.view(*x.shape[:-1], N)

    def q4(self, x: torch.Tensor, nibbles: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        """x [..., K] (bf16) @ a q4 matrix (nibbles [N, K/2] uint8, dm [N, K/32, 2] fp16) -> [..., N] bf16.
        Rows are quantized to 16 bits per group of 32 first (finer than the bf16 they come in) and
        multiplied in exact integer arithmetic."""
        if x.shape[-1] != 2 * nibbles.shape[1]:
            raise ValueError(f"row_matmul: {x.shape[-1]} inputs against a q4 matrix of {2 * nibbles.shape[1]}")
        return self._multiply(self._q4, x, (nibbles, dm), nibbles.shape[0], torch.bfloat16)

    def bf16(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [..., K] (bf16) @ rows.T (rows [N, K] bf16, contiguous) -> [..., N] fp32."""
        if x.shape[-1] != rows.shape[1]:
            raise ValueError(f"row_matmul: {x.shape[-1]} inputs against a [{rows.shape[0]}, {rows.shape[1]}] matrix")
        return self._multiply(self._bf16, x, (rows,), rows.shape[0], torch.float32)


@functools.cache
def row_matmul(source: Path = MATMUL_SOURCE) -> RowMatmul | None:
    """The compiled row-exact products (needs AVX2, FMA and F16C, and OpenMP), or None
    (SPECMEMO_NATIVE=0, no compiler, a failed build: `why_not()` says which). `source`: another
    version of row_matmul.c, built alike (bench/row_matmul.py --against)."""
    if os.environ.get("SPECMEMO_NATIVE", "1") == "0":
        _why.append("SPECMEMO_NATIVE=0")
        return None
    try:
        return RowMatmul(build(source, extra=("-fopenmp",)))
    except (RuntimeError, OSError) as e:
        _why.append(str(e))
        return None


@functools.cache
def exact_attention(source: Path = SOURCE) -> ExactAttention | None:
    """The compiled exact-attention kernel, or None (SPECMEMO_NATIVE=0, no compiler, a failed
    build: `why_not()` says which). `source`: another version of exact_attention.c, built alike
    (bench/cost_curve.py --against-attention)."""
    if os.environ.get("SPECMEMO_NATIVE", "1") == "0":
        _why.append("SPECMEMO_NATIVE=0")
        return None
    try:
        return ExactAttention(build(source, extra=("-fopenmp",)))   # KV heads across torch's threads
    except (RuntimeError, OSError):
        pass
    try:
        return ExactAttention(build(source))   # a compiler without OpenMP: one thread
    except (RuntimeError, OSError) as e:
        _why.append(str(e))
        return None


_why: list[str] = []


def why_not() -> str | None:
    """Why exact_attention() or row_matmul() returned None, if one did."""
    return _why[-1] if _why else None
