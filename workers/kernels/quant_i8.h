// linear_q with x quantized to int8 per block of 32 (llama.cpp's way: part of quant.h).
//
// Each row of x is quantized on its own, block by block: d = max|x| / 127, q = x / d
// rounded to nearest (even), s = d * sum(q) (for Q4_1's minimum): a row's int8 blocks never
// depend on the other rows. Then each block's dot product with a weight block is exact
// integer arithmetic (AVX-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd: the same integers),
// scaled once a block (quant_i8_block.h). Faster than de-quantizing the weights to float32
// where the product is compute-bound (1-2 rows), at the price of x's rounding to 8 bits a
// value (relative to its block's largest): llama.cpp's numbers, not the float model's.
#pragma once

namespace {

// A block of 32 values of a row of x: int8 values, their scale and their scaled sum.
struct XBlock {
  int8_t q[32];
  float d;  // x ~ d * q
  float s;  // d * (sum of q), exact in float32 (|sum| <= 4064)
};

// rows (n, blocks * 32) float32 -> (n, blocks) XBlock, each block as the comment above says.
void quantize_rows(const float* x, int64_t n, int64_t blocks, XBlock* out) {
  for (int64_t i = 0; i < n * blocks; ++i) {
    const float* v = x + i * 32;
    __m256 amax = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int j = 0; j < 4; ++j) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(v + 8 * j), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d = _mm_cvtss_f32(m4) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), _mm256_set1_ps(id)));
    // int32 -> int8, then the order put back (packs interleave 128-bit halves)
    const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i].q), q8);
    const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    out[i].d = d;
    out[i].s = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

namespace qi8 {

// A weight block as 32 bytes in the order of its weights, and its scales.
struct Q4_1 {
  static constexpr int64_t kBytes = 20;
  static constexpr bool kSigned = false, kMinimum = true;
  static inline __m256i weights(const uint8_t* b) {  // 0..15: low nibbles are weights 0-15, high ones 16-31
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
  }
  static inline void scales(const uint8_t* b, float& d, float& m) { d = quant::half_to_float(b), m = quant::half_to_float(b + 2); }
};

struct Q5_0 {
  static constexpr int64_t kBytes = 22;
  static constexpr bool kSigned = true, kMinimum = false;
  static inline __m256i weights(const uint8_t* b) {  // q - 16 in -16..15: nibbles as Q4_1's, fifth bits from 4 bytes
    uint32_t fifth;
    std::memcpy(&fifth, b + 2, 4);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
    // byte i = 0xFF where bit i of `fifth` is set (byte i takes byte i / 8 of it, then every
    // bit but bit i % 8 is set: all ones iff that bit was)
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(fifth)),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
    return _mm256_sub_epi8(_mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10))), _mm256_set1_epi8(16));
  }
  static inline void scales(const uint8_t* b, float& d, float& m) { d = quant::half_to_float(b), m = 0.f; }
};

struct Q8_0 {
  static constexpr int64_t kBytes = 34;
  static constexpr bool kSigned = true, kMinimum = false;
  static inline __m256i weights(const uint8_t* b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)); }
  static inline void scales(const uint8_t* b, float& d, float& m) { d = quant::half_to_float(b), m = 0.f; }
};

}  // namespace qi8

namespace qi8avx2 {
using qi8::Q4_1;
using qi8::Q5_0;
using qi8::Q8_0;
using quant::kBlock;
// 32 u8 x s8 products, 4 adjacent ones summed into each int32 lane (pairs into int16 first:
// |15 * 127 * 2|, |16 * 127 * 2| and |128 * 127 * 2| fit, so nothing saturates).
inline __m256i dot(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
#include "quant_i8_block.h"
}  // namespace qi8avx2

#pragma GCC push_options
#pragma GCC target("avxvnni")
namespace qi8vnni {
using qi8::Q4_1;
using qi8::Q5_0;
using qi8::Q8_0;
using quant::kBlock;
inline __m256i dot(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#include "quant_i8_block.h"
}  // namespace qi8vnni
#pragma GCC pop_options

const bool avx_vnni_available = __builtin_cpu_supports("avxvnni");
bool avx_vnni_enabled = avx_vnni_available;  // use_vnni: tests cover the AVX2 dot products too

// The quantized rows against weights of format F: tiles by the number of rows.
template <class F>
void linear_q_int8(const XBlock* x, int64_t n, const uint8_t* w, int64_t blocks, float* y, int64_t m) {
  if (avx_vnni_enabled) {
    if (n <= 2) return qi8vnni::linear_blocks<2, 2, F>(x, blocks, n, w, blocks, y, m);
    return qi8vnni::linear_blocks<4, 2, F>(x, blocks, n, w, blocks, y, m);
  }
  if (n <= 2) return qi8avx2::linear_blocks<2, 2, F>(x, blocks, n, w, blocks, y, m);
  return qi8avx2::linear_blocks<4, 2, F>(x, blocks, n, w, blocks, y, m);
}

}  // namespace

// Turn the int8 variant's AVX-VNNI dot products on (where the CPU has them) or off (AVX2's,
// the same integers: tests check that); returns whether they are on.
bool use_vnni(bool enable) {
  avx_vnni_enabled = enable && avx_vnni_available;
  return avx_vnni_enabled;
}
