"""Our decoder's weights from local safetensors, read with plain file reads straight into its
layout (no transformers module, no second copy of any matrix), and a transformers model's
weights made resident the same way.
"""

import math
from pathlib import Path

import torch

from specmemo.budget.devices import Kernels
from specmemo.errors import UnknownModel
from specmemo.models.gguf_file import read_into
from specmemo.models.llama import LlamaConfig, LlamaModel
from specmemo.models.safetensors_file import read_header

BLOCK_ROWS = 2048  # rows per read when transposing into place: a few MiB of scratch, never a whole matrix


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def safetensors_index(location: str) -> dict[str, tuple[Path, int, torch.dtype, list[int]]]:
    """name -> (file, byte offset, dtype, shape) for every tensor of a local safetensors checkpoint,
    from the files' JSON headers (a hub id or pickled weights: empty)."""
    index = {}
    path = Path(location)
    if not path.is_dir():
        return index
    for f in sorted(path.glob("*.safetensors")):
        try:
            header, start = read_header(f)
        except ValueError as e:
            raise UnknownModel(str(e)) from None
        for name, meta in header.items():
            if name != "__metadata__" and meta["dtype"] in _ST_DTYPES:
                index[name] = (f, start + meta["data_offsets"][0], _ST_DTYPES[meta["dtype"]], meta["shape"])
    return index


def _read_rows(entry, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of a tensor (all of a 1-D one) in the file's dtype, with plain file reads."""
    path, offset, file_dtype, shape = entry
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    out = torch.empty((r1 - r0, *shape[1:]) if len(shape) > 1 else shape, dtype=file_dtype)
    if out.numel():
        read_into(path, offset + r0 * row * out.element_size(), memoryview(out.view(torch.uint8).numpy()).cast("B"),
                  "a tensor")
    return out


def _read_tensor(entry, dtype: torch.dtype) -> torch.Tensor:
    """One tensor read with plain file reads: the page cache is not our resident memory, while
    pages of a memory-mapped file are, until the mapping closes (2× the weights at the peak)."""
    out = _read_rows(entry, 0, entry[3][0] if entry[3] else 1)
    return out if out.dtype == dtype else out.to(dtype)


@torch.no_grad()
def make_resident(model: torch.nn.Module, index: dict, dtype: torch.dtype) -> None:
    """transformers maps safetensors weights lazily from the file, so they would page in during
    the first forward and count as generation memory. Put each tensor in process memory now,
    read from the file where we know its place (else copied), floating-point parameters in
    `dtype` (buffers such as RoPE frequencies keep theirs); tied tensors stay tied."""
    copies: dict[int, torch.Tensor] = {}
    names: dict[int, list[str]] = {}  # a tied tensor has several names; the file holds one of them
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    for module in model.modules():
        tensors = [(t, True) for t in module.parameters(recurse=False)] + [(t, False) for t in module.buffers(recurse=False)]
        for t, is_param in tensors:
            if t is None:
                continue
            key = t.data_ptr()
            if key not in copies:
                to = dtype if is_param and t.is_floating_point() else t.dtype
                entry = next((index[n] for n in names.get(id(t), []) if n in index), None)
                fits = entry is not None and list(entry[3]) == list(t.shape)
                copies[key] = _read_tensor(entry, to) if fits else t.data.to(to, copy=True)
            t.data = copies[key]


def load_llama(location: str, config: dict, dtype: torch.dtype, device: str = "cpu",
               kernels: Kernels = Kernels()):
    """Our decoder (models/llama.py) with weights read from local safetensors straight into its
    layout: no transformers module, no second copy of any matrix."""
    index = safetensors_index(location)

    def nrows(name: str) -> int:
        if name not in index:
            raise UnknownModel(f"{location} lacks the tensor {name}")
        return index[name][3][0]

    def rows(name: str, r0: int, r1: int | None) -> torch.Tensor:
        return _read_rows(index[name], r0, nrows(name) if r1 is None else r1)

    model = _build_llama(config, rows, nrows, dtype, device, kernels)
    if torch.device(device).type == "cpu":
        _pack_for_onednn(model, index)
    return model


def _pack_for_onednn(model, index: dict) -> None:
    """bf16 on a CPU, where the device profile measured it faster: layer matrices and the LM head
    packed once for oneDNN (models/quant.PackedMatrix). The head's rows (the tied embedding's
    too) are then read from the safetensors file per token."""
    from specmemo.models.quant import FileRows, pack_head, pack_layers, packs

    if packs(model.dtype, "layers", model.kernels):
        pack_layers(model)
    if packs(model.dtype, "head", model.kernels):
        path, offset, file_dtype, shape = index["model.embed_tokens.weight" if model.cfg.tie_embeddings else "lm_head.weight"]
        pack_head(model, FileRows.dense(path, offset, file_dtype, shape[1], model.dtype))


def own_from_transformers(model: torch.nn.Module):
    """Our decoder with the weights of a transformers Llama-family model already in memory, on
    its device (random-weight models for GPU checks: no save and reload of gigabytes)."""
    state = model.state_dict()
    p = next(model.parameters())
    return _build_llama(model.config.to_dict(), lambda name, r0, r1: state[name][r0:r1],
                        lambda name: state[name].shape[0], p.dtype, p.device)


@torch.no_grad()
def _build_llama(config: dict, rows, nrows, dtype: torch.dtype, device, kernels: Kernels = Kernels()):
    """Allocate the decoder on `device` and fill it from rows(name, r0, r1) -> tensor (r1 None:
    to the end; nrows(name): its first dimension), transposing blocks of rows into place."""
    cfg = LlamaConfig.from_hf(config)
    model = LlamaModel(cfg, dtype, device, kernels=kernels)

    def fill(dest: torch.Tensor, name: str) -> None:
        dest.copy_(rows(name, 0, None))

    def fill_transposed(dest: torch.Tensor, name: str, col: int) -> int:
        """dest[:, col : col + n] = the [n, in] matrix `name` transposed; returns n."""
        n = nrows(name)
        for r0 in range(0, n, BLOCK_ROWS):
            r1 = min(n, r0 + BLOCK_ROWS)
            dest[:, col + r0 : col + r1].copy_(rows(name, r0, r1).t())
        return n

    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        fill(layer.attn_norm, pre + "input_layernorm.weight")
        fill(layer.mlp_norm, pre + "post_attention_layernorm.weight")
        col = 0
        for part in ("q", "k", "v"):
            n = fill_transposed(layer.w_qkv, f"{pre}self_attn.{part}_proj.weight", col)
            if layer.b_qkv is not None:
                fill(layer.b_qkv[col : col + n], f"{pre}self_attn.{part}_proj.bias")
            col += n
        if layer.q_norm is not None:
            fill(layer.q_norm, pre + "self_attn.q_norm.weight")
            fill(layer.k_norm, pre + "self_attn.k_norm.weight")
        fill_transposed(layer.w_o, pre + "self_attn.o_proj.weight", 0)
        fill_transposed(layer.w_gate_up, pre + "mlp.gate_proj.weight", 0)
        fill_transposed(layer.w_gate_up, pre + "mlp.up_proj.weight", cfg.intermediate_size)
        fill_transposed(layer.w_down, pre + "mlp.down_proj.weight", 0)
    fill(model.norm, "model.norm.weight")
    fill_transposed(model.embed, "model.embed_tokens.weight", 0)
    if not cfg.tie_embeddings:
        fill_transposed(model.head, "lm_head.weight", 0)
    return model
