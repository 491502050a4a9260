/* Attention for verification rows that rounds exactly as a one-query step (models/kernels/native.py builds
 * it; LlamaModel.attend calls it for every half-precision forward of up to 16 tokens).
 *
 * Every number a query produces is a fixed chain: a score is a dot product over head_dim in order,
 * its softmax sum runs over keys in order, and each output dim sums e_t * V_t over keys in order.
 * A key a row does not see contributes an exact 0 to that sum and output, so a row attended among
 * others (masked), or as a node of a candidate tree (its ancestors further along the store),
 * yields the bits of the same row attended alone over its own keys. Each key and value is read
 * once per KV head for all its queries: scores run 8 keys to a vector (tiles of keys transposed
 * in registers), outputs 8 head dims to a vector.
 *
 * Shapes (floats unless said): q [B, H, R, D] at the given strides, H = Hkv * G; keys/values
 * [B, Hkv, slots, D] (fp32 or bf16, row stride D); out [B, R, H, D] contiguous; prefix [R]: row r
 * sees keys 0..prefix[r]-1, then the keys extra[extra_at[r] .. extra_at[r+1]-1] (ascending).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 8 floats (one AVX2 register); unaligned loads and stores. The same instructions run for every
   row and row count, with no remainder loops (keys padded to 8, head_dim a multiple of 8), so
   however the compiler contracts a * b + c into fused multiply-adds it does so for every row. */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t h8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u8 __attribute__((vector_size(32), aligned(4)));

static inline v8 pick(i8 mask, v8 yes, v8 no) { return (v8)(((i8)yes & mask) | ((i8)no & ~mask)); }

static inline v8 exp_nonpositive(v8 x) {
  /* exp for x <= 0 (scores minus their max), -inf -> exactly 0: Cephes' range reduction and
     polynomial; 2^n from the exponent bits. */
  const v8 lo = (v8){0} - 87.0f;
  i8 under = x < lo;
  v8 c = pick(under, lo, x);
  v8 fx = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
  v8 r = c - fx * 0.693359375f + fx * 2.12194440e-4f;
  v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v8 y = p * (r * r) + r + 1.0f;
  i8 bits = (__builtin_convertvector(fx, i8) + 127) << 23;
  return pick(under, (v8){0}, y * (v8)bits);
}

/* 8 consecutive floats of a K/V row, widened from bf16 (exact: its bits are fp32's top half). */
static inline v8 load8(const void* row, int bf16, int64_t at) {
  if (bf16) return (v8)(__builtin_convertvector(*(const h8*)((const uint16_t*)row + at), u8) << 16);
  return *(const v8*)((const float*)row + at);
}

/* rows r[0..7] -> columns: c[i] = (r[0][i], ..., r[7][i]) */
static inline void transpose8(v8 r[8], v8 c[8]) {
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], (i8){0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], (i8){2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + j] = __builtin_shuffle(t[i + j], t[i + j + 2], (i8){0, 1, 8, 9, 4, 5, 12, 13});
      u[i + j + 2] = __builtin_shuffle(t[i + j], t[i + j + 2], (i8){2, 3, 10, 11, 6, 7, 14, 15});
    }
  /* u[0] = cols 0 and 4 of rows 0-3, u[2] = cols 1, 5, u[1] = cols 2, 6, u[3] = cols 3, 7 */
  static const int col[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    c[col[j]] = __builtin_shuffle(u[j], u[j + 4], (i8){0, 1, 2, 3, 8, 9, 10, 11});
    c[col[j] + 4] = __builtin_shuffle(u[j], u[j + 4], (i8){4, 5, 6, 7, 12, 13, 14, 15});
  }
}

