"""Our decoder from a Llama GGUF with its Q4_0/Q4_1 matrices kept packed (models/quant.py)."""

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from specmemo.budget.devices import Kernels
from specmemo.errors import UnknownModel
from specmemo.models.gguf_file import open_gguf
from specmemo.models.llama import LlamaConfig, LlamaModel
from specmemo.models.load_safetensors import BLOCK_ROWS
from specmemo.models.quant import (GROUP, FileRows, Int4Weight, NativeHead, NativeQ4, native_kernels, pack_head,
                                   packs, q4_blocks, rope_rows)
from specmemo.models.resolve import Q4_TYPES


@torch.no_grad()
def load_gguf_q4(gguf_path: str, config: dict, dtype: torch.dtype, kernels: Kernels = Kernels()):
    """Our decoder with a Llama GGUF's Q4_0/Q4_1 matrices kept packed (models/quant.py) and run
    by torch's int4 CPU kernel; activations, norms, the embedding and LM head in `dtype`. Other
    tensor types in a layer (Q8_0, K-quants, F16) are dequantized with one warning line. Tensors
    are read with file reads one at a time (the embedding in blocks of rows): the load peak stays
    near the packed weights."""

    f = open_gguf(gguf_path)
    arch = f.metadata.get("general.architecture")
    if arch != "llama":
        raise UnknownModel(f"{f.path.name}: packed q4 runs GGUF architecture 'llama', not {arch!r}; "
                           "use --dtype fp32 or bf16")
    cfg = LlamaConfig.from_hf(config)
    # The compiled row-exact kernel where measured faster on this CPU's class (models/kernels/row_matmul.c):
    # it takes bf16 activations, so only for a bf16-activation model.
    kernel = native_kernels("q4", kernels) if dtype == torch.bfloat16 else None
    head_kernel = native_kernels("head", kernels) if dtype == torch.bfloat16 else None
    model = LlamaModel(cfg, dtype, "cpu", kernels=kernels)  # dense buffers stay untouched (never resident) and are replaced
    unpacked: set[str] = set()  # tensor types of layer matrices that could not run packed

    def entry(name: str):
        if name not in f.tensors:
            raise UnknownModel(f"{f.path.name} lacks the tensor {name}")
        return f.tensors[name]

    def rows_f32(t, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of a tensor as float32 [r1 − r0, cols]."""
        try:
            values = gguf.quants.dequantize(f.read_rows(t, r0, r1), gguf.GGMLQuantizationType(t.type_id))
        except NotImplementedError:
            raise UnknownModel(f"{f.path.name}: tensor {t.name} has type {t.kind}, which specmemo cannot load") from None
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(r1 - r0, t.shape[0])

    def vector(name: str) -> torch.Tensor:
        t = entry(name)
        return rows_f32(t, 0, 1)[0].to(dtype)

    def matrix(name: str, heads: int | None = None):
        """Q4 data as (q, scale, zero) rows [out, ...]; anything else dense [out, in] fp32.
        heads: undo llama.cpp's Q/K row permutation."""
        t = entry(name)
        cols, rows = t.shape
        perm = rope_rows(rows, heads) if heads else slice(None)
        if t.kind in Q4_TYPES:
            return tuple(part[perm] for part in q4_blocks(f.read_rows(t, 0, rows), t.kind, rows, cols))
        unpacked.add(t.kind)
        return rows_f32(t, 0, rows)[perm]

    def fused(*parts):
        """[in, out] for `x @ w`, the parts' outputs side by side: packed when all are Q4 (they are
        packed together: the kernel's layout tiles rows, so packed matrices do not concatenate)."""
        if all(isinstance(p, tuple) for p in parts):
            q, scale, zero = (torch.cat(x) for x in zip(*parts))
            return NativeQ4.from_q4(q, scale, zero, kernel) if kernel else Int4Weight.from_q4(q, scale, zero, dtype)
        dense = [(p[0] - 8) * p[1].repeat_interleave(GROUP, 1) + p[2].repeat_interleave(GROUP, 1)
                 if isinstance(p, tuple) else p for p in parts]
        return model.place(torch.cat(dense))

    def transposed(name: str) -> torch.Tensor:
        """[rows, cols] in the file -> the [cols, rows] operand in `dtype` (model.matrix's
        layout), BLOCK_ROWS rows at a time (an embedding is the largest tensor: never whole in fp32)."""
        t = entry(name)
        cols, rows = t.shape
        out = model.matrix(cols, rows)
        for r0 in range(0, rows, BLOCK_ROWS):
            r1 = min(rows, r0 + BLOCK_ROWS)
            out[:, r0:r1].copy_(rows_f32(t, r0, r1).t())
        return out

    # On stderr: stdout carries generate's text or JSON.
    console = Console(stderr=True)
    # Only on a terminal: elsewhere rich leaves a blank line where the bar was.
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"loading {f.path.name} packed", total=cfg.num_layers)
        for i, layer in enumerate(model.layers):
            pre = f"blk.{i}."
            layer.attn_norm = vector(pre + "attn_norm.weight")
            layer.mlp_norm = vector(pre + "ffn_norm.weight")
            layer.w_qkv = fused(matrix(pre + "attn_q.weight", cfg.num_heads),
                                matrix(pre + "attn_k.weight", cfg.num_kv_heads), matrix(pre + "attn_v.weight"))
            layer.w_o = fused(matrix(pre + "attn_output.weight"))
            layer.w_gate_up = fused(matrix(pre + "ffn_gate.weight"), matrix(pre + "ffn_up.weight"))
            layer.w_down = fused(matrix(pre + "ffn_down.weight"))
            progress.advance(task)
    model.norm = vector("output_norm.weight")
    model.embed = transposed("token_embd.weight")                                 # [E, V] operand
    model.head = model.embed if cfg.tie_embeddings else transposed("output.weight")
    if head_kernel and isinstance(model.head, torch.Tensor):   # [V, E] rows: the operand's storage when out-major
        model.head = NativeHead(model.head.t(), head_kernel)
        if cfg.tie_embeddings:
            model.embed = model.head
        # (an untied embedding stays a tensor: only the head's product is the kernel's)
    elif packs(dtype, "head", kernels):   # packed for oneDNN; its rows (the tied embedding's too) read from the file
        pack_head(model, FileRows.gguf(f.path, entry("token_embd.weight" if cfg.tie_embeddings else "output.weight"),
                                       dtype))
    if unpacked:
        import sys

        sys.stderr.write(f"warning: {f.path.name}: {', '.join(sorted(unpacked))} layer matrices are not run "
                         f"packed; dequantized to {str(dtype).split('.')[-1]}\n")
    return model
