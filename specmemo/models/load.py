"""Load weights for a resolved model: GGUF (through transformers), safetensors, or a hub id.

Safe by default: pickled weights (.bin, .pt) are refused unless allow_pickle, and remote code
is never trusted unless trust_remote_code.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from specmemo.errors import BadInput, UnknownModel
from specmemo.memory.hf_adapter import attention_implementation
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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            _dense_location(ref, trust_remote_code), dtype=torch_dtype(dtype), attn_implementation=attention_implementation(),
            trust_remote_code=trust_remote_code, **kwargs,
        )
        tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot load {ref.name}: {str(e).splitlines()[0]}") from None
    dev = torch.device(device)
    model.to(dev).eval()
    if dev.type == "cpu":
        _make_resident(model)  # every tensor, so the safetensors file mapping is released
        if fast_layout:
            from specmemo.models.layout import transpose_linears

            transpose_linears(model)
    return LoadedModel(ref, model, tokenizer, torch_dtype(dtype), dev)


@torch.no_grad()
def _make_resident(model: torch.nn.Module) -> None:
    """safetensors maps weights lazily from the file, so they would page in during the first
    forward and count as generation memory. Copy them into process memory now, one tensor at a
    time; tied tensors stay tied."""
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for _, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            key = t.data_ptr()
            if key not in copies:
                copies[key] = t.data.clone()
            t.data = copies[key]


def wrap(ref: ModelRef, model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    """A model built in memory (tests, random weights) as a LoadedModel."""
    p = next(model.parameters())
    return LoadedModel(ref, model.eval(), tokenizer, p.dtype, p.device)
