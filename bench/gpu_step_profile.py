"""Where a decoding step's time goes on a GPU: our decoder, one forward of n tokens at a context
of S tokens, for AR (n=1), verification (n=k+1, causal mask) and KV in another dtype, timed and
then profiled with torch.profiler (top kernels by GPU time, top ops by CPU time).

Usage: python bench/gpu_step_profile.py [--target smollm2-1.7b-instruct] [--dtype bf16] [--context 2000]
       python bench/gpu_step_profile.py --device cpu --target vicuna-68m --dtype fp32   (a smoke run)
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_check import hf_config
    from specmemo.budget.arch import Arch
    from specmemo.budget.plan import PlanRequest, make_plan
    from specmemo.memory import allocator
    from specmemo.memory.attention import causal_mask
    from specmemo.models.load_safetensors import own_from_transformers
    from specmemo.models.synthetic import random_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-1.7b-instruct")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    other = torch.float16 if dt != torch.float16 else torch.bfloat16
    dev = args.device
    cfg = hf_config(args.target)
    hf = random_model(cfg, 0, dt, dev)
    model = own_from_transformers(hf)
    del hf
    arch = Arch.from_config(cfg.to_dict(), name=args.target)
    S = args.context
    plan = make_plan(PlanRequest(target=arch, draft=None, drafter="none", context=S + 16, draft_len=0,
                                 draft_window=S + 16, dtype=args.dtype, prefill_chunk=256))
    stores = {dt: allocator.allocate_target(plan, dt, dev), other: allocator.allocate_target(plan, other, dev)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, S), generator=g).to(dev)
    for store in stores.values():
        for i in range(0, S, 256):
            model.forward(store, prompt[:, i : i + 256], 1)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    ids6 = prompt[:, :6]
    cases = {
        "ar n=1": lambda: model.forward(stores[dt], prompt[:, :1], 1),
        f"ar n=1, KV {str(other).split('.')[-1]}": lambda: model.forward(stores[other], prompt[:, :1], 1),
        "verify n=6, bool causal mask": lambda: model.forward(stores[dt], ids6, 6),
        "verify n=6, all-true mask": lambda: model.forward(stores[dt], ids6, 6,
                                                           mask=torch.ones(6, S + 6, dtype=torch.bool, device=dev)),
        "verify n=6, float additive mask": lambda: model.forward(
            stores[dt], ids6, 6, mask=torch.zeros(6, S + 6, dtype=dt, device=dev).masked_fill(
                ~causal_mask(6, S + 6, dev), float("-inf"))),
    }
    print(f"{args.target} {args.dtype} on {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}, "
          f"context {S}, torch {torch.__version__}", flush=True)
    for name, fn in cases.items():
        store = stores[other] if "KV" in name else stores[dt]
        for _ in range(3):
            fn()
            store.trim(S)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
            store.trim(S)
        sync()
        ms = 1e3 * (time.perf_counter() - t0) / args.repeats
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if dev == "cuda" else 0
        print(f"\n## {name}: {ms:.2f} ms per forward (alloc retries so far: {retries})", flush=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                fn()
                store.trim(S)
            sync()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60))
        if dev == "cuda":
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6, max_name_column_width=60))


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("gpu_step_profile"):
        main()
