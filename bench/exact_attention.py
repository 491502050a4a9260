"""Exact half-precision attention: the compiled kernel (models/kernels/exact_attention.c, built by
models/kernels/native.py) against the torch path (LlamaModel.attend_one, one query at a time over fp32
copies of the keys), SmolLM2-135M's attention shape (3 KV heads, 3 queries each, head_dim 64,
bf16 KV), per layer, by rows n and keys cached. Checks first that the kernel's rows equal one-row
calls bit for bit and how far they are from fp32 SDPA. The device profile's `native_attention`
records the outcome on the machine measured (profiles/devices/cpu.toml).
Usage: python bench/exact_attention.py
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.models.kernels import native  # noqa: E402
from specmemo.models.kernels.native import Rows  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402

Hkv, G, D = 3, 3, 64
SCALE = D ** -0.5


def median_us(fn, reps=300):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e6


def torch_rows(q, K, V):
    """Today's torch path for n causal rows: widen to fp32, then one query at a time."""
    Kf, Vf = K.float(), V.float()
    S, n = K.shape[2], q.shape[2]
    for i in range(n):
        end = S - n + 1 + i
        scores = torch.bmm(q[0, :, i].reshape(Hkv, G, D).float(), Kf[0, :, :end].transpose(1, 2)).mul_(SCALE)
        torch.bmm(torch.softmax(scores, dim=-1), Vf[0, :, :end])


def main():
    t0 = time.time()
    kernel = native.exact_attention()
    if kernel is None:
        sys.exit(f"no kernel: {native.why_not()}")
    print(f"host: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"kernel ready in {time.time() - t0:.1f} s ({kernel.path.name})")
    gen = torch.Generator().manual_seed(0)
    differ = rows = 0
    worst = 0.0
    for _ in range(30):
        S = int(torch.randint(20, 1500, (), generator=gen))
        n = int(torch.randint(2, 17, (), generator=gen))
        K = torch.randn(1, Hkv, S, D, generator=gen).bfloat16()
        V = torch.randn(1, Hkv, S, D, generator=gen).bfloat16()
        q = torch.randn(1, Hkv * G, n, D, generator=gen)
        out = kernel.attend(q, K, V, Rows.causal(S, n), SCALE)
        for i in range(n):
            end = S - n + 1 + i
            rows += 1
            alone = kernel.attend(q[:, :, i : i + 1], K[:, :, :end], V[:, :, :end], Rows.causal(end, 1), SCALE)
            differ += not torch.equal(alone[:, 0], out[:, i])
        mask = torch.ones(n, S, dtype=torch.bool).tril(S - n)
        ref = F.scaled_dot_product_attention(q, K.float(), V.float(), attn_mask=mask, scale=SCALE, enable_gqa=True)
        worst = max(worst, float((ref.transpose(1, 2) - out).abs().max()))
    print(f"rows differing from a one-row call: {differ}/{rows}; max |diff| from fp32 SDPA {worst:.1e}")
    K = torch.randn(1, Hkv, 4100, D, generator=gen).bfloat16()
    V = torch.randn(1, Hkv, 4100, D, generator=gen).bfloat16()
    print("| keys | rows n | kernel µs | torch µs (one query at a time) |")
    print("|---:|---:|---:|---:|")
    for cached in (512, 4000):
        for n in (1, 2, 6, 16):
            q = torch.randn(1, Hkv * G, n, D, generator=gen)
            S = cached + n - 1
            rows = Rows.causal(S, n)
            print(f"| {cached} | {n} | {median_us(lambda: kernel.attend(q, K[:, :, :S], V[:, :, :S], rows, SCALE)):.0f} | "
                  f"{median_us(lambda: torch_rows(q, K[:, :, :S], V[:, :, :S])):.0f} |", flush=True)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("exact_attention"):
        main()
