// The K formats' blocks for linear_q's float32-x variant (part of quant.h: included there
// after the 32-weight formats). A K block holds 256 weights: dequant(b, s, w) gives its
// s-th 32 (s = 0..7), exactly as gguf-py computes them (products and sums each rounded).
//
// Q4_K (144 bytes): float16 d, float16 dmin, 12 bytes of 6-bit scales sc and minimums mn
// for the 8 sub-blocks of 32, 128 bytes of nibbles (bytes 32c..32c+31 hold sub-block 2c in
// their low nibbles, 2c + 1 in their high ones); weight = (d * sc) * q - dmin * mn.
// Q6_K (210 bytes): 128 bytes of low nibbles ql, 64 of high 2 bits qh, 16 int8 scales (one
// per 16 weights), float16 d; weight = (d * scale) * (q - 32), q = low | high << 4.
#pragma once

namespace {
namespace quant {

// Q4_K's 6-bit scale and minimum of sub-block s (gguf-py's Q4_K.get_scale_min).
inline void q4k_scale_min(const uint8_t* scales, int s, int& sc, int& mn) {
  if (s < 4) {
    sc = scales[s] & 63, mn = scales[s + 4] & 63;
  } else {
    sc = (scales[s + 4] & 0xF) | ((scales[s - 4] >> 6) << 4);
    mn = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
  }
}

// Sub-block s's 32 quantized values (0..15 for Q4_K, 0..63 before - 32 for Q6_K), as bytes.
inline void q4k_values(const uint8_t* b, int s, uint8_t q[32]) {
  const uint8_t* qs = b + 16 + 32 * (s / 2);
  for (int i = 0; i < 32; ++i) q[i] = s % 2 ? qs[i] >> 4 : qs[i] & 0xF;
}
inline void q6k_values(const uint8_t* b, int s, uint8_t q[32]) {
  const int h = s / 4, t = s % 4;
  const uint8_t* ql = b + 64 * h + 32 * (t % 2);
  const uint8_t* qh = b + 128 + 32 * h;
  for (int i = 0; i < 32; ++i) q[i] = ((ql[i] >> (4 * (t / 2))) & 0xF) | (((qh[i] >> (2 * t)) & 3) << 4);
}

}  // namespace quant

namespace qavx2 {

struct Q4_K {
  static constexpr int64_t kBytes = 144, kSubs = 8;
  static inline void dequant(const uint8_t* b, int s, __m256 w[4]) {
    int sc, mn;
    quant::q4k_scale_min(b + 4, s, sc, mn);
    const __m256 d = _mm256_set1_ps(quant::half_to_float(b) * static_cast<float>(sc));
    const __m256 m = _mm256_set1_ps(quant::half_to_float(b + 2) * static_cast<float>(mn));
    alignas(32) uint8_t q[32];
    quant::q4k_values(b, s, q);
    for (int i = 0; i < 4; ++i) {
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
      w[i] = _mm256_sub_ps(_mm256_mul_ps(d, v), m);
    }
  }
};

struct Q6_K {
  static constexpr int64_t kBytes = 210, kSubs = 8;
  static inline void dequant(const uint8_t* b, int s, __m256 w[4]) {
    const float d = quant::half_to_float(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    alignas(32) uint8_t q[32];
    quant::q6k_values(b, s, q);
    for (int i = 0; i < 4; ++i) {  // weights 8i..8i+7: scale 2s + i / 2
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>(scales[2 * s + i / 2]));
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i)));
      w[i] = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(32))));
    }
  }
};

}  // namespace qavx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace qavx512 {

struct Q4_K {
  static constexpr int64_t kBytes = 144, kSubs = 8;
  static inline void dequant(const uint8_t* b, int s, __m512 w[2]) {
    int sc, mn;
    quant::q4k_scale_min(b + 4, s, sc, mn);
    const __m512 d = _mm512_set1_ps(quant::half_to_float(b) * static_cast<float>(sc));
    const __m512 m = _mm512_set1_ps(quant::half_to_float(b + 2) * static_cast<float>(mn));
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * (s / 2)));
    const __m256i q = s % 2 ? _mm256_srli_epi16(bytes, 4) : bytes;  // this sub-block's nibbles in the low 4 bits
    const __m512i mask = _mm512_set1_epi32(0x0F);
    for (int i = 0; i < 2; ++i) {
      const __m512i v = _mm512_and_si512(_mm512_cvtepu8_epi32(i ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q)), mask);
      w[i] = _mm512_sub_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(v)), m);
    }
  }
};

struct Q6_K {
  static constexpr int64_t kBytes = 210, kSubs = 8;
  static inline void dequant(const uint8_t* b, int s, __m512 w[2]) {
    const float d = quant::half_to_float(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const int h = s / 4, t = s % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (t % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i lo = t / 2 ? _mm256_srli_epi16(ql, 4) : ql;
    const __m256i hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t));
    for (int i = 0; i < 2; ++i) {  // weights 16i..16i+15: scale 2s + i
      const __m512i l = _mm512_and_si512(_mm512_cvtepu8_epi32(i ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo)),
                                         _mm512_set1_epi32(0x0F));
      const __m512i u = _mm512_and_si512(_mm512_cvtepu8_epi32(i ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi)),
                                         _mm512_set1_epi32(3));
      const __m512i v = _mm512_sub_epi32(_mm512_or_si512(l, _mm512_slli_epi32(u, 4)), _mm512_set1_epi32(32));
      w[i] = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(scales[2 * s + i])), _mm512_cvtepi32_ps(v));
    }
  }
};

}  // namespace qavx512

#pragma GCC pop_options

}  // namespace
