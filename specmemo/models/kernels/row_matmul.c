/* Matrix products for a q4 model on an AVX2 CPU whose every output row rounds exactly as that
 * row multiplied alone (models/kernels/native.py builds it; models/quant.NativeQ4 and NativeHead call it).
 *
 * Why: on an AVX2-only CPU torch's int4 kernel costs nearly in proportion to its rows (a pass over
 * SmolLM2's layers: 11.7 ms at 1 row, 31.0 at 6) and its bf16 LM head 5.0 ms a row, so verifying
 * k tokens cost nearly k one-token steps. Here each weight is read once per product, for all rows.
 *
 * Exactness: every output y[r][n] is one fixed chain, the same instructions for a row whatever
 * the row count or tile, so a verification row equals the one-token step's bits.
 * - bf16 head: weights widened to fp32 (exact); four fp32 accumulators over the inputs in order
 *   (input i to accumulator (i / 8) % 4, lane i % 8), added as (a0 + a1) + (a2 + a3), then lane by
 *   lane in a fixed tree.
 * - q4: each row quantized to int16 per group of 32 (dx = max|x| / 32767: finer than the bf16 it
 *   comes in); per group the integer dot product with the nibbles (exact), times d * dx into one
 *   fp32 accumulator in group order, plus m * sx (sx = dx * sum(xq)) in the row's lane of another.
 * Columns are split across OpenMP threads (torch's own pool: libgomp is loaded by torch under the
 * same soname); a column is never split.
 *
 * Shapes: x [M, K] bf16 (row stride K); q4: nibbles [N, K/2] (GGUF order: in each group of 32,
 * element j is the low nibble of byte j, element j + 16 its high nibble), dm [N, K/32, 2] fp16
 * (w = q * d + m, Q4_1's form); bf16: w [N, K]; y [M, N] (row stride ldy) bf16 (q4) or fp32
 * (bf16 head). K a multiple of 32, at most MAX_K.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "row_matmul.c needs AVX2, FMA and F16C"
#endif

#define MAX_K 8192
#define MAX_M 256 /* rows a call takes */
#define TILE 3    /* bf16: rows per pass over a widened column, 12 accumulators in registers */
#define Q8_TILE 8 /* q4: rows per pass over a column */

static inline float hsum(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);                                            /* nearest, ties to even */
  return (uint16_t)(u >> 16);
}

static void widen_rows(const uint16_t* x, int64_t count, float* out) {
  for (int64_t i = 0; i < count; i++) {
    uint32_t u = (uint32_t)x[i] << 16;
    memcpy(out + i, &u, 4);
  }
}

/* y[r] = w . x[r] for rows r0..r0+R-1 over a column already widened to fp32 in w[K]. */
static inline __attribute__((always_inline)) void dot_rows(const float* w, const float* x, int64_t K, int R,
                                                           float* out) {
  __m256 a[TILE][4];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++) a[r][j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < K; i += 32)
    for (int j = 0; j < 4; j++) {
      __m256 wj = _mm256_loadu_ps(w + i + 8 * j);   /* one weight vector for the tile's rows */
      for (int r = 0; r < R; r++) a[r][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x + r * K + i + 8 * j), a[r][j]);
    }
  for (int r = 0; r < R; r++) out[r] = hsum(a[r][0], a[r][1], a[r][2], a[r][3]);
}

/* All rows of x times one widened column: tiles of TILE rows (constant R: kept in registers). */
static inline __attribute__((always_inline)) void column(const float* w, const float* x, int64_t M, int64_t K, float* out) {
  int64_t r = 0;
  for (; r + TILE <= M; r += TILE) dot_rows(w, x + r * K, K, TILE, out + r);
  if (M - r == 2) dot_rows(w, x + r * K, K, 2, out + r);
  else if (M - r == 1) dot_rows(w, x + r * K, K, 1, out + r);
}

static inline void widen_bf16(const uint16_t* src, int64_t K, float* w) {
  for (int64_t i = 0; i < K; i += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i)));
    _mm256_storeu_ps(w + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
}


/* Rows quantized to 16 bits per group of 32 (finer than the bf16 they come in): per row r and
   group g, dx = max|x| / 32767, xq = x / dx rounded to nearest (ties to even) in int16, sx = dx *
   sum(xq); stored group-major (xq [G, M, 32], dx and sx [G, M]) so that a tile's rows sit at fixed
   offsets. Vectors of 8, the same instructions for every row. */
static void quantize_rows(const uint16_t* x, int64_t M, int64_t K, int16_t* xq, float* dx, float* sx) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = 0; r < M; r++)
    for (int64_t g = 0; g < K / 32; g++) {
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; j++) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(x + r * K + g * 32 + 8 * j)));
        v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], absmask));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      float top = _mm_cvtss_f32(h), d = top / 32767.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      __m256 vi = _mm256_set1_ps(inv);
      const __m256i hi_q = _mm256_set1_epi32(32767), lo_q = _mm256_set1_epi32(-32767);
      __m256i q[4], total = _mm256_setzero_si256();
      for (int j = 0; j < 4; j++) {
        q[j] = _mm256_max_epi32(lo_q, _mm256_min_epi32(hi_q, _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vi))));
        total = _mm256_add_epi32(total, q[j]);
      }
      /* packs works within 128-bit halves: put the 16 values of each pair back in order */
      int16_t* dst = xq + (g * M + r) * 32;
      for (int j = 0; j < 4; j += 2)
        _mm256_storeu_si256((__m256i*)(dst + 8 * j),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(q[j], q[j + 1]), 0xd8));
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
      dx[g * M + r] = d;
      sx[g * M + r] = d * (float)_mm_cvtsi128_si32(t);
    }
}

