"""Tiny random models built in-process, and engines around them. No downloads."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specmemo.budget.arch import Arch
from specmemo.budget.plan import PlanRequest, make_plan
from specmemo.decoding.drafters import ModelDrafter, NgramDrafter, NoDrafter
from specmemo.decoding.engine import Engine
from specmemo.decoding.sampling import SamplingConfig
from specmemo.memory import allocator

VOCAB = 96


def tiny_llama(seed: int, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=VOCAB, max_pos=1024, scale=1.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    if scale != 1.0:  # sharper logits: random models are otherwise near-uniform
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    return model


def as_forward(model):
    """Our decoder is its own forward; a transformers model goes behind the adapter."""
    from specmemo.memory.hf_adapter import AdapterForward

    return model if getattr(model, "name", "") == "specmemo" else AdapterForward(model)


def arch_of(model) -> Arch:
    return Arch.from_config(model.config.to_dict(), name="tiny")


_OWN = {}


def own_model(model):
    """Our decoder (models/llama.py) with the weights of a transformers model, through a real
    save_pretrained / safetensors load."""
    import json
    import tempfile

    from specmemo.budget.devices import load_device
    from specmemo.models.load_safetensors import load_llama

    if id(model) not in _OWN:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            cfg = json.loads(open(f"{tmp}/config.json").read())
            p = next(model.parameters())
            _OWN[id(model)] = (model, load_llama(tmp, cfg, p.dtype, p.device, load_device("cpu").kernels))
    return _OWN[id(model)][1]


def make_engine(target, drafter="none", draft=None, *, context=300, k=4, window=None,
                sampling=SamplingConfig(), chunk=16, seed=None, device="cpu", kv_dtype=None, own=False,
                graphed=False):
    """own: run our decoder (with the same weights) instead of the transformers model; graphed:
    through models/graphs.py (CUDA graphs on a GPU, the fixed-shape path uncaptured on a CPU)."""
    req = PlanRequest(target=arch_of(target), draft=arch_of(draft) if draft is not None else None,
                      drafter=drafter, context=context, draft_len=0 if drafter == "none" else k,
                      draft_window=window or context, dtype="fp32", prefill_chunk=chunk)
    plan = make_plan(req)
    dtype = next(target.parameters()).dtype
    store = allocator.allocate_target(plan, kv_dtype or dtype, device)
    gen = sampling.generator(device) if seed is None else torch.Generator(device).manual_seed(seed)
    fwd = own_model if own or graphed else as_forward
    if graphed:
        from specmemo.models.graphs import ROWS, GraphedForward

        fwd = lambda m: GraphedForward(own_model(m), capture=device == "cuda", rows=ROWS if m is target else None)
    if drafter == "model":
        d = ModelDrafter(fwd(draft), allocator.allocate_draft(plan, next(draft.parameters()).dtype, device), sampling,
                         req.draft_window, gen)
    elif drafter == "ngram":
        d = NgramDrafter(device)
    else:
        d = NoDrafter(device)
    return Engine(fwd(target), store, d, sampling, draft_len=req.draft_len, prefill_chunk=chunk,
                  context=context, generator=gen)


def run(engine, prompt, max_new=40, stop_ids=frozenset()):
    from specmemo.decoding.events import collect

    return collect(engine.generate(list(prompt), max_new, stop_ids))


def tiny(seed: int, **shape):
    """A tiny random model built on first use, once per test module that names it: collection
    builds nothing, and a module's tests share one model as they would a session fixture."""
    import functools

    return functools.cache(lambda: tiny_llama(seed, **shape))
