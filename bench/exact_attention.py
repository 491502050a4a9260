"""A prototype for exact half-precision verification that does not re-read keys per row: one C++
kernel (torch's cpp_extension, compiled at first run into out/exact_attention_build; needs a C++
compiler and ninja) attends n causal queries over a layer's keys and values, reading each key once
for all rows, with a per-row summation order that does not depend on n, so a row rounds exactly as
a one-query call. Checks that (rows vs one-row calls, bit for bit; distance from fp32 SDPA) and
times it against the path the decoder takes today (LlamaModel.attend_one per row, over fp32 copies
of the keys), SmolLM2-135M's attention shape (3 KV heads, 3 queries each, head_dim 64, bf16 KV),
512 keys. Not used by the engine: the kernel's loops are naive (no register blocking), and it is
slower than today's path until they are not (28 Nov, Zen 4 host, per layer: 116 µs at n = 1 and
481 at n = 6, against 83 and 346; results in bench/results/exact_attention_zen4_2026-11-28.txt).
Usage: python bench/exact_attention.py
"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.profiling.machine import cpu_name  # noqa: E402

KERNEL = r'''
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
// exp for x <= 0 (softmax after subtracting the max): Cephes-style range reduction + polynomial,
// written so the compiler vectorizes the loop over keys identically for every row.
static inline float exp_neg(float x) {
  x = x < -87.f ? -87.f : x;
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f; p = p * r + 8.3334519073E-3f; p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f; p = p * r + 5.0000001201E-1f;
  float y = p * r2 + r + 1.0f;
  int32_t e = (int32_t)fx + 127;
  float s; int32_t bits = e << 23; std::memcpy(&s, &bits, 4);
  return y * s;
}
template <typename KV>
static inline float tof(KV v);
template <> inline float tof<float>(float v) { return v; }
template <> inline float tof<at::BFloat16>(at::BFloat16 v) { return (float)v; }

template <typename KV>
void run(const float* q, const KV* k, const KV* v, float* out, int64_t Hkv, int64_t n, int64_t G, int64_t D,
         int64_t S, int64_t kv_head_stride, int64_t kv_row_stride, float scale) {
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> kf(D), vf(D), scores;
    for (int64_t h = h0; h < h1; ++h) {
      const KV* kh = k + h * kv_head_stride; const KV* vh = v + h * kv_head_stride;
      scores.assign(n * G * S, 0.f);
      // scores: key j outer (read once), each row that sees it inner; row i sees S - n + i + 1 keys
      for (int64_t j = 0; j < S; ++j) {
        for (int64_t d = 0; d < D; ++d) kf[d] = tof<KV>(kh[j * kv_row_stride + d]);
        int64_t first = j - (S - n); if (first < 0) first = 0;
        for (int64_t i = first; i < n; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const float* qq = q + ((h * n + i) * G + g) * D;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t d = 0; d < D; ++d) acc += qq[d] * kf[d];
            scores[(i * G + g) * S + j] = acc * scale;
          }
      }
      std::vector<float> denom(n * G);
      for (int64_t i = 0; i < n; ++i) {
        int64_t L = S - n + i + 1;
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + (i * G + g) * S;
          float m = -INFINITY;
          for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
          float sum = 0.f;
          #pragma omp simd reduction(+:sum)
          for (int64_t j = 0; j < L; ++j) { s[j] = exp_neg(s[j] - m); sum += s[j]; }
          denom[i * G + g] = sum;
        }
      }
      float* o = out + h * n * G * D;
      for (int64_t x = 0; x < n * G * D; ++x) o[x] = 0.f;
      for (int64_t j = 0; j < S; ++j) {
        for (int64_t d = 0; d < D; ++d) vf[d] = tof<KV>(vh[j * kv_row_stride + d]);
        int64_t first = j - (S - n); if (first < 0) first = 0;
        for (int64_t i = first; i < n; ++i)
          for (int64_t g = 0; g < G; ++g) {
            float p = scores[(i * G + g) * S + j];
            float* oo = o + (i * G + g) * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) oo[d] += p * vf[d];
          }
      }
      for (int64_t i = 0; i < n * G; ++i) { float inv = denom[i]; for (int64_t d = 0; d < D; ++d) o[i * D + d] /= inv; }
    }
  });
}

torch::Tensor attend_rows(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  // q [Hkv, n, G, D] fp32 contiguous; k, v [Hkv, S, D] with unit stride in D
  auto Hkv = q.size(0), n = q.size(1), G = q.size(2), D = q.size(3), S = k.size(1);
  auto out = torch::empty_like(q);
  if (k.scalar_type() == at::kBFloat16)
    run<at::BFloat16>(q.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), out.data_ptr<float>(),
        Hkv, n, G, D, S, k.stride(0), k.stride(1), (float)scale);
  else
    run<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
        Hkv, n, G, D, S, k.stride(0), k.stride(1), (float)scale);
  return out;
}
'''


def median_us(fn, reps=300):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e6


def main():
    from torch.utils.cpp_extension import load_inline

    build = ROOT / "out" / "exact_attention_build"
    build.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ext = load_inline("specmemo_exact_attention", cpp_sources=[KERNEL], functions=["attend_rows"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-fast-math"],
                      build_directory=str(build))
    print(f"host: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"kernel ready in {time.time() - t0:.1f} s")
    Hkv, G, D = 3, 3, 64
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(0)
    differ = rows = 0
    worst = 0.0
    for _ in range(30):
        S = int(torch.randint(20, 1500, (), generator=gen))
        n = int(torch.randint(2, 17, (), generator=gen))
        K = torch.randn(Hkv, S, D, generator=gen).bfloat16()
        V = torch.randn(Hkv, S, D, generator=gen).bfloat16()
        q = torch.randn(Hkv, n, G, D, generator=gen)
        out = ext.attend_rows(q, K, V, scale)
        for i in range(n):
            L = S - n + 1 + i
            rows += 1
            differ += not torch.equal(ext.attend_rows(q[:, i : i + 1].contiguous(), K[:, :L], V[:, :L], scale),
                                      out[:, i : i + 1])
        mask = torch.ones(n, S, dtype=torch.bool).tril(S - n).repeat_interleave(G, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(Hkv, n * G, D), K.float(), V.float(), attn_mask=mask, scale=scale).view(Hkv, n, G, D)
        worst = max(worst, float((ref - out).abs().max()))
    print(f"rows differing from a one-query call: {differ}/{rows}; max |diff| from fp32 SDPA {worst:.1e}")

    def today(q, K, V):   # LlamaModel.attend_one per row over fp32 copies (LlamaModel.widen)
        Kf, Vf = K.float(), V.float()
        S, n = K.shape[1], q.shape[1]
        for i in range(n):
            L = S - n + 1 + i
            s = torch.bmm(q[:, i], Kf[:, :L].transpose(1, 2)).mul_(scale)
            torch.bmm(torch.softmax(s, dim=-1), Vf[:, :L])

    K = torch.randn(Hkv, 1024, D, generator=gen).bfloat16()
    V = torch.randn(Hkv, 1024, D, generator=gen).bfloat16()
    print("| queries n | kernel µs | per-row bmm µs (today) |")
    print("|---:|---:|---:|")
    for n in (1, 2, 6, 16):
        q = torch.randn(Hkv, n, G, D, generator=gen)
        S = 512 + n - 1
        print(f"| {n} | {median_us(lambda: ext.attend_rows(q, K[:, :S], V[:, :S], scale)):.0f} | "
              f"{median_us(lambda: today(q, K[:, :S], V[:, :S])):.0f} |", flush=True)


if __name__ == "__main__":
    main()
