/* Int8-weight GEMV for a few rows of activations: the batch-1 decode step of a quantized model.
 *
 * Why it exists: at one row, torch's int8 kernels are compute-bound (`_weight_int8pack_mm` streams ~7 GB/s
 * of weights on one Zen 4 thread, `_int_mm` no better), while one row should stream weights as fast as
 * memory allows. Here each weight is read once per call, widened in registers and multiplied with
 * integer dot-product instructions, so the loop is bound by memory, not arithmetic (docs/benchmarks.md).
 *
 * Two products, both y[m, n] = wscale[n] * sum_k x[m, k] * w[n, k], w int8 [N, K] row-major,
 * x and y fp32 row-major:
 *  - llmc_w8a16: weight-only int8. Each block of 128 activations of a row is quantized to 15-bit integers
 *    with its own scale (max |x| / 16383), so the activations keep at least the precision bf16 would give
 *    them in any block without extreme outliers, and every product and block sum fits int32 exactly.
 *  - llmc_w8a8: int8 activations with one scale per row, exactly what the W8A8 layers compute with
 *    `torch._int_mm` (same codes, same int32 sums): `xscale` given (static) or max |x| / 127 (dynamic).
 * Rows are split across `nthreads` OpenMP threads by output channel; for each weight row every activation
 * row is done while the weight row sits in L1.
 *
 * Instruction sets: AVX512-VNNI (vpdpwssd / vpdpbusd), else AVX2 (vpmaddwd), else plain C; the same
 * integers in every case, and (with -ffp-contract=off) the same float steps: every build returns the same
 * numbers. Compiled on first use by llmcycle/optimize/gemv.py with -march=native.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 128
#define QMAX16 16383.0f

int llmc_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

/* max |x[k]|, NaN when any x[k] is NaN (as torch's amax; fmaxf alone would skip it) */
static inline float abs_max(const float *x, int64_t n) {
  float amax = 0.0f;
  int nan = 0;
  for (int64_t k = 0; k < n; k++) {
    nan |= isnan(x[k]);
    amax = fmaxf(amax, fabsf(x[k]));
  }
  return nan ? NAN : amax;
}

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
/* the sum of a vector's eight int32 lanes */
static inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

/* sum_k a[k] * w[k] over n <= BLOCK elements: int16 activations, int8 weights, exact in int32 */
static inline int32_t dot_s16_s8(const int16_t *a, const int8_t *w, int64_t n) {
  int64_t k = 0;
  int32_t acc = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i v = _mm512_setzero_si512();
  for (; k + 32 <= n; k += 32)
    v = _mm512_dpwssd_epi32(v, _mm512_loadu_si512((const void *)(a + k)),
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k))));
  acc = _mm512_reduce_add_epi32(v);
#elif defined(__AVX2__)
  __m256i v = _mm256_setzero_si256();
  for (; k + 16 <= n; k += 16)
    v = _mm256_add_epi32(v, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(a + k)),
                                              _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)))));
  acc = hsum_avx2(v);
#endif
  for (; k < n; k++) acc += (int32_t)a[k] * (int32_t)w[k];
  return acc;
}

/* sum_k a[k] * w[k] over a whole row of int8s, wsum = sum_k w[k]. With VNNI the activations are made
   unsigned for vpdpbusd (a + 128) and 128 * wsum is taken off again; sums of K * 255 * 128 fit int32 for
   K < 65000. */
static inline int32_t dot_s8_s8(const int8_t *a, const int8_t *w, int64_t n, int32_t wsum) {
  int64_t k = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const __m512i off = _mm512_set1_epi8((char)0x80);
  __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
  for (; k + 128 <= n; k += 128) {
    v0 = _mm512_dpbusd_epi32(v0, _mm512_xor_si512(_mm512_loadu_si512((const void *)(a + k)), off),
                             _mm512_loadu_si512((const void *)(w + k)));
    v1 = _mm512_dpbusd_epi32(v1, _mm512_xor_si512(_mm512_loadu_si512((const void *)(a + k + 64)), off),
                             _mm512_loadu_si512((const void *)(w + k + 64)));
  }
  for (; k + 64 <= n; k += 64)
    v0 = _mm512_dpbusd_epi32(v0, _mm512_xor_si512(_mm512_loadu_si512((const void *)(a + k)), off),
                             _mm512_loadu_si512((const void *)(w + k)));
  int32_t acc = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
  for (; k < n; k++) acc += ((int32_t)a[k] + 128) * (int32_t)w[k];
  return acc - 128 * wsum;
#else
  int32_t acc = 0;
#if defined(__AVX2__)
  __m256i v = _mm256_setzero_si256();
  for (; k + 16 <= n; k += 16)
    v = _mm256_add_epi32(v, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + k))),
                                              _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)))));
  acc = hsum_avx2(v);
#endif
  (void)wsum;
  for (; k < n; k++) acc += (int32_t)a[k] * (int32_t)w[k];
  return acc;
#endif
}

/* weight-only int8; scratch: M * K int16 codes and M * ceil(K / BLOCK) floats of block scales */
void llmc_w8a16(const float *x, const int8_t *w, const float *wscale, float *y,
                int64_t M, int64_t N, int64_t K, int nthreads, int16_t *xq, float *xs) {
  const int64_t nb = (K + BLOCK - 1) / BLOCK;
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < nb; b++) {
      const float *src = x + m * K + b * BLOCK;
      const int64_t len = (b + 1) * BLOCK <= K ? BLOCK : K - b * BLOCK;
      const float amax = abs_max(src, len);
      const float s = amax > 0.0f ? amax / QMAX16 : 1.0f;
      /* a block with inf or NaN gives NaN outputs, as a float product would, and no undefined cast */
      const int finite = isfinite(amax);
      xs[m * nb + b] = finite ? s : NAN;
      for (int64_t k = 0; k < len; k++)
        xq[m * K + b * BLOCK + k] = finite ? (int16_t)nearbyintf(src[k] / s) : 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const int8_t *wr = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; b++) {
        const int64_t len = (b + 1) * BLOCK <= K ? BLOCK : K - b * BLOCK;
        acc += xs[m * nb + b] * (float)dot_s16_s8(xq + m * K + b * BLOCK, wr + b * BLOCK, len);
      }
      y[m * N + n] = acc * wscale[n];
    }
  }
}

/* int8 x int8; xscale: one scale for all rows (static) or NULL (dynamic, per row into xs[M]);
   wsum[n] = sum_k w[n, k]; scratch xq: M * K int8 */
void llmc_w8a8(const float *x, const float *xscale, const int8_t *w, const float *wscale, const int32_t *wsum,
               float *y, int64_t M, int64_t N, int64_t K, int nthreads, int8_t *xq,
               float *xs) {
  for (int64_t m = 0; m < M; m++) {
    const float *src = x + m * K;
    float s;
    if (xscale) {
      s = xscale[0];
    } else {
      const float amax = abs_max(src, K);
      s = (isnan(amax) ? amax : fmaxf(amax, FLT_MIN)) / 127.0f; /* as quantize.py: amax.clamp(min=tiny) / 127 */
    }
    xs[m] = s;
    for (int64_t k = 0; k < K; k++) {
      const float q = nearbyintf(src[k] / s);
      xq[m * K + k] = isnan(q) ? 0 : (int8_t)(q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q));
    }
  }
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const int8_t *wr = w + n * K;
    for (int64_t m = 0; m < M; m++) {
      const int32_t acc = dot_s8_s8(xq + m * K, wr, K, wsum[n]);
      y[m * N + n] = (float)acc * xs[m] * wscale[n];
    }
  }
}
