"""Load weights for a resolved model: one entry (load_model) over the loaders by format
(load_safetensors.py, load_gguf.py, or transformers for what our decoder does not cover).

Safe by default: pickled weights (.bin, .pt) are refused unless allow_pickle, and remote code
is never trusted unless trust_remote_code.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from specmemo.budget.devices import Kernels
from specmemo.errors import BadInput, UnknownModel, UnsupportedModel
from specmemo.memory.hf_adapter import attention_implementation, check_supported
from specmemo.models.load_safetensors import load_llama, make_resident, safetensors_index
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
        """Which kernels multiply our decoder's matrices: "compiled" (models/kernels/row_matmul.c, where the
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

        # From the GGUF's own metadata, before it is converted (tens of seconds of work).
        check_gguf_architecture(Path(ref.location) / ref.gguf_file, ref.name)
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
    location = dense_location(ref, trust_remote_code)   # a conversion's failure is its own message
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
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


def check_gguf_architecture(path: Path, name: str) -> None:
    """Refuse a GGUF whose architecture transformers cannot convert, or whose attention specmemo
    would run wrongly (a sliding window, soft-capped logits, sinks), from its metadata alone."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from specmemo.models.gguf_file import open_gguf

    meta = open_gguf(path).metadata
    arch = meta.get("general.architecture")
    known = sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
    if arch not in GGUF_CONFIG_MAPPING or arch in ("general", "tokenizer"):
        raise UnsupportedModel(f"{name}: GGUF architecture {arch!r} cannot be loaded (known: {', '.join(known)})")
    if meta.get(f"{arch}.attention.sliding_window"):
        raise UnsupportedModel(f"{name} uses sliding-window attention ({meta[f'{arch}.attention.sliding_window']} "
                               "tokens), which specmemo's attention does not implement yet")
    for key in (f"{arch}.attn_logit_softcapping", f"{arch}.final_logit_softcapping"):
        if meta.get(key):
            raise UnsupportedModel(f"{name} uses logit soft-capping ({key} = {meta[key]}), which specmemo's "
                                   "attention does not implement yet")
    if arch == "gpt_oss":
        raise UnsupportedModel(f"{name} uses attention sinks, which specmemo's attention does not implement yet")


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
               forward: str = "auto", kernels: Kernels = Kernels()) -> LoadedModel:
    """forward: "specmemo" (our decoder, models/llama.py), "transformers" (the adapter), or "auto"
    (ours where it covers the architecture). fast_layout: for the transformers path on a CPU,
    store linear weights transposed (see layout.py); off for baselines, which run the model as
    transformers ships it. kernels: this machine's kernel and layout choices (the device
    profile's, budget.devices.Kernels; the default runs torch's plain kernels)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if ref.location is None:
        raise UnknownModel(f"{ref.name} has no weights source (alias without hub id or package)")
    if dtype == "q4":
        return _load_q4(ref, device, with_tokenizer, trust_remote_code, kernels)
    kwargs = _weights_kwargs(ref, allow_pickle)
    want = torch_dtype(dtype)
    location = dense_location(ref, trust_remote_code)
    if forward != "transformers":
        reason = own_forward_reason(location)
        if reason is None:
            return _load_own(ref, location, want, device, with_tokenizer, trust_remote_code, kernels)
        if forward == "specmemo":
            raise UnknownModel(f"{ref.name}: specmemo's decoder cannot run it ({reason})")
    try:
        check_architecture(ref, trust_remote_code)
        index = safetensors_index(location) if device == "cpu" else {}
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
        make_resident(model, index, want)  # so the file mapping is released
        model.config.dtype = want
        if fast_layout:
            from specmemo.models.layout import transpose_linears

            transpose_linears(model)
    else:
        model.to(dev)
    from specmemo.memory.hf_adapter import AdapterForward

    return LoadedModel(ref, model, tokenizer, want, dev, "transformers", AdapterForward(model))


def _load_own(ref: ModelRef, location: str, dtype: torch.dtype, device: str, with_tokenizer: bool,
              trust_remote_code: bool, kernels: Kernels) -> LoadedModel:
    import json
    from types import SimpleNamespace

    path = Path(location)  # own_forward_reason has checked the architecture
    model = load_llama(location, json.loads((path / "config.json").read_text()), dtype, device, kernels)
    gen = path / "generation_config.json"
    model.generation_config = SimpleNamespace(**(json.loads(gen.read_text()) if gen.is_file() else {}))
    tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    return LoadedModel(ref, model, tokenizer, dtype, torch.device(device), "specmemo", model)


def _load_q4(ref: ModelRef, device: str, with_tokenizer: bool, trust_remote_code: bool,
             kernels: Kernels) -> LoadedModel:
    """A GGUF's 4-bit matrices kept packed (load_gguf_q4), bf16 activations, on a CPU."""
    import json
    from types import SimpleNamespace

    from specmemo.budget.footprint import QUANT_COMPUTE
    from specmemo.models.load_gguf import load_gguf_q4

    if torch.device(device).type != "cpu":
        raise BadInput("--dtype q4 runs on a CPU so far (torch's int4 CPU kernel); on CUDA use bf16 or fp16")
    if not ref.gguf_file:
        raise BadInput(f"--dtype q4 needs a GGUF file with Q4_0/Q4_1 weights; {ref.name} is not one "
                       "(quantizing safetensors on load is not built yet)")
    # The dense copy (made once, in a child process) gives config.json and the tokenizer files.
    path = Path(dense_location(ref, trust_remote_code))
    dtype = TORCH_DTYPES[QUANT_COMPUTE]
    model = load_gguf_q4(str(Path(ref.location) / ref.gguf_file), json.loads((path / "config.json").read_text()),
                         dtype, kernels)
    gen = path / "generation_config.json"
    model.generation_config = SimpleNamespace(**(json.loads(gen.read_text()) if gen.is_file() else {}))
    tokenizer = load_tokenizer(ref, trust_remote_code) if with_tokenizer else None
    return LoadedModel(ref, model, tokenizer, dtype, torch.device(device), "specmemo", model)


def wrap(ref: ModelRef, model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    """A transformers model built in memory (tests, random weights) as a LoadedModel."""
    from specmemo.memory.hf_adapter import AdapterForward

    p = next(model.parameters())
    return LoadedModel(ref, model.eval(), tokenizer, p.dtype, p.device, "transformers", AdapterForward(model))


