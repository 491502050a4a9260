"""The target's forward time for n = 1..16 tokens at once (the verification cost curve), per dtype.

SmolLM2-135M-Instruct through specmemo's own decoder, 512 tokens already in the KV store, median
of 15 runs for each n; prints t(n) in ms and t(n)/t(1). Speculation pays when k draft tokens are
accepted often enough to cover t(k+1)/t(1).
--torch-attention also times each half-precision dtype with exact attention in torch (one query
at a time) instead of the compiled kernel (models/kernels/native.py), in the same run ("<dtype>/torch").
--torch-head also times q4 with its LM head through torch's bf16 product where the compiled
row-exact kernel is chosen (models/quant.NativeHead), in the same run ("q4/torch-head").
--against-attention FILE also times each half-precision dtype with another version of
exact_attention.c (e.g. `git show HEAD~1:specmemo/models/kernels/exact_attention.c > /tmp/before.c`), in the
same run ("<dtype>/FILE").
Writes bench/results/cost_curve-<cpu class>.json (bench/result.py).
Usage: python bench/cost_curve.py [--dtypes fp32,bf16] [--max-tokens 16] [--torch-attention] [--torch-head]
       [--against-attention FILE]
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.memory.malloc import tame_glibc_malloc  # noqa: E402
from specmemo.models.kernels import native  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.profiling.cost_curve import cost_curve, forward_times  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--torch-attention", action="store_true")
    ap.add_argument("--torch-head", action="store_true")
    ap.add_argument("--against-attention", type=Path, help="another exact_attention.c, timed in the same run")
    args = ap.parse_args()
    other = None
    if args.against_attention:
        other = native.exact_attention(args.against_attention)
        if other is None:
            sys.exit(f"--against-attention {args.against_attention}: {native.why_not()}")
    tame_glibc_malloc()
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ref = resolve("smollm2-135m-instruct")
    times = {}
    for dt in args.dtypes.split(","):
        times[dt] = forward_times(ref, dt, args.max_tokens)
        if args.torch_attention and dt != "fp32":
            times[f"{dt}/torch"] = forward_times(ref, dt, args.max_tokens, torch_attention=True)
        if other is not None and dt != "fp32":
            times[f"{dt}/{args.against_attention.name}"] = forward_times(ref, dt, args.max_tokens, attention_kernel=other)
        if args.torch_head and dt == "q4":
            times[f"{dt}/torch-head"] = forward_times(ref, dt, args.max_tokens, torch_head=True)
    print("| n | " + " | ".join(f"{dt} ms | {dt} t(n)/t(1)" for dt in times) + " |")
    print("|---:|" + "---:|---:|" * len(times))
    for n in range(1, args.max_tokens + 1):
        cells = " | ".join(f"{t[n] * 1e3:.1f} | {t[n] / t[1]:.2f}" for t in times.values())
        print(f"| {n} | {cells} |")
    from bench.result import figure, save

    curves = {}
    for dt, t in times.items():  # for profiles/devices/cpu.toml
        curves[dt] = cost_curve(t)
        if "/" not in dt:
            print(f"cost_curve_{dt} = {curves[dt]}")
    save("cost_curve", [figure(f"SmolLM2-135M {dt}: C(6) = t(6)/t(1)", curves[dt][5]) for dt in curves
                        if len(curves[dt]) >= 6] + [figure(f"SmolLM2-135M {dt}: t(1)", round(t[1] * 1e3, 2), "ms")
                                                    for dt, t in times.items()],
         {"ms": {dt: {n: t[n] * 1e3 for n in t} for dt, t in times.items()}, "curves": curves})


if __name__ == "__main__":
    main()