/* 32 nibbles of group g as 32 int16 0..15 in element order (two vectors), and the group's d and m. */
static inline __attribute__((always_inline)) void q4_group(const uint8_t* nib, const uint16_t* dm, int64_t g,
                                                           __m256i* lo, __m256i* hi, float* d, float* m) {
  __m128i b = _mm_loadu_si128((const __m128i*)(nib + g * 16));
  __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t*)(dm + 2 * g)));
  *d = _mm_cvtss_f32(dmf), *m = _mm_cvtss_f32(_mm_movehdup_ps(dmf));
  const __m128i low = _mm_set1_epi8(0x0f);
  *lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
  *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
}

/* One group's exact integer dot product (int16 pairs summed into int32: 32 * 15 * 32767 fits) as 8
   fp32 partial sums. */
static inline __attribute__((always_inline)) __m256 q4_dot(__m256i lo, __m256i hi, const int16_t* xq) {
  __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)xq)),
                               _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + 16))));
  return _mm256_cvtepi32_ps(p);
}

/* Rows r0..r0+R-1 (quantized, M in all) times one q4 column: each group's dot product scaled by
   d * dx into the row's accumulator, and m * sx into the row's lane of s, in group order (the
   lanes of one vector: sx holds a group's rows side by side; lanes past R are never read out). */
static inline __attribute__((always_inline)) void q4_rows(const uint8_t* nib, const uint16_t* dm, const int16_t* xq,
                                                          const float* dx, const float* sx, int64_t M, int64_t r0,
                                                          int64_t K, int R, float* out) {
  const int64_t G = K / 32;
  __m256 a[Q8_TILE], s = _mm256_setzero_ps();
  for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    float d, m;
    __m256i lo, hi;
    q4_group(nib, dm, g, &lo, &hi, &d, &m);
    const int16_t* xg = xq + (g * M + r0) * 32;
    const float* dg = dx + g * M + r0;
    for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(q4_dot(lo, hi, xg + 32 * r), _mm256_set1_ps(d * dg[r]), a[r]);
    s = _mm256_fmadd_ps(_mm256_set1_ps(m), _mm256_loadu_ps(sx + g * M + r0), s);
  }
  float sr[8];
  _mm256_storeu_ps(sr, s);
  for (int r = 0; r < R; r++) out[r] = hsum(a[r], _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()) + sr[r];
}

/* All M rows times one q4 column, in tiles of Q8_TILE rows and one tile of the rest (each tile
   size compiled on its own, so its accumulators stay in registers). */
static inline void q4_column(const uint8_t* nib, const uint16_t* dm, const int16_t* xq, const float* dx,
                             const float* sx, int64_t M, int64_t K, float* out) {
  int64_t r = 0;
  for (; r + Q8_TILE <= M; r += Q8_TILE) q4_rows(nib, dm, xq, dx, sx, M, r, K, Q8_TILE, out + r);
#define REST(n) case n: q4_rows(nib, dm, xq, dx, sx, M, r, K, n, out + r); break;
  switch (M - r) { REST(1) REST(2) REST(3) REST(4) REST(5) REST(6) REST(7) }
#undef REST
}

/* work: 2*M*K + 8*M*(K/32) + 32 bytes (the rows in int16, their dx and sx, slack). Returns 0, or 1
   when the shapes are out of range. */
int q4_matmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint8_t* nib, const uint16_t* dm,
              uint16_t* y, int64_t ldy, void* work) {
  if (K % 32 || K > MAX_K || M < 1 || M > MAX_M) return 1;
  float* dx = (float*)work;
  float* sx = dx + M * (K / 32);
  int16_t* xq = (int16_t*)(sx + M * (K / 32) + 8);   /* 8 floats of slack: s's lanes past the rows */
  quantize_rows(x, M, K, xq, dx, sx);
#pragma omp parallel
  {
    float out[MAX_M];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      q4_column(nib + n * (K / 2), dm + n * (K / 16), xq, dx, sx, M, K, out);
      for (int64_t r = 0; r < M; r++) y[r * ldy + n] = to_bf16(out[r]);
    }
  }
  return 0;
}

int bf16_matmul(const uint16_t* x, int64_t M, int64_t K, int64_t N, const uint16_t* wt, float* y, int64_t ldy,
                float* work) {
  if (K % 32 || K > MAX_K || M < 1 || M > MAX_M) return 1;
  widen_rows(x, M * K, work);
#pragma omp parallel
  {
    float w[MAX_K] __attribute__((aligned(32)));
    float out[MAX_M];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      widen_bf16(wt + n * K, K, w);
      column(w, work, M, K, out);
      for (int64_t r = 0; r < M; r++) y[r * ldy + n] = out[r];
    }
  }
  return 0;
}
