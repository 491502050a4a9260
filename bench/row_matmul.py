"""The compiled row-exact products (models/kernels/row_matmul.c) against torch's, on the machine at hand.

A q4 model's layer matrices (SmolLM2-135M's 120: 30 layers, distinct weights per layer, as in
decoding) through quant.NativeQ4 and through torch's int4 kernel (quant.Int4Weight, bf16
activations); its 49,152 × 576 bf16 LM head through quant.NativeHead and through torch's bf16
product (the [out, in] storage's transposed view, as the decoder holds it). ms per pass by rows M,
timed in rounds (each round every kernel once) so a shared machine's slow spells fall on all
alike; then whether every row of an 8-row product equals that row alone. Feeds `native_q4` and
`native_head` in profiles/devices/cpu.toml. --against FILE adds another version of row_matmul.c
(e.g. `git show HEAD~1:specmemo/models/kernels/row_matmul.c > /tmp/before.c`) to the same rounds: a kernel
change's A/B on one machine in one run, with how far its q4 outputs move.
Usage: python bench/row_matmul.py [--ms 1,2,4,6,8,16] [--rounds 7] [--against FILE]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.models.kernels import native  # noqa: E402
from specmemo.models.quant import Int4Weight, NativeHead, NativeQ4  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402

LAYER = [(576, 576 + 2 * 192), (576, 576), (576, 2 * 1536), (1536, 576)]   # (in, out): qkv, o, gate_up, down
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def q4_pair(n_in: int, n_out: int, kernel, gen):
    """The same random q4 matrix as torch's int4 operand and as the compiled kernel's."""
    q = torch.randint(0, 16, (n_out, n_in), generator=gen)
    scale = torch.rand(n_out, n_in // 32, generator=gen).half().float() * 0.02
    zero = 8 * scale - torch.rand(n_out, n_in // 32, generator=gen).half().float() * 0.1
    return Int4Weight.from_q4(q, scale, zero, torch.bfloat16), NativeQ4.from_q4(q, scale, zero, kernel)


def row_exact(times, x) -> bool:
    whole = times(x)
    return all(torch.equal(times(x[i : i + 1])[0], whole[i]) for i in range(x.shape[0]))


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,2,4,6,8,16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--against", type=Path, help="another row_matmul.c, timed in the same rounds")
    args = ap.parse_args()
    kernel = native.row_matmul()
    if kernel is None:
        sys.exit(f"no compiled row_matmul here: {native.why_not()}")
    other = native.row_matmul(args.against) if args.against else None
    if args.against and other is None:
        sys.exit(f"--against {args.against}: {native.why_not()}")
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    pairs = [q4_pair(k, n, kernel, gen) for _ in range(LAYERS) for k, n in LAYER]
    rows = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05).bfloat16()        # [V, E]
    torch_head, native_head = rows.t(), NativeHead(rows, kernel)
    kernels = {
        "q4 layers, torch int4": lambda xs: [xs[w.in_features] @ w for w, _ in pairs],
        "q4 layers, compiled": lambda xs: [n.times(xs[n.in_features]) for _, n in pairs],
        "bf16 head, torch": lambda xs: xs[HIDDEN] @ torch_head,
        "bf16 head, compiled": lambda xs: native_head.times(xs[HIDDEN]),
    }
    if args.against:
        kernels[f"q4 layers, {args.against.name}"] = lambda xs: [other.q4(xs[n.in_features], n.nibbles, n.dm) for _, n in pairs]
        kernels[f"bf16 head, {args.against.name}"] = lambda xs: other.bf16(xs[HIDDEN], rows)
    ms = [int(v) for v in args.ms.split(",")]
    best = {(name, m): float("inf") for name in kernels for m in ms}
    for m in ms:
        xs = {k: torch.randn(m, k, generator=gen).bfloat16() for k in (576, 1536)}
        for round_ in range(-1, args.rounds):   # round -1 warms up
            for name, run in kernels.items():
                t0 = time.perf_counter()
                run(xs)
                if round_ >= 0:
                    best[name, m] = min(best[name, m], time.perf_counter() - t0)
    print("| kernel | " + " | ".join(f"M={m} ms" for m in ms) + " |")
    print("|---|" + "---:|" * len(ms))
    for name in kernels:
        print(f"| {name} | " + " | ".join(f"{best[name, m] * 1e3:.1f}" for m in ms) + " |")
    x8 = {k: torch.randn(8, k, generator=gen).bfloat16() for k in (576, 1536)}
    print(f"\nrow-exact at 8 rows: q4 compiled {row_exact(pairs[0][1].times, x8[576])}, "
          f"q4 torch {row_exact(lambda x: x @ pairs[0][0], x8[576])}, "
          f"head compiled {row_exact(native_head.times, x8[HIDDEN])}, head torch {row_exact(lambda x: x @ torch_head, x8[HIDDEN])}")
    if args.against:
        q = torch.randint(0, 16, (3072, 576), generator=gen)   # a gate_up matrix, dequantized in fp32
        scale = torch.rand(3072, 18, generator=gen).half().float() * 0.02
        zero = 8 * scale - torch.rand(3072, 18, generator=gen).half().float() * 0.1
        n = NativeQ4.from_q4(q, scale, zero, kernel)
        w = (q - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)   # [out, in]
        x = (torch.randn(16, 576, generator=gen) * torch.randn(16, 576, generator=gen).exp()).bfloat16()
        dense = x.float() @ w.t()
        ours, theirs = n.times(x).float(), other.q4(x, n.nibbles, n.dm).float()
        rel = lambda y: ((y - dense).norm() / dense.norm()).item()   # noqa: E731
        print(f"{args.against.name}: row-exact at 8 rows {row_exact(lambda x: other.q4(x, n.nibbles, n.dm), x8[576])}; "
              f"q4 outputs equal to this tree's {(ours == theirs).float().mean().item():.2%}, error against the "
              f"dequantized product {rel(theirs):.2e} vs this tree's {rel(ours):.2e}")


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("row_matmul"):
        main()