static inline int64_t padded(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

#define GROUP 3   /* queries sharing one pass over the values */
#define CHUNK 4   /* vectors of head dims per pass (32 dims) */
#define MAX_QUERIES 128   /* rows x grouped heads per KV head */

/* Threads a call may use: torch's OpenMP pool (libgomp under the same soname) where built with it. */
static int threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/* Floats of one thread's work memory for S keys, head_dim D, R rows of G grouped heads. */
static int64_t block_floats(int64_t S, int64_t D, int64_t R, int64_t G) {
  return padded(S, 8) * D + padded(R * G, GROUP) * (padded(S, 8) + D + 1) + 8;
}

/* Floats of work memory attend_rows needs: a block for each thread it may use. */
long long attention_work_floats(long long S, long long D, long long R, long long G) {
  return block_floats(S, D, R, G) * threads();
}

/* Queries i0..i1-1 (i = r * G + g; i1 - i0 a multiple of GROUP, those past nq padding) of KV head h
   of batch row b. Each query's numbers are the same chains whichever queries share the pass. */
static void attend_queries(const float* q, long long qs_b, long long qs_h, long long qs_r, const char* kh,
                           const char* vh, int bf16, float* out, int64_t b, int64_t h, int64_t H, int64_t G,
                           int64_t R, int64_t D, int64_t S, int64_t i0, int64_t i1, int64_t nq,
                           const int32_t* prefix, const int32_t* extra_at, const int32_t* extra, float scale,
                           float* work) {
  const int64_t n = i1 - i0, sp = padded(S, 8);
  const size_t esize = bf16 ? 2 : 4;
  float* vf = work;                  /* [sp, D] this head's values in fp32 (bf16 stores) */
  float* qs = vf + sp * D;           /* [n, D] the queries, zero past nq */
  float* sc = qs + n * D;            /* [n, sp] scores, then exp */
  float* inv = sc + n * sp;          /* [n] 1 / softmax sum */
  for (int64_t l = 0; l < n; ++l) {
    const int64_t i = i0 + l, r = i / G, g = i % G;
    if (i < nq) memcpy(qs + l * D, q + b * qs_b + (h * G + g) * qs_h + r * qs_r, sizeof(float) * D);
    else memset(qs + l * D, 0, sizeof(float) * D);
  }
  /* scores, 8 keys a vector: a chain over d per key, tiles of 8 keys x 8 dims transposed */
  for (int64_t t0 = 0; t0 < sp; t0 += 8) {
    v8 acc[MAX_QUERIES];
    for (int64_t l = 0; l < n; ++l) acc[l] = (v8){0};
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      v8 rows[8], cols[8];
      for (int j = 0; j < 8; ++j)
        rows[j] = t0 + j < S ? load8(kh + (t0 + j) * D * esize, bf16, d0) : (v8){0};
      transpose8(rows, cols);
      for (int64_t l = 0; l < n; l += GROUP) {   /* GROUP chains in flight */
        v8 a[GROUP];
        for (int g = 0; g < GROUP; ++g) a[g] = acc[l + g];
        for (int j = 0; j < 8; ++j)
          for (int g = 0; g < GROUP; ++g) a[g] += qs[(l + g) * D + d0 + j] * cols[j];
        for (int g = 0; g < GROUP; ++g) acc[l + g] = a[g];
      }
    }
    for (int64_t l = 0; l < n; ++l) *(v8*)(sc + l * sp + t0) = acc[l] * scale;
  }
  /* keys a row does not see: -inf, so exp gives an exact 0 */
  for (int64_t l = 0; l < n && i0 + l < nq; ++l) {
    const int64_t r = (i0 + l) / G;
    for (int64_t t = prefix[r]; t < sp; ++t) {
      int seen = 0;
      for (int32_t e = extra_at[r]; e < extra_at[r + 1] && !seen; ++e) seen = extra[e] == t;
      if (!seen) sc[l * sp + t] = -__builtin_inff();
    }
  }
  /* softmax: the max is order-free; the sum runs over keys in order */
  for (int64_t l = 0; l < n; ++l) {
    if (i0 + l >= nq) {
      memset(sc + l * sp, 0, sizeof(float) * sp), inv[l] = 0.0f;
      continue;
    }
    float* s = sc + l * sp;
    v8 m = (v8){0} - __builtin_inff();
    for (int64_t t = 0; t < sp; t += 8) m = pick(*(v8*)(s + t) > m, *(v8*)(s + t), m);
    float top = m[0];
    for (int j = 1; j < 8; ++j) top = m[j] > top ? m[j] : top;
    for (int64_t t = 0; t < sp; t += 8) *(v8*)(s + t) = exp_nonpositive(*(v8*)(s + t) - top);
    float total = 0.0f;
    for (int64_t t = 0; t < S; ++t) total += s[t];
    inv[l] = 1.0f / total;
  }
  /* out = (sum_t e_t V_t) / sum, 8 head dims a vector, a chain over keys per dim; GROUP
     queries x CHUNK dims at a time, in registers. bf16 values are widened once into vf when
     several groups read them (exact), on the fly otherwise. */
  const void* vrows = vh;
  int vbf16 = bf16;
  if (bf16 && n / GROUP > 2) {
    for (int64_t t = 0; t < S; ++t)
      for (int64_t d0 = 0; d0 < D; d0 += 8) *(v8*)(vf + t * D + d0) = load8(vh + t * D * esize, 1, d0);
    vrows = vf, vbf16 = 0;
  }
  const size_t vsize = vbf16 ? 2 : 4;
  for (int64_t l0 = 0; l0 < n; l0 += GROUP)
    for (int64_t d0 = 0; d0 < D; d0 += 8 * CHUNK) {
      v8 acc[GROUP][CHUNK];
      for (int g = 0; g < GROUP; ++g)
        for (int j = 0; j < CHUNK; ++j) acc[g][j] = (v8){0};
      for (int64_t t = 0; t < S; ++t) {
        const char* vt = (const char*)vrows + t * D * vsize;
        v8 vv[CHUNK];
        for (int j = 0; j < CHUNK; ++j) vv[j] = load8(vt, vbf16, d0 + 8 * j);
        for (int g = 0; g < GROUP; ++g) {
          const float e = sc[(l0 + g) * sp + t];
          for (int j = 0; j < CHUNK; ++j) acc[g][j] += e * vv[j];
        }
      }
      for (int g = 0; g < GROUP && i0 + l0 + g < nq; ++g) {
        const int64_t i = i0 + l0 + g, r = i / G, gh = i % G;
        float* o = out + ((b * R + r) * H + h * G + gh) * D + d0;
        for (int j = 0; j < CHUNK; ++j) *(v8*)(o + 8 * j) = acc[g][j] * inv[l0 + g];
      }
    }
}

