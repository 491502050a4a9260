"""Load weights for a resolved model: GGUF (through transformers), safetensors, or a hub id.

Safe by default: pickled weights (.bin, .pt) are refused unless allow_pickle, and remote code
is never trusted unless trust_remote_code.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from specmemo.errors import BadInput, UnknownModel
from specmemo.memory.hf_adapter import attention_implementation, check_supported
from specmemo.models.resolve import ModelRef

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    ref: ModelRef
    model: torch.nn.Module
    tokenizer: object | None
    dtype: torch.dtype
    device: torch.device


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise BadInput(f"unknown dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}") from None


def _dense_location(ref: ModelRef, trust_remote_code: bool) -> str:
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
        return AutoTokenizer.from_pretrained(_dense_location(ref, trust_remote_code), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot load the tokenizer of {ref.name}: {str(e).splitlines()[0]}") from None


def check_architecture(ref: ModelRef, trust_remote_code: bool = False) -> None:
    """Refuse, before any weights load, a model whose attention specmemo would run wrongly."""
    from transformers import AutoConfig

    if ref.location is None:
        return
    try:
        config = AutoConfig.from_pretrained(_dense_location(ref, trust_remote_code), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot read the configuration of {ref.name}: {str(e).splitlines()[0]}") from None
    check_supported(config, ref.name)


def weights_nbytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers actually held; tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def load_model(ref: ModelRef, dtype: str, device: str = "cpu", *, with_tokenizer: bool = True,
               allow_pickle: bool = False, trust_remote_code: bool = False, fast_layout: bool = False) -> LoadedModel:
    """fast_layout: on a CPU, store linear weights transposed for faster decoding (see layout.py).
    Off for baselines, which should run the model as transformers ships it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if ref.location is None:
        raise UnknownModel(f"{ref.name} has no weights source (alias without hub id or package)")
    kwargs = _weights_kwargs(ref, allow_pickle)
    want = torch_dtype(dtype)
    try:
        location = _dense_location(ref, trust_remote_code)
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
    return LoadedModel(ref, model, tokenizer, torch_dtype(dtype), dev)


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


def _read_tensor(entry, dtype: torch.dtype) -> torch.Tensor:
    """One tensor read with plain file reads: the page cache is not our resident memory, while
    pages of a memory-mapped file are, until the mapping closes (2× the weights at the peak)."""
    path, offset, file_dtype, shape = entry
    out = torch.empty(shape, dtype=file_dtype)
    with path.open("rb", buffering=0) as fh:
        fh.seek(offset)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"{path.name} ends inside a tensor")
            got += n
    return out if file_dtype == dtype else out.to(dtype)


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
    """A model built in memory (tests, random weights) as a LoadedModel."""
    p = next(model.parameters())
    return LoadedModel(ref, model.eval(), tokenizer, p.dtype, p.device)
