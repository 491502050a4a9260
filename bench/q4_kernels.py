"""One pass over all of SmolLM2-135M's matmuls (30 layers, distinct weights per layer, as in
decoding) for M = 1..16 tokens: dense fp32 and bf16 (torch's matmul, and oneDNN's linear on a
weight packed once into its blocked layout, as models/quant.PackedMatrix holds the LM head) against
torch's packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group 32) with fp32 and bf16
activations. Prints ms per pass. The device profile's kernel choice for q4 comes from this (see
profiles/devices/cpu.toml); each column's t(M)/t(1) is a floor under the verification cost curve
C(n) of a forward with those weights, whatever runs around the matmuls.

Usage: python bench/q4_kernels.py [--ms 1,2,4,6,8,16] [--repeats 20]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.host import cpu_name  # noqa: E402

# (in, out) of one layer's four matmuls in decoding layout (q/k/v fused, gate/up fused), and the LM head.
LAYER = [(576, 576 + 2 * 192), (576, 576), (576, 2 * 1536), (1536, 576)]
HEAD = (576, 49152)
LAYERS, GROUP = 30, 32


def packed(k: int, n: int):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    return torch._convert_weight_to_int4pack_for_cpu(q, 2), torch.randn(k // GROUP, n, 2) * 0.01


def packed_all(pack, ws):
    """ws packed for oneDNN, or None where this torch or CPU has no such kernel (bf16 wants
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if pack is None:
        return None
    try:
        return [pack(w) for w in ws]
    except RuntimeError as e:
        print(f"no packed {ws[0].dtype} here: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,2,4,6,8,16")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    shapes = LAYER * LAYERS + [HEAD]
    dense = [torch.randn(k, n) * 0.02 for k, n in shapes]
    dense_bf16 = [w.to(torch.bfloat16) for w in dense]
    onednn = torch.backends.mkldnn.is_available()
    # [out, in] packed once; the product then runs without reordering the weight per call.
    pack = (lambda w: torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 1)) if onednn else None
    linear = lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")
    q4 = [packed(k, n) for k, n in shapes]
    q4_bf16 = [(p, s.to(torch.bfloat16)) for p, s in q4]
    kinds = [(dense, torch.float32), (dense_bf16, torch.bfloat16)]
    packs = [packed_all(pack, ws) for ws, _ in kinds]
    print(f"host: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per pass over {len(shapes)} matmuls")
    print("| M | fp32 | bf16 | fp32 packed | bf16 packed | q4 (fp32 act.) | q4 (bf16 act.) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for m in [int(v) for v in args.ms.split(",")]:
        row = []
        for ws, dt in kinds:
            xs = {k: torch.randn(m, k).to(dt) for k, _ in shapes}
            row.append(timed(lambda: [xs[w.shape[0]] @ w for w in ws], args.repeats))
        for (ws, dt), ps in zip(kinds, packs):
            if ps is None:   # no oneDNN in this torch, or no oneDNN kernel for this dtype on this CPU
                row.append(float("nan"))
                continue
            xs = {k: torch.randn(m, k).to(dt) for k, _ in shapes}
            row.append(timed(lambda: [linear(xs[w.shape[0]], p) for w, p in zip(ws, ps)], args.repeats))
        for ws, dt in [(q4, torch.float32), (q4_bf16, torch.bfloat16)]:
            xs = {k: torch.randn(m, k).to(dt) for k, _ in shapes}
            row.append(timed(lambda: [torch._weight_int4pack_mm_for_cpu(xs[k], p, GROUP, s)
                                      for (k, _), (p, s) in zip(shapes, ws)], args.repeats))
        print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("q4_kernels"):
        main()