/* Returns 0, or 1 for a bad row description, 2 for a head_dim that is not a multiple of 32 (or
   over 256), 3 for more than MAX_QUERIES queries per KV head. The (batch row, KV head) pairs are
   split across threads, and each head's queries in pieces of whole GROUPs where the pairs alone
   would leave a thread idle (SmolLM2: 3 KV heads on 2 threads). */
int attend_rows(const float* q, long long qs_b, long long qs_h, long long qs_r,
                const void* keys, const void* values, int bf16, long long kv_b, long long kv_h,
                float* out, long long B, long long Hkv, long long G, long long R, long long D,
                long long S, const int32_t* prefix, const int32_t* extra_at, const int32_t* extra,
                float scale, float* work) {
  if (D % (8 * CHUNK) || D > 256) return 2;
  const int64_t nq = R * G, nqp = padded(nq, GROUP), H = Hkv * G;
  if (nqp > MAX_QUERIES) return 3;
  for (int64_t r = 0; r < R; ++r) {
    if (prefix[r] < 1 || prefix[r] > S) return 1;
    for (int32_t e = extra_at[r]; e < extra_at[r + 1]; ++e)
      if (extra[e] < prefix[r] || extra[e] >= S || (e > extra_at[r] && extra[e] <= extra[e - 1])) return 1;
  }
  const size_t esize = bf16 ? 2 : 4;
  const int T = threads();
  const int64_t groups = nqp / GROUP, heads = B * Hkv;
  const int64_t pieces = heads % T == 0 ? 1 : (groups < T ? groups : T);
  const int64_t items = heads * pieces, block = block_floats(S, D, R, G);
#pragma omp parallel for schedule(static) num_threads(items < T ? (int)items : T) if (T > 1 && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t bh = it / pieces, p = it % pieces, b = bh / Hkv, h = bh % Hkv;
    const int64_t i0 = groups * p / pieces * GROUP, i1 = groups * (p + 1) / pieces * GROUP;
#ifdef _OPENMP
    float* mine = work + block * omp_get_thread_num();
#else
    float* mine = work;
#endif
    attend_queries(q, qs_b, qs_h, qs_r, (const char*)keys + (b * kv_b + h * kv_h) * esize,
                   (const char*)values + (b * kv_b + h * kv_h) * esize, bf16, out, b, h, H, G, R, D, S,
                   i0, i1, nq, prefix, extra_at, extra, scale, mine);
  }
  return 0;
}
