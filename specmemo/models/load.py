"""Load weights for a resolved model: GGUF (through transformers), safetensors, or a hub id.

Safe by default: pickled weights (.bin, .pt) are refused unless allow_pickle, and remote code
is never trusted unless trust_remote_code.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from specmemo.errors import BadInput, UnknownModel
from specmemo.models.gguf_file import read_into
from specmemo.memory.hf_adapter import attention_implementation, check_supported
from specmemo.models.resolve import ModelRef

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    ref: ModelRef
    model: object                 # our LlamaModel, or a transformers module run through the adapter
    tokenizer: object | None
    dtype: torch.dtype
    device: torch.device
    forward_path: str = "transformers"   # "specmemo" (models/llama.py) or "transformers" (the adapter)
    forward: object = None               # forward(store, ids, logits_to_keep) -> fp32 logits

    @property
    def attention(self) -> str | None:
        """How half-precision attention keeps verification exact: "native" (the compiled kernel),
        "torch", or None where it need not (fp32, the transformers adapter)."""
        return getattr(self.model, "attention_path", None)

    @property
    def products(self) -> str | None:
        """Which kernels multiply our decoder's matrices: "compiled" (models/row_matmul.c, where the
        device profile chose it) or "torch"; None for the transformers adapter."""
        return getattr(self.model, "products_path", None)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise BadInput(f"unknown dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}") from None


def dense_location(ref: ModelRef, trust_remote_code: bool) -> str:
    """Where weights load from: a GGUF's dense copy (see gguf_cache), else the ref's own location."""
    if ref.gguf_file:
        from specmemo.models.gguf_cache import ensure_dense

        return str(ensure_dense(Path(ref.location) / ref.gguf_file, trust_remote_code))
    return ref.location


def _weights_kwargs(ref: ModelRef, allow_pickle: bool) -> dict:
    if ref.source == "dir":
        path = Path(ref.location)
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                if not allow_pickle:
                    raise BadInput(
                        f"{path} holds only pickled weights (.bin/.pt), which can run code when loaded; "
                        "convert them to safetensors or pass --allow-pickle if you trust them"
                    )
                return {"use_safetensors": False}
            raise UnknownModel(f"{path} has a config.json but no weights (*.safetensors)")
    return {} if allow_pickle else {"use_safetensors": True}


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if ref.location is None:
        raise UnknownModel(f"{ref.name} has no weights source (alias without hub id or package)")
    try:
        return AutoTokenizer.from_pretrained(dense_location(ref, trust_remote_code), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot load the tokenizer of {ref.name}: {str(e).splitlines()[0]}") from None


def check_architecture(ref: ModelRef, trust_remote_code: bool = False) -> None:
    """Refuse, before any weights load, a model whose attention specmemo would run wrongly."""
    from transformers import AutoConfig

    if ref.location is None:
        return
    try:
        config = AutoConfig.from_pretrained(dense_location(ref, trust_remote_code), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot read the configuration of {ref.name}: {str(e).splitlines()[0]}") from None
    check_supported(config, ref.name)


def weights_nbytes(model) -> int:
    """Bytes of parameters and buffers actually held; tied tensors counted once."""
    seen, total = set(), 0
    tensors = model.tensors() if hasattr(model, "tensors") else list(model.parameters()) + list(model.buffers())
    for t in tensors:
        key = id(t) if t.is_mkldnn else t.data_ptr()   # a packed head (models/quant.py) exposes no pointer
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def own_forward_reason(location: str) -> str | None:
    """Why our decoder cannot run the checkpoint at `location` (None: it can)."""
    import json

    from specmemo.models.llama import unsupported_reason

    path = Path(location)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return "no local config.json and safetensors weights"
    cfg = json.loads((path / "config.json").read_text())
    return unsupported_reason(cfg.get("text_config", cfg))


def load_model(ref: ModelRef, dtype: str, device: str = "cpu", *, with_tokenizer: bool = True,
               allow_pickle: bool = False, trust_remote_code: bool = False, fast_layout: bool = False,
               forward: str = "auto") -> LoadedModel:
    """forward: "specmemo" (our decoder, models/llama.py), "transformers" (the adapter), or "auto"
    (ours where it covers the architecture). fast_layout: for the transformers path on a CPU,
    store linear weights transposed (see layout.py); off for baselines, which run the model as
    transformers ships it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if ref.location is None:
        raise UnknownModel(f"{ref.name} has no weights source (alias without hub id or package)")
    if dtype == "q4":
        return _load_q4(ref, device, with_tokenizer, trust_remote_code)
    kwargs = _weights_kwargs(ref, allow_pickle)
    want = torch_dtype(dtype)
    location = dense_location(ref, trust_remote_code)
    if forward != "transformers":
        reason = own_forward_reason(location)
        if reason is None:
            return _load_own(ref, location, want, device, with_tokenizer, trust_remote_code)
        if forward == "specmemo":
            raise UnknownModel(f"{ref.name}: specmemo's decoder cannot run it ({reason})")
    try:
        check_architecture(ref, trust_remote_code)
        index = _safetensors_index(location) if device == "cpu" else {}
        # On a CPU with local safetensors, weights stay lazily mapped here and are read in the
        # wanted dtype one tensor at a time below (converting here would touch the whole file).
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype="auto" if index else want, attn_implementation=attention_implementation(),
            trust_remote_code=trust_remote_code, **kwargs,
        )
        tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot load {ref.name}: {str(e).splitlines()[0]}") from None
    dev = torch.device(device)
    model.eval()
    if dev.type == "cpu":
        _make_resident(model, index, want)  # so the file mapping is released
        model.config.dtype = want
        if fast_layout:
            from specmemo.models.layout import transpose_linears

            transpose_linears(model)
    else:
        model.to(dev)
    from specmemo.memory.hf_adapter import AdapterForward

    return LoadedModel(ref, model, tokenizer, want, dev, "transformers", AdapterForward(model))


