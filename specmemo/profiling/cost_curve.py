"""The verification cost curve: the target's forward time for n = 1..16 tokens at once.

Measured on the machine at hand (hosts differ: MKL's small-M fp32 GEMM is steep in n, oneDNN's
bf16 one nearly flat, torch's int4 kernel in between), by `specmemo profile --save-profile` for
the pair profile and by bench/cost_curve.py for the device profile. `plan` and the engine's
draft length read it as C(n) = t(n)/t(1) (budget/speedup.py).
"""

import time

import torch

from specmemo.budget.devices import load_device
from specmemo.budget.fit import fit
from specmemo.memory.allocator import allocate_target
from specmemo.models.load import load_model
from specmemo.models.quant import NativeHead
from specmemo.models.resolve import ModelRef

CACHED = 512      # tokens already in the store: a mid-conversation step


@torch.inference_mode()
def forward_times(ref: ModelRef, dtype: str, max_tokens: int = 16, repeats: int = 15,
                  progress=None, torch_attention: bool = False, torch_head: bool = False,
                  attention_kernel=None) -> dict[int, float]:
    """Median seconds of one target forward over n new tokens, n = 1..max_tokens, with CACHED
    tokens in the store. The widths are timed in rounds, each round every n once, so a shared
    machine's slow spells fall on every n alike rather than on a few (timed n by n, three runs
    on the Zen 4 host gave bf16 C(6) = 1.09, 1.16 and 1.30). progress(done, total) after each
    round. torch_attention: half precision attends through torch one query at a time even where
    the compiled kernel is chosen. torch_head: a q4 model's LM head multiplied by torch's bf16
    product even where the compiled one is chosen (models/quant.NativeHead). attention_kernel: another
    build of the exact-attention kernel in place of the chosen one (a kernel change's A/B)."""
    model = load_model(ref, dtype, with_tokenizer=False, forward="specmemo", kernels=load_device("cpu").kernels).model
    if torch_attention:
        model.attention_kernel = None
    elif attention_kernel is not None and model.attention_kernel is not None:
        model.attention_kernel = attention_kernel
    if torch_head and isinstance(model.head, NativeHead):
        model.head = model.head.weight.t()   # the [E, V] operand torch multiplies (out-major storage)
        if model.cfg.tie_embeddings:
            model.embed = model.head
    report = fit(ref.arch, None, "none", context=CACHED + max_tokens, dtype=dtype, sampling=False, budget=1 << 40)
    store = allocate_target(report.plan, model.dtype, model.device)
    ids = torch.randint(0, ref.arch.vocab_size, (1, CACHED + max_tokens), generator=torch.Generator().manual_seed(0))
    model(store, ids[:, :CACHED].to(model.device), 1)
    widths = range(1, max_tokens + 1)
    times = {n: [] for n in widths}
    for round_ in range(-1, repeats):   # round -1 warms up every width
        for n in widths:
            t0 = time.perf_counter()
            model(store, ids[:, CACHED : CACHED + n].to(model.device), n)
            if round_ >= 0:
                times[n].append(time.perf_counter() - t0)
            store.trim(CACHED)
        if progress and round_ >= 0:
            progress(round_ + 1, repeats)
    return {n: sorted(t)[repeats // 2] for n, t in times.items()}


def cost_curve(times: dict[int, float]) -> list[float]:
    """[C(1) = 1, C(2), ...]: each n's time over one token's, two decimals."""
    return [round(times[n] / times[1], 2) for n in sorted(times)]
