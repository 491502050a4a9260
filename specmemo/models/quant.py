"""Packed weights for our decoder on a CPU: GGUF Q4_0/Q4_1 matrices kept 4-bit, run by torch's
int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32; measured against dense fp32/bf16 by
bench/q4_kernels.py), and dense bf16 matrices packed once for oneDNN (PackedMatrix).

The kernel's format: per output row n and group g of 32 inputs, w = (q − 8) · scale + zero with
q in 0..15. GGUF Q4_1 blocks hold w = q · d + m, so scale = d and zero = m + 8d; Q4_0 holds
w = (q − 8) · d, so zero = 0. Both map exactly (d and m are fp16 in the file; scale/zero are kept
in the activation dtype). Q8_0 and other types are dequantized (see models/load_gguf.load_gguf_q4).
The q8 format (q8_groups) is planned and measured for quality; the engine does not run it yet.
"""

import os

import numpy as np
import torch

from specmemo.budget.devices import Kernels
from specmemo.models.exactness import KINDS, SPLIT_INPUTS, exact_on_probes
from specmemo.models.layout import dtype_name

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


class NativeQ4:
    """A q4 matrix multiplied by the compiled row-exact kernel (models/kernels/row_matmul.c: rows quantized
    to int16 per group of 32, exact integer dot products): nibbles [out, in/2] uint8 in the GGUF's
    order and dm [out, in/32, 2] fp16 (w = q·d + m, the file's own d and m: Q4_1 exactly, Q4_0 with
    m = −8d), 0.625 bytes a weight as Int4Weight. Where the device profile measured it faster for
    this CPU's class (`native_q4`): on the AVX2 host a pass over SmolLM2's layers took 12.2 ms at 1
    row and 29.7 at 6 against torch's int4 kernel's 16.8 and 45.2 (bench/row_matmul.py)."""

    compiled = True   # LlamaModel.products_path

    def __init__(self, nibbles: torch.Tensor, dm: torch.Tensor, kernel):
        self.nibbles, self.dm, self.kernel = nibbles, dm, kernel
        self.out_features, self.in_features = nibbles.shape[0], nibbles.shape[1] * 2

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] bf16."""
        return self.kernel.q4(x, self.nibbles, self.dm)

    __rmatmul__ = times

    def tensors(self) -> list[torch.Tensor]:
        return [self.nibbles, self.dm]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @classmethod
    def from_q4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kernel) -> "NativeQ4":
        """q [out, in] in 0..15; scale, zero [out, in/32] (q4_blocks' w = (q − 8)·scale + zero)."""
        out, n_in = q.shape
        halves = q.to(torch.uint8).reshape(out, n_in // GROUP, 2, GROUP // 2)
        nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out, n_in // 2).contiguous()
        dm = torch.stack([scale, zero - 8 * scale], dim=-1).half().contiguous()   # back to the file's fp16 d, m
        return cls(nibbles, dm, kernel)


class NativeHead:
    """A bf16 LM head [vocab, hidden] multiplied by the compiled row-exact kernel into fp32 logits
    (models/kernels/row_matmul.c), its rows (a tied embedding's) gathered in place. Where the device
    profile measured it faster (`native_head`): on the AVX2 host torch's bf16 product took 6.0 ms
    for one row and 32.9 for six, this 4.2 and 8.8 (bench/row_matmul.py)."""

    compiled = True

    def __init__(self, rows: torch.Tensor, kernel):
        """rows: [V, E] bf16, contiguous (the [E, V] operand's transpose)."""
        self.weight, self.kernel = rows.contiguous(), kernel
        self.dtype = rows.dtype
        self.out_features, self.in_features = rows.shape

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.bf16(x, self.weight)

    __rmatmul__ = times

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, ids.reshape(-1))

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)


