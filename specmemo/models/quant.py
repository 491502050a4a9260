"""Packed 4-bit weights for our decoder on a CPU: GGUF Q4_0/Q4_1 matrices kept 4-bit, run by
torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32; measured against dense fp32/bf16
by bench/q4_kernels.py).

The kernel's format: per output row n and group g of 32 inputs, w = (q − 8) · scale + zero with
q in 0..15. GGUF Q4_1 blocks hold w = q · d + m, so scale = d and zero = m + 8d; Q4_0 holds
w = (q − 8) · d, so zero = 0. Both map exactly (d and m are fp16 in the file; scale/zero are kept
in the activation dtype). Q8_0 and other types are dequantized (see models/load.load_gguf_q4).
The q8 format (q8_groups) is planned and measured for quality; the engine does not run it yet.
"""

import os

import numpy as np
import torch

GROUP = 32


class Int4Weight:
    """A matrix used as `x @ w` with x [..., in] -> [..., out], stored packed: packed [out, in/2]
    uint8 (the kernel's layout) and scale_zero [in/32, out, 2] in the activation dtype."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor):
        self.packed, self.scale_zero = packed, scale_zero
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.times(x)

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x @ self. Called directly in decoding: `x @ w` first fails in Tensor.__matmul__ and
        only then reaches __rmatmul__, 15-20 µs per product (a one-token step makes 120)."""
        if x.dim() == 2:
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, GROUP, self.scale_zero)
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed, GROUP,
                                              self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale_zero]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """[in, out] in fp32 (tests and quality checks): what the kernel multiplies by."""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return (eye @ self).float()

    @classmethod
    def from_q4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> "Int4Weight":
        """q [out, in] int32 in 0..15; scale, zero [out, in/32]: w = (q − 8)·scale + zero."""
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()   # [in/32, out, 2]
        return cls(packed, scale_zero)


class PackedHead:
    """The LM head, bf16, packed once into oneDNN's blocked layout: `x @ w` through torch's bf16
    matmul reorders the whole weight on every call, which cost a one-token step 3.6-4.3 ms for the
    default model's 49,152 × 576 head against 1.2 packed (and 2.3 for 8 rows: nearly flat), with
    bitwise the same products (bench/head_kernels.py; the device profile's packed_head). The
    packed layout cannot be indexed, so the head's rows (the embedding, when tied) come from
    `rows`: read from the model file on demand (FileRows)."""

    def __init__(self, weight: torch.Tensor, rows):
        """weight: the [E, V] operand (any layout); rows(ids [n]) -> [n, E] of the [V, E] matrix."""
        self.dtype = weight.dtype
        self.in_features, self.out_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), 1)
        self.rows = rows

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., E] -> [..., V]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [None], "")

    __rmatmul__ = times

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)


def packs_head(dtype: torch.dtype) -> bool:
    """Whether this machine packs a `dtype` head (the device profile measured it faster, and
    oneDNN runs bf16 here) and the packed product equals the plain one bit for bit on a probe."""
    from specmemo.budget.devices import load_device

    if dtype != torch.bfloat16 or not load_device("cpu").packed_head or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 96, generator=gen).to(dtype)                # [E, V]
        x = torch.randn(3, 64, generator=gen).to(dtype)
        return torch.equal(PackedHead(w, None).times(x), x @ w)
    except (RuntimeError, AttributeError):   # no bf16 oneDNN kernels on this CPU, or no such op in this torch
        return False


class FileRows:
    """Rows of a GGUF matrix read from the file when asked (os.pread, a few hundred bytes a token;
    nothing held, nothing mapped), dequantized as loading does: ids [n] -> [n, cols] in `dtype`."""

    def __init__(self, path, tensor, dtype: torch.dtype):
        import gguf

        self.fd = os.open(path, os.O_RDONLY)
        self.offset, self.row_bytes, self.cols = tensor.offset, tensor.row_bytes, tensor.shape[0]
        self.kind, self.dtype = gguf.GGMLQuantizationType(tensor.type_id), dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        import gguf

        raw = b"".join(os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes) for i in ids.tolist())
        values = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(-1, self.row_bytes), self.kind)
        return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(-1, self.cols)).to(self.dtype)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def q8_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """specmemo's q8 format, round to nearest: w [out, in] (in a multiple of 32) -> (q [out, in]
    uint8, scale, zero [out, in/32] fp16) with w ≈ q·scale + zero, each group of 32 inputs spread
    over its own range (scale and zero per group, as q4 holds them). 255 = 15·17 steps, so a group
    already on a 4-bit grid (a Q4_1 file's values) lands on that grid again, up to the fp16 rounding
    of its scale and zero; GGUF's Q8_0 (symmetric, scale only) re-rounds such values by up to half
    its step (bench/quant_quality.py measures both)."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = ((hi - lo) / 255).half(), lo.half()
    step = scale.float().masked_fill(scale == 0, 1.0)[..., None]      # a constant group is all zero-point
    q = ((g - zero.float()[..., None]) / step).round().clamp(0, 255).to(torch.uint8)
    return q.reshape(rows, cols), scale, zero


def q8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q, scale, zero) from q8_groups -> w [out, in] fp32."""
    rows, cols = q.shape
    g = q.float().reshape(rows, cols // GROUP, GROUP) * scale.float()[..., None] + zero.float()[..., None]
    return g.reshape(rows, cols)


def q4_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0/Q4_1 data [rows, cols/32 · block bytes] -> (q [rows, cols] int32 in 0..15,
    scale, zero [rows, cols/32] fp32) with w = (q − 8)·scale + zero."""
    import gguf

    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]   # bytes per block of 32
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, size)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    head = 4 if kind == "Q4_1" else 2
    qs = torch.from_numpy(blocks[..., head:].copy())                     # [rows, groups, 16] uint8
    # Element j of a block is the low nibble of byte j, element j + 16 the high nibble.
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols).to(torch.int32)
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return q, d, m + 8 * d
    return q, d, torch.zeros_like(d)


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation (its RoPE pairs adjacent dimensions;
    transformers' rotates halves): hf_weight = gguf_weight[rope_rows(...)]."""
    d = rows // heads
    return torch.arange(rows).reshape(heads, d // 2, 2).transpose(1, 2).reshape(-1)