def _load_own(ref: ModelRef, location: str, dtype: torch.dtype, device: str, with_tokenizer: bool,
              trust_remote_code: bool) -> LoadedModel:
    import json
    from types import SimpleNamespace

    path = Path(location)  # own_forward_reason has checked the architecture
    model = load_llama(location, json.loads((path / "config.json").read_text()), dtype, device)
    gen = path / "generation_config.json"
    model.generation_config = SimpleNamespace(**(json.loads(gen.read_text()) if gen.is_file() else {}))
    tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    return LoadedModel(ref, model, tokenizer, dtype, torch.device(device), "specmemo", model)


def _load_q4(ref: ModelRef, device: str, with_tokenizer: bool, trust_remote_code: bool) -> LoadedModel:
    """A GGUF's 4-bit matrices kept packed (load_gguf_q4), bf16 activations, on a CPU."""
    import json
    from types import SimpleNamespace

    from specmemo.budget.footprint import QUANT_COMPUTE

    if torch.device(device).type != "cpu":
        raise BadInput("--dtype q4 runs on a CPU so far (torch's int4 CPU kernel); on CUDA use bf16 or fp16")
    if not ref.gguf_file:
        raise BadInput(f"--dtype q4 needs a GGUF file with Q4_0/Q4_1 weights; {ref.name} is not one "
                       "(quantizing safetensors on load is not built yet)")
    # The dense copy (made once, in a child process) gives config.json and the tokenizer files.
    path = Path(dense_location(ref, trust_remote_code))
    dtype = TORCH_DTYPES[QUANT_COMPUTE]
    model = load_gguf_q4(str(Path(ref.location) / ref.gguf_file), json.loads((path / "config.json").read_text()),
                         dtype)
    gen = path / "generation_config.json"
    model.generation_config = SimpleNamespace(**(json.loads(gen.read_text()) if gen.is_file() else {}))
    tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    return LoadedModel(ref, model, tokenizer, dtype, torch.device(device), "specmemo", model)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def _safetensors_index(location: str) -> dict[str, tuple[Path, int, torch.dtype, list[int]]]:
    """name -> (file, byte offset, dtype, shape) for every tensor of a local safetensors checkpoint,
    from the files' JSON headers (a hub id or pickled weights: empty)."""
    import json
    import struct

    index = {}
    path = Path(location)
    if not path.is_dir():
        return index
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and meta["dtype"] in _ST_DTYPES:
                index[name] = (f, 8 + n + meta["data_offsets"][0], _ST_DTYPES[meta["dtype"]], meta["shape"])
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
def _make_resident(model: torch.nn.Module, index: dict, dtype: torch.dtype) -> None:
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


