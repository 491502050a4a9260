"""The LM head's product per half precision and number of rows, on the machine at hand.

The default model's head is its largest matrix (49,152 × 576, tied to the embedding): a one-token
step streams all of it. Times `x @ head` for x of 1..8 rows, with the head stored [out, in] and
multiplied through its transposed view (the half-precision layout, models/layout.py), and checks
each product row-exact (every row equal to that row multiplied alone, which exact verification
needs); then bf16 packed once into oneDNN's layout (models/quant.PackedMatrix), and whether its
products equal the plain bf16 ones. Feeds `packed_head` in profiles/devices/cpu.toml.
Usage: python bench/head_kernels.py [--vocab 49152] [--hidden 576] [--repeats 40]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.models.quant import PackedMatrix  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402


def timed(multiply, x, repeats: int) -> str:
    for _ in range(3):
        multiply(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        multiply(x)
    return f"{(time.perf_counter() - t0) / repeats * 1e3:.2f}"


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(args.vocab, args.hidden, generator=gen) * 0.05          # [V, E]
    rows = (1, 2, 3, 4, 6, 8)
    print("| head | " + " | ".join(f"{m} rows ms" for m in rows) + " | row-exact |")
    print("|---|" + "---:|" * len(rows) + "---|")
    for dtype in (torch.bfloat16, torch.float16):
        head = weights.to(dtype).t()                                            # [E, V] view of [V, E]
        cells, exact = [], True
        for m in rows:
            x = torch.randn(m, args.hidden, generator=gen).to(dtype)
            cells.append(timed(lambda x: x @ head, x, args.repeats))
            full = x @ head
            exact &= all(torch.equal(full[i : i + 1], x[i : i + 1] @ head) for i in range(m))
        print(f"| {str(dtype).split('.')[-1]} | " + " | ".join(cells) + f" | {'yes' if exact else 'no'} |")
    # fp32, as a q4 model's head could be kept where half precision has no fast kernel (no
    # AVX512-BF16/AVX-512 BW: torch's bf16 matmul then converts the weight on every call)
    head = weights.t().contiguous()                                             # [E, V]
    cells = [timed(lambda x: x @ head, torch.randn(m, args.hidden, generator=gen), args.repeats) for m in rows]
    print("| fp32 [in, out] | " + " | ".join(cells) + " | (not needed: fp32 verification is left to its precision) |")
    head = weights.to(torch.bfloat16).t()
    try:
        packed = PackedMatrix(head)
    except RuntimeError as e:
        print(f"\nno packed bf16 head on this CPU: {str(e).splitlines()[0]}")
        return
    cells, exact, same = [], True, True
    for m in rows:
        x = torch.randn(m, args.hidden, generator=gen).to(torch.bfloat16)
        cells.append(timed(packed.times, x, args.repeats))
        full = packed.times(x)
        exact &= all(torch.equal(full[i : i + 1], packed.times(x[i : i + 1])) for i in range(m))
        same &= torch.equal(full, x @ head)
    print("| bf16 packed | " + " | ".join(cells) + f" | {'yes' if exact else 'no'} |")
    print(f"\npacked products equal the plain bf16 ones bit for bit: {'yes' if same else 'no'}")


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("head_kernels"):
        main()
