// linear_q's int8 block (part of quant_i8.h, no include guard): R rows of x, quantized per
// block of 32 (XBlock), against C weight rows of format F, compiled once per dot product
// (namespaces qi8avx2 and qi8vnni: the enclosing namespace's `dot`). Every output: per
// block, the exact integer dot product of the block's 32 weights and 32 x values (8 int32
// lanes of 4 products each: the same integers from either `dot`), to float32, times the
// product of the two scales, into 8 float32 lanes (FMA); Q4_1's minimum times the block's
// x sum into a scalar; blocks in ascending order; then the 8 lanes summed (hsum) plus the
// scalar. So AVX2 and VNNI CPUs give the same bits, and a row's bits never depend on the
// rows around it or the threads.

template <int R, int C, class F>
inline void block(const XBlock* x, int64_t ldx, const uint8_t* w, int64_t row_bytes, int64_t blocks, float* y, int64_t ldy) {
  __m256 acc[R][C];
  float minimum[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps(), minimum[r][c] = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i wq[C];
    float wd[C], wm[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const uint8_t* wb = w + c * row_bytes + b * F::kBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wb) + quant::kPrefetchBytes, _MM_HINT_T0);
      wq[c] = F::weights(wb);
      F::scales(wb, wd[c], wm[c]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const XBlock& xb = x[r * ldx + b];
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        // Q5_0's and Q8_0's weights are signed: |w| against x with w's sign (the same products).
        const __m256i products = F::kSigned ? dot(_mm256_sign_epi8(wq[c], wq[c]), _mm256_sign_epi8(xq, wq[c])) : dot(wq[c], xq);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(wd[c] * xb.d), acc[r][c]);
        if (F::kMinimum) minimum[r][c] += wm[c] * xb.s;
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) y[r * ldy + c] = hsum(acc[r][c]) + minimum[r][c];
}

#include "quant_tiles.h"
