"""Packed 4-bit weights for our decoder on a CPU: GGUF Q4_0/Q4_1 matrices kept 4-bit, run by
torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32; measured against dense fp32/bf16
by bench/q4_kernels.py).

The kernel's format: per output row n and group g of 32 inputs, w = (q − 8) · scale + zero with
q in 0..15. GGUF Q4_1 blocks hold w = q · d + m, so scale = d and zero = m + 8d; Q4_0 holds
w = (q − 8) · d, so zero = 0. Both map exactly (d and m are fp16 in the file; scale/zero are kept
in the activation dtype). Q8_0 and other types are dequantized (see models/load.load_gguf_q4).
"""

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
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed, GROUP,
                                              self.scale_zero)
        return y.reshape(*lead, self.out_features)

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
