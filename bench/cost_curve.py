"""The target's forward time for n = 1..16 tokens at once (the verification cost curve), per dtype.

SmolLM2-135M-Instruct through specmemo's own decoder, 512 tokens already in the KV store, median
of 15 runs for each n; prints t(n) in ms and t(n)/t(1). Speculation pays when k draft tokens are
accepted often enough to cover t(k+1)/t(1).
Usage: python bench/cost_curve.py [--dtypes fp32,bf16] [--max-tokens 16]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.budget.fit import fit  # noqa: E402
from specmemo.memory.allocator import allocate_target  # noqa: E402
from specmemo.memory.malloc import tame_glibc_malloc  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.profiling.machine import cpu_name  # noqa: E402


def curve(dtype: str, max_tokens: int, repeats: int = 15) -> dict[int, float]:
    ref = resolve("smollm2-135m-instruct")
    model = load_model(ref, dtype, with_tokenizer=False, forward="specmemo").model
    report = fit(ref.arch, None, "none", context=1024, dtype=dtype, sampling=False, budget=1 << 40)
    store = allocate_target(report.plan, model.dtype, "cpu")
    ids = torch.randint(0, ref.arch.vocab_size, (1, 512 + max_tokens), generator=torch.Generator().manual_seed(0))
    model(store, ids[:, :512], 1)
    out = {}
    for n in [1, *range(1, max_tokens + 1)]:  # the first n=1 warms up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(store, ids[:, 512:512 + n], n)
            times.append(time.perf_counter() - t0)
            store.trim(512)
        out[n] = sorted(times)[repeats // 2] * 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    tame_glibc_malloc()
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    curves = {dt: curve(dt, args.max_tokens) for dt in args.dtypes.split(",")}
    print("| n | " + " | ".join(f"{dt} ms | {dt} t(n)/t(1)" for dt in curves) + " |")
    print("|---:|" + "---:|---:|" * len(curves))
    for n in range(1, args.max_tokens + 1):
        cells = " | ".join(f"{c[n]:.1f} | {c[n] / c[1]:.2f}" for c in curves.values())
        print(f"| {n} | {cells} |")


if __name__ == "__main__":
    main()