def wrap(ref: ModelRef, model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    """A transformers model built in memory (tests, random weights) as a LoadedModel."""
    from specmemo.memory.hf_adapter import AdapterForward

    p = next(model.parameters())
    return LoadedModel(ref, model.eval(), tokenizer, p.dtype, p.device, "transformers", AdapterForward(model))


_BLOCK_ROWS = 2048  # rows per read when transposing into place: a few MiB of scratch, never a whole matrix


def load_llama(location: str, config: dict, dtype: torch.dtype, device: str = "cpu"):
    """Our decoder (models/llama.py) with weights read from local safetensors straight into its
    layout: no transformers module, no second copy of any matrix."""
    index = _safetensors_index(location)

    def nrows(name: str) -> int:
        if name not in index:
            raise UnknownModel(f"{location} lacks the tensor {name}")
        return index[name][3][0]

    def rows(name: str, r0: int, r1: int | None) -> torch.Tensor:
        return _read_rows(index[name], r0, nrows(name) if r1 is None else r1)

    model = _build_llama(config, rows, nrows, dtype, device)
    if torch.device(device).type == "cpu":
        _pack_for_onednn(model, index)
    return model


def _pack_for_onednn(model, index: dict) -> None:
    """bf16 on a CPU, where the device profile measured it faster: layer matrices and the LM head
    packed once for oneDNN (models/quant.PackedMatrix). The head's rows (the tied embedding's
    too) are then read from the safetensors file per token."""
    from specmemo.models.quant import FileRows, pack_head, pack_layers, packs

    if packs(model.dtype, "layers"):
        pack_layers(model)
    if packs(model.dtype, "head"):
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
def _build_llama(config: dict, rows, nrows, dtype: torch.dtype, device):
    """Allocate the decoder on `device` and fill it from rows(name, r0, r1) -> tensor (r1 None:
    to the end; nrows(name): its first dimension), transposing blocks of rows into place."""
    from specmemo.models.llama import LlamaConfig, LlamaModel

    cfg = LlamaConfig.from_hf(config)
    model = LlamaModel(cfg, dtype, device)

    def fill(dest: torch.Tensor, name: str) -> None:
        dest.copy_(rows(name, 0, None))

    def fill_transposed(dest: torch.Tensor, name: str, col: int) -> int:
        """dest[:, col : col + n] = the [n, in] matrix `name` transposed; returns n."""
        n = nrows(name)
        for r0 in range(0, n, _BLOCK_ROWS):
            r1 = min(n, r0 + _BLOCK_ROWS)
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


Q4_TYPES = ("Q4_0", "Q4_1")


def runs_packed(ref: ModelRef) -> bool:
    """Whether `ref` is a Llama GGUF whose layer matrices are Q4_0/Q4_1 (what --dtype q4 runs)."""
    if not ref.gguf_file:
        return False
    from specmemo.models.gguf_file import open_gguf

    f = open_gguf(Path(ref.location) / ref.gguf_file)
    first = f.tensors.get("blk.0.attn_q.weight")
    return f.metadata.get("general.architecture") == "llama" and first is not None and first.kind in Q4_TYPES


@torch.no_grad()
def load_gguf_q4(gguf_path: str, config: dict, dtype: torch.dtype):
    """Our decoder with a Llama GGUF's Q4_0/Q4_1 matrices kept packed (models/quant.py) and run
    by torch's int4 CPU kernel; activations, norms, the embedding and LM head in `dtype`. Other
    tensor types in a layer (Q8_0, K-quants, F16) are dequantized with one warning line. Tensors
    are read with file reads one at a time (the embedding in blocks of rows): the load peak stays
    near the packed weights."""
    import gguf
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress

    from specmemo.models.gguf_file import open_gguf
    from specmemo.models.llama import LlamaConfig, LlamaModel
    from specmemo.models.quant import (GROUP, FileRows, Int4Weight, NativeHead, NativeQ4, native_kernels,
                                       pack_head, packs, q4_blocks, rope_rows)

    f = open_gguf(gguf_path)
    arch = f.metadata.get("general.architecture")
    if arch != "llama":
        raise UnknownModel(f"{f.path.name}: packed q4 runs GGUF architecture 'llama', not {arch!r}; "
                           "use --dtype fp32 or bf16")
    cfg = LlamaConfig.from_hf(config)
    # The compiled row-exact kernel where measured faster on this CPU's class (models/row_matmul.c):
    # it takes bf16 activations, so only for a bf16-activation model.
    kernel = native_kernels("q4") if dtype == torch.bfloat16 else None
    head_kernel = native_kernels("head") if dtype == torch.bfloat16 else None
    model = LlamaModel(cfg, dtype, "cpu")  # dense buffers stay untouched (never resident) and are replaced
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
        layout), _BLOCK_ROWS rows at a time (an embedding is the largest tensor: never whole in fp32)."""
        t = entry(name)
        cols, rows = t.shape
        out = model.matrix(cols, rows)
        for r0 in range(0, rows, _BLOCK_ROWS):
            r1 = min(rows, r0 + _BLOCK_ROWS)
            out[:, r0:r1].copy_(rows_f32(t, r0, r1).t())
        return out

    # On stderr: stdout carries generate's text or JSON.
    with Progress(console=Console(stderr=True), transient=True) as progress:
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
    elif packs(dtype, "head"):   # packed for oneDNN; its rows (the tied embedding's too) read from the file
        pack_head(model, FileRows.gguf(f.path, entry("token_embd.weight" if cfg.tie_embeddings else "output.weight"),
                                       dtype))
    if unpacked:
        import sys

        sys.stderr.write(f"warning: {f.path.name}: {', '.join(sorted(unpacked))} layer matrices are not run "
                         f"packed; dequantized to {str(dtype).split('.')[-1]}\n")
    return model
