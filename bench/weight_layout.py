"""Which dense weight layout decodes faster on this CPU, per dtype: [in, out] contiguous (`x @ Wt`)
or [out, in] contiguous used through its transpose view (`x @ W.t()`, torch's Linear layout).

Times one pass over SmolLM2-135M's matrix shapes (30 layers of q/k/v, o, gate/up, down, then the
LM head; distinct weights per layer, as in decoding) at M = 1 and 6 tokens, and checks that each
row of an M-row product equals the same row computed alone (exact verification needs it). Record
the result as `out_major_dtypes` in profiles/devices/cpu.toml.
Usage: python bench/weight_layout.py [--dtypes fp32,bf16,fp16]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.host import cpu_name  # noqa: E402

E, I, QKV, V, LAYERS = 576, 1536, 576 + 2 * 192, 49152, 30
SHAPES = [(E, QKV), (E, E), (E, 2 * I), (I, E)] * LAYERS + [(E, V)]   # (in, out)


def weights(dtype, out_major: bool) -> list[torch.Tensor]:
    """[in, out] operands: contiguous, or transposed views of [out, in] storage."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(o, i, generator=g).to(dtype).t() if out_major else torch.randn(i, o, generator=g).to(dtype)
            for i, o in SHAPES]


def one_pass(ws, x_by_in) -> None:
    for w in ws:
        x_by_in[w.shape[0]] @ w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    args = ap.parse_args()
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| dtype | layout | M=1 ms | M=6 ms | rows exact |\n|---|---|---:|---:|---|")
    faster = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        ms = {}
        for out_major in (False, True):
            ws = weights(dtype, out_major)
            row = []
            for m in (1, 6):
                xs = {i: torch.randn(m, i).to(dtype) for i in (E, I)}
                one_pass(ws, xs)
                t0 = time.perf_counter()
                for _ in range(3):
                    one_pass(ws, xs)
                row.append((time.perf_counter() - t0) / 3 * 1e3)
            xs = {i: torch.randn(6, i).to(dtype) for i in (E, I)}
            exact = all(torch.equal(xs[w.shape[0]] @ w, torch.cat([xs[w.shape[0]][i : i + 1] @ w for i in range(6)]))
                        for w in ws[:4] + ws[-1:])
            ms[out_major] = row
            label = "[out, in] via .t()" if out_major else "[in, out]"
            print(f"| {name} | {label} | {row[0]:.1f} | {row[1]:.1f} | {exact} |", flush=True)
        if sum(ms[True]) < sum(ms[False]):
            faster.append(name)
    print(f"out_major_dtypes = {faster!r}".replace("'", '"'))


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("weight_layout"):
        main()