def native_kernels(what: str, kernels: Kernels):
    """The compiled row-exact kernel where the device profile measured it faster for `what` ("q4":
    layer matrices, "head": a q4 model's bf16 LM head) on this CPU's class and it builds here, else None."""
    from specmemo.models.kernels import native

    if not (kernels.native_q4 if what == "q4" else kernels.native_head):
        return None
    return native.row_matmul()


class PackedMatrix:
    """A dense matrix (bf16 where measured) packed once into oneDNN's blocked layout (`x @ w`
    through torch's bf16 matmul reorders the whole weight on every call). For the default model's 49,152 × 576 LM head
    that reorder cost a one-token step 3.6-4.3 ms against 1.2 packed, with bitwise the same
    products (bench/head_kernels.py); over all of its layer matrices, one pass took 14.5 ms packed
    against 22.4 and stayed flat up to 8 rows (bench/q4_kernels.py; the device profile's
    packed_head and packed_layers). A matrix whose packed product does not round a row alike at
    every width is packed in pieces of inputs, added in a fixed order (as exactness.split_product).
    The packed layout cannot be indexed, so a head's rows (the embedding, when tied) come from
    `rows`: read from the model file on demand (FileRows)."""

    def __init__(self, weight: torch.Tensor, rows=None, pieces: int = 1):
        """weight: the [in, out] operand (any layout); rows(ids [n]) -> [n, in] of the [out, in]
        matrix; pieces: equal slices of the inputs, each packed and multiplied on its own."""
        self.dtype = weight.dtype
        self.in_features, self.out_features = weight.shape
        size = -(-self.in_features // pieces)
        self.spans = [(i, min(i + size, self.in_features)) for i in range(0, self.in_features, size)]
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(weight[a:b].t().contiguous(), 1) for a, b in self.spans]
        self.rows = rows

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if len(self.packed) == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed[0], None, "none", [None], "")
        out = None
        for (a, b), w in zip(self.spans, self.packed):
            part = torch.ops.mkldnn._linear_pointwise(x[..., a:b].contiguous(), w, None, "none", [None], "")
            out = part if out is None else out + part
        return out

    __rmatmul__ = times

    def tensors(self) -> list[torch.Tensor]:
        return list(self.packed)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)


class Int8Matrix:
    """A matrix held in int8, one bf16 scale per output, multiplied by torch's int8 kernel with bf16
    activations (`_weight_int8pack_mm`). For a draft head only, where the device profile measured
    it faster (`draft_head_weights`): its products need not round like anything, since verification
    decides what is kept. On the AVX2 host the head held 8.1 MB instead of fp32's 32.2 MB: 1.09 ms a
    step against 3.0 (bench/results/history/kernels_avx2_zen3_2026-11-28.txt)."""

    def __init__(self, weight: torch.Tensor):
        """weight: the [in, out] operand, any float dtype."""
        rows = weight.detach().float().t().contiguous()                                  # [out, in]
        scale = rows.abs().amax(1).clamp(min=1e-12) / 127
        self.q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)    # [out, in]
        self.scale = scale.to(torch.bfloat16)                                          # [out]
        self.dtype = torch.bfloat16
        self.in_features, self.out_features = weight.shape

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] bf16."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return torch._weight_int8pack_mm(flat, self.q, self.scale).reshape(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)


def draft_head_weights(kernels: Kernels) -> str:
    """What a draft head drafts in on this CPU: "bf16" packed where a bf16 head packs (packs), else
    "int8" where the device profile measured int8 faster for this CPU's class and the kernel runs,
    else "fp32" as trained. RunningHead.for_machine builds it so; `plan` counts it as
    Kernels.head_dtype, what these probes confirm on the machines the profile was measured on."""
    if packs(torch.bfloat16, "head", kernels):
        return "bf16"
    if kernels.draft_head_weights == "int8":
        try:
            probe = Int8Matrix(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)))
            probe.times(torch.ones(2, 64))
            return "int8"
        except (RuntimeError, AttributeError):   # no int8 kernel in this torch
            pass
    return "fp32"


def packs(dtype: torch.dtype, what: str, kernels: Kernels) -> bool:
    """Whether this machine packs a `dtype` model's `what` ("head": bf16 only, or "layers") for
    oneDNN: the device profile measured it faster, oneDNN runs that dtype here, and the packed
    product equals the plain one on a probe (bit for bit in half precision)."""
    wanted = kernels.packed_head and dtype == torch.bfloat16 if what == "head" else \
        dtype_name(dtype) in kernels.packed_layers
    if not wanted or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 96, generator=gen).to(dtype)                # [in, out]
        x = torch.randn(3, 64, generator=gen).to(dtype)
        got, want = PackedMatrix(w).times(x), x @ w
        # fp32: oneDNN and MKL may sum in other orders (fp32 verification is left to its precision)
        return torch.equal(got, want) if dtype != torch.float32 else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    except (RuntimeError, AttributeError):   # no bf16 oneDNN kernels on this CPU, or no such op in this torch
        return False


def pack_head(model, rows) -> None:
    """Put `model`'s LM head in place packed for oneDNN, its rows (and a tied embedding's) read
    through rows(ids) (FileRows), so the dense table is not held twice."""
    model.head = PackedMatrix(model.head, rows)
    if model.cfg.tie_embeddings:
        model.embed = model.head


def pack_layers(model) -> dict[str, int]:
    """Pack every layer matrix of `model` (our decoder on a CPU) for oneDNN, kind by kind. In half
    precision, where verification must round each row as that row alone (RowExact.exactness),
    only as the packed product does so on the model's own probe of layer 0's weights: whole, else
    in pieces of ≤ SPLIT_INPUTS inputs; a kind exact neither way stays dense. Returns kind ->
    pieces (0: left dense)."""
    chosen = {}
    for kind, attr in KINDS.items():
        w = getattr(model.layers[0], attr)
        options = [1] + ([-(-w.shape[0] // SPLIT_INPUTS)] if w.shape[0] > SPLIT_INPUTS else [])
        chosen[kind] = next((n for n in options if not model.row_exact_tokens or exact_on_probes(
            lambda x, p: p.times(x), PackedMatrix(w, pieces=n), model.dtype, model.device)), 0)
        if chosen[kind]:
            for layer in model.layers:
                setattr(layer, attr, PackedMatrix(getattr(layer, attr), pieces=chosen[kind]))
    return chosen


class FileRows:
    """Rows of a matrix read from its file when asked (os.pread, a few hundred bytes a token;
    nothing held, nothing mapped), decoded as loading does: ids [n] -> [n, cols] in `dtype`. A
    GGUF tensor (dequantized: `gguf`) or a safetensors one of a torch dtype (`dense`)."""

    def __init__(self, path, offset: int, row_bytes: int, cols: int, kind, dtype: torch.dtype):
        """kind: the file's torch dtype (dense rows), or a GGML quantization type."""
        self.fd = os.open(path, os.O_RDONLY)
        self.offset, self.row_bytes, self.cols, self.kind, self.dtype = offset, row_bytes, cols, kind, dtype

    @classmethod
    def gguf(cls, path, tensor, dtype: torch.dtype) -> "FileRows":
        import gguf

        return cls(path, tensor.offset, tensor.row_bytes, tensor.shape[0], gguf.GGMLQuantizationType(tensor.type_id),
                   dtype)

    @classmethod
    def dense(cls, path, offset: int, file_dtype: torch.dtype, cols: int, dtype: torch.dtype) -> "FileRows":
        return cls(path, offset, cols * file_dtype.itemsize, cols, file_dtype, dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        raw = b"".join(os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes) for i in ids.tolist())
        if not raw:
            return torch.empty(0, self.cols, dtype=self.dtype)
        if isinstance(self.kind, torch.dtype):
            return torch.frombuffer(bytearray(raw), dtype=self.kind).reshape(-1, self.cols).to(self.dtype)
        import gguf

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
