// Products with the model file's own quantized weights (part of cpu_kernels.cpp: included
// there, in order, after attention.h).
//
// linear_q: y = x @ W.T (+ b) where W stays in the GGUF file's blocks: a uint8 (or int8,
// below) tensor (out_features, blocks, block_bytes), each row of W its in_features / 32 blocks of 32
// weights in ascending order, exactly the bytes of the file (workers/gguf_weights.py). The
// block size in bytes says the format (every ggml block type has its own): Q4_1 (20 bytes:
// float16 scale d, float16 minimum m, 16 bytes of nibbles; weight = d * q + m), Q5_0 (22
// bytes: d, 32 fifth bits, 16 bytes of nibbles; weight = d * (q - 16)) and Q8_0 (34 bytes:
// float16 scale d, 32 int8; weight = d * q); and the K formats Q4_K and Q6_K (256 weights
// a block, taken 32 at a time: quant_k.h), float32 x only.
//
// Why: a decode step streams every weight once; in 4.5-8.5 bits a weight instead of 16 it
// streams ~3x fewer bytes than bfloat16 (96 MB against 269 MB a token for the 135M model).
//
// How: each block is de-quantized in registers to float32 exactly as gguf-py (and so
// transformers' converted checkpoint) computes it (d * q + m: a product rounded, then a
// sum rounded; no fused multiply-add), once for all rows of x in the call, and multiplied
// with float32 x by FMA. Every output y[r, j] is one dot product in a fixed order: blocks
// in ascending order, each block's first and second halves into two accumulators (16 lanes
// each with AVX-512; 2 x 8 lanes each with AVX2), then the two accumulators added and
// summed horizontally in a fixed order. That order does not depend on how many rows share
// the call, which rows they are, or the thread count (threads split the weight rows), so a
// token tree's rows get exactly the numbers a one-row decode step gets. AVX-512 and AVX2
// round differently, so one engine keeps one path (use_avx512, as for attention).
//
// The same bytes typed int8 instead of uint8 ask for the other variant (quant_i8.h): x
// quantized to int8 per block, as llama.cpp does, and integer dot products. On a 2-core
// AVX-512 Xeon (Sapphire Rapids class, busy machine, rough) a decode step's 121 products of
// the 135M model took, two threads, 1 / 4 / 8 rows: float x ~5.7 / 8.5 / 13.4 ms, int8 x
// ~4.0 / 8.8 / 16 ms, bfloat16 weights (products.h) ~12 / 18 / 22 ms: int8 wins the
// one-row step, float32 x the tree steps, and float32 x keeps the de-quantized model's
// numbers; so uint8 (float32 x) is what weights = "shipped" loads, int8 "shipped-int8".
#pragma once

namespace {

namespace quant {

constexpr int64_t kBlock = 32;         // weights a block (a K format's block: 8 of them)
constexpr int64_t kRowTile = 64;       // rows of x a pass over the weights (as products.h)
// Software prefetch this far ahead in the weight rows: 1 KB -> 4 KB took a one-row step's
// products from ~9 to ~5.7 ms on two threads (float x; int8 x ~9 -> ~4 ms).
constexpr int kPrefetchBytes = 4096;

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

}  // namespace quant

// The float32 path: 8 lanes (AVX2 + FMA).
namespace qavx2 {

using quant::kBlock;

// One block as 4 x 8 float32 weights: w[0] = weights 0-7, ..., w[3] = 24-31.
struct Q4_1 {
  static constexpr int64_t kBytes = 20, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(quant::half_to_float(b)), m = _mm256_set1_ps(quant::half_to_float(b + 2));
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(qs, mask), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    // Byte i holds weight i (low nibble) and weight i + 16 (high nibble).
    const __m128i q[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) w[i] = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[i]))), m);
  }
};

// Q5_0: float16 d, 4 bytes of fifth bits (bit i: weight i's), 16 bytes of nibbles as Q4_1's;
// weight = d * (q - 16), q = nibble + 16 * fifth bit.
struct Q5_0 {
  static constexpr int64_t kBytes = 22, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(quant::half_to_float(b));
    uint32_t fifth;
    std::memcpy(&fifth, b + 2, 4);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(qs, mask), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    const __m128i q[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    const __m256i bits = _mm256_set1_epi32(static_cast<int32_t>(fifth)), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int i = 0; i < 4; ++i) {
      const __m256i high = _mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * i))), _mm256_set1_epi32(1));
      const __m256i v = _mm256_sub_epi32(_mm256_or_si256(_mm256_cvtepu8_epi32(q[i]), _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(16));
      w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(v));
    }
  }
};

struct Q8_0 {
  static constexpr int64_t kBytes = 34, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m256 w[4]) {
    const __m256 d = _mm256_set1_ps(quant::half_to_float(b));
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  }
};

// R rows of x (float32, k = blocks * 32) against C quantized weight rows.
template <int R, int C, class F>
inline void block(const float* x, int64_t ldx, const uint8_t* w, int64_t row_bytes, int64_t blocks, float* y, int64_t ldy) {
  __m256 acc[R][C][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b)
  for (int s = 0; s < F::kSubs; ++s) {  // 32 weights at a time (a K format's block: 8 times)
    __m256 wv[C][4];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const uint8_t* wb = w + c * row_bytes + b * F::kBytes;
      if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(wb) + quant::kPrefetchBytes, _MM_HINT_T0);
      F::dequant(wb, s, wv[c]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * ldx + (b * F::kSubs + s) * kBlock;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m256 xv = _mm256_loadu_ps(xb + 8 * i);
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][c][i / 2] = _mm256_fmadd_ps(xv, wv[c][i], acc[r][c][i / 2]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) y[r * ldy + c] = hsum(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
}

#include "quant_tiles.h"

}  // namespace qavx2

// The AVX-512 path: 16 lanes, the same order of blocks.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace qavx512 {

using quant::kBlock;

// One block as 2 x 16 float32 weights: w[0] = weights 0-15, w[1] = 16-31.
//
// Q4_1 by table: the 16 values a nibble can stand for, d * q + m for q = 0..15 (the same
// roundings as gguf-py's), then each weight looked up by its nibble (vpermps reads the low 4
// bits of each index: the low nibble as it is, the high one shifted down). 2 lookups
// instead of 2 conversions, 2 products and 2 sums a block: ~15-20% less time a 1-2 row
// product on an AVX-512 Xeon (one thread, measured against the direct de-quantization).
struct Q4_1 {
  static constexpr int64_t kBytes = 20, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m512 w[2]) {
    int32_t scales;  // float16 d, float16 m: both converted by one instruction
    std::memcpy(&scales, b, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(scales));
    const __m512 d = _mm512_broadcastss_ps(dm), m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
    const __m512 nibbles = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(d, nibbles), m);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
    w[0] = _mm512_permutexvar_ps(q, table);                         // low nibbles: weights 0-15
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);  // high nibbles: weights 16-31
  }
};

struct Q5_0 {
  static constexpr int64_t kBytes = 22, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m512 w[2]) {
    const __m512 d = _mm512_set1_ps(quant::half_to_float(b));
    uint32_t fifth;
    std::memcpy(&fifth, b + 2, 4);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6)));
    const __m512i bits = _mm512_set1_epi32(static_cast<int32_t>(fifth));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i one = _mm512_set1_epi32(1), sixteen = _mm512_set1_epi32(16);
    const __m512i high0 = _mm512_and_si512(_mm512_srlv_epi32(bits, lane), one);
    const __m512i high1 = _mm512_and_si512(_mm512_srlv_epi32(bits, _mm512_add_epi32(lane, sixteen)), one);
    const __m512i v0 = _mm512_or_si512(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)), _mm512_slli_epi32(high0, 4));
    const __m512i v1 = _mm512_or_si512(_mm512_srli_epi32(q, 4), _mm512_slli_epi32(high1, 4));
    w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(v0, sixteen)));
    w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(v1, sixteen)));
  }
};

struct Q8_0 {
  static constexpr int64_t kBytes = 34, kSubs = 1;
  static inline void dequant(const uint8_t* b, int, __m512 w[2]) {
    const __m512 d = _mm512_set1_ps(quant::half_to_float(b));
    for (int i = 0; i < 2; ++i) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * i));
      w[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
    }
  }
};

template <int R, int C, class F>
inline void block(const float* x, int64_t ldx, const uint8_t* w, int64_t row_bytes, int64_t blocks, float* y, int64_t ldy) {
  __m512 acc[R][C][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b)
  for (int s = 0; s < F::kSubs; ++s) {  // 32 weights at a time (a K format's block: 8 times)
    __m512 wv[C][2];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const uint8_t* wb = w + c * row_bytes + b * F::kBytes;
      if (s == 0) _mm_prefetch(reinterpret_cast<const char*>(wb) + quant::kPrefetchBytes, _MM_HINT_T0);
      F::dequant(wb, s, wv[c]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * ldx + (b * F::kSubs + s) * kBlock;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        acc[r][c][0] = _mm512_fmadd_ps(x0, wv[c][0], acc[r][c][0]);
        acc[r][c][1] = _mm512_fmadd_ps(x1, wv[c][1], acc[r][c][1]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]));
}

#include "quant_tiles.h"

// Weight rows [j0, j1) de-quantized to bfloat16 (out: (m, blocks * 32)), rounded to nearest
// even as torch's float32 -> bfloat16 conversion rounds (no NaN among de-quantized weights).
template <class F>
void rows_to_bf16(const uint8_t* w, int64_t blocks, uint16_t* out, int64_t j0, int64_t j1) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t b = 0; b < blocks; ++b)
      for (int s = 0; s < F::kSubs; ++s) {
        __m512 wv[2];
        F::dequant(w + (j * blocks + b) * F::kBytes, s, wv);
        for (int i = 0; i < 2; ++i) {
          const __m512i u = _mm512_castps_si512(wv[i]);
          const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((j * blocks + b) * F::kSubs + s) * kBlock + 16 * i),
                              _mm512_cvtepi32_epi16(rounded));
        }
      }
}

}  // namespace qavx512

#pragma GCC pop_options

}  // namespace

#include "quant_k.h"

namespace {

// Weights a block of `bytes` bytes holds: 256 for the K formats, 32 for the others.
inline int64_t block_weights(int64_t bytes) { return bytes == qavx512::Q4_K::kBytes || bytes == qavx512::Q6_K::kBytes ? 256 : 32; }

// Rows of x against the weights of format F, on the path the engine uses (use_avx512).
// Tiles (R rows x C weight rows) by the number of rows: two weight rows at a time for 1-4
// rows (independent FMA chains for a lone row), one from 5 rows on (register room).
template <class F2, class F512>
void linear_q_rows(const float* x, int64_t n, const uint8_t* w, int64_t blocks, float* y, int64_t m) {
  const int64_t k = blocks * F512::kSubs * quant::kBlock;
  if (avx512_attention_enabled) {
    if (n <= 2) return qavx512::linear_blocks<2, 2, F512>(x, k, n, w, blocks, y, m);
    if (n <= 4) return qavx512::linear_blocks<4, 2, F512>(x, k, n, w, blocks, y, m);
    return qavx512::linear_blocks<8, 1, F512>(x, k, n, w, blocks, y, m);
  }
  if (n <= 2) return qavx2::linear_blocks<2, 1, F2>(x, k, n, w, blocks, y, m);
  return qavx2::linear_blocks<4, 1, F2>(x, k, n, w, blocks, y, m);
}

}  // namespace

#include "quant_i8.h"

// w (m, k / 32, block_bytes) uint8 or int8 -> (m, k) bfloat16: the float32 weights gguf-py
// computes, rounded to bfloat16 (what weights = "float" holds in bfloat16). For prompt_linear's
// AMX tiles (AMX CPUs have AVX-512).
torch::Tensor dequantize_bf16(const torch::Tensor& w) {
  TORCH_CHECK((w.scalar_type() == at::kByte || w.scalar_type() == at::kChar) && w.dim() == 3 && w.is_contiguous(),
              "dequantize_bf16: contiguous uint8 or int8 blocks (out_features, blocks, block_bytes)");
  TORCH_CHECK(avx512_attention_available(), "dequantize_bf16: takes AVX-512");
  const int64_t m = w.size(0), blocks = w.size(1), bytes = w.size(2);
  TORCH_CHECK(bytes == qavx512::Q4_1::kBytes || bytes == qavx512::Q5_0::kBytes || bytes == qavx512::Q8_0::kBytes ||
                  bytes == qavx512::Q4_K::kBytes || bytes == qavx512::Q6_K::kBytes,
              "dequantize_bf16: blocks of ", bytes, " bytes are no format it takes");
  auto out = torch::empty({m, blocks * block_weights(bytes)}, w.options().dtype(at::kBFloat16));
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  parallel_for(0, m, 64, [&](int64_t j0, int64_t j1) {
    if (bytes == qavx512::Q4_1::kBytes) qavx512::rows_to_bf16<qavx512::Q4_1>(wp, blocks, op, j0, j1);
    else if (bytes == qavx512::Q5_0::kBytes) qavx512::rows_to_bf16<qavx512::Q5_0>(wp, blocks, op, j0, j1);
    else if (bytes == qavx512::Q4_K::kBytes) qavx512::rows_to_bf16<qavx512::Q4_K>(wp, blocks, op, j0, j1);
    else if (bytes == qavx512::Q6_K::kBytes) qavx512::rows_to_bf16<qavx512::Q6_K>(wp, blocks, op, j0, j1);
    else qavx512::rows_to_bf16<qavx512::Q8_0>(wp, blocks, op, j0, j1);
  });
  return out;
}

// x (..., k) float32 or bfloat16; w (m, k / 32, block_bytes): the GGUF blocks of an (m, k)
// weight (top of this file), as uint8: x multiplied in float32 against the blocks
// de-quantized in registers; the same bytes as int8: x quantized to int8 per block first
// (quant_i8.h; llama.cpp's numbers, faster for 1-2 rows). bias (m,) or None. Returns
// y (..., m) in x's dtype, or float32 with `float_out`.
torch::Tensor linear_q(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_q: CPU tensors only");
  const bool int8_rows = w.scalar_type() == at::kChar;
  TORCH_CHECK((int8_rows || w.scalar_type() == at::kByte) && w.dim() == 3 && w.is_contiguous(),
              "linear_q: w must be contiguous uint8 or int8 blocks (out_features, blocks, block_bytes)");
  const int64_t m = w.size(0), blocks = w.size(1), bytes = w.size(2), k = blocks * block_weights(bytes);
  const bool k_format = bytes == qavx512::Q4_K::kBytes || bytes == qavx512::Q6_K::kBytes;
  TORCH_CHECK(bytes == qi8::Q4_1::kBytes || bytes == qi8::Q5_0::kBytes || bytes == qi8::Q8_0::kBytes || k_format,
              "linear_q: blocks of ", bytes, " bytes are no format it takes (Q4_1: 20, Q5_0: 22, Q8_0: 34, Q4_K: 144, Q6_K: 210)");
  TORCH_CHECK(!(k_format && int8_rows), "linear_q: K-format blocks take float32 x only (typed uint8)");
  TORCH_CHECK(x.size(-1) == k, "linear_q: x has ", x.size(-1), " inputs, the weight ", k);
  const auto rows = x.reshape({-1, k}).to(at::kFloat).contiguous();  // bfloat16 -> float32 is exact
  const int64_t n = rows.size(0);
  auto y = torch::empty({n, m}, rows.options());
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  if (int8_rows) {
    std::vector<XBlock> xq(n * blocks);
    quantize_rows(rows.data_ptr<float>(), n, blocks, xq.data());
    if (bytes == qi8::Q4_1::kBytes) linear_q_int8<qi8::Q4_1>(xq.data(), n, wp, blocks, yp, m);
    else if (bytes == qi8::Q5_0::kBytes) linear_q_int8<qi8::Q5_0>(xq.data(), n, wp, blocks, yp, m);
    else linear_q_int8<qi8::Q8_0>(xq.data(), n, wp, blocks, yp, m);
  } else if (bytes == qavx512::Q4_1::kBytes) {
    linear_q_rows<qavx2::Q4_1, qavx512::Q4_1>(rows.data_ptr<float>(), n, wp, blocks, yp, m);
  } else if (bytes == qavx512::Q5_0::kBytes) {
    linear_q_rows<qavx2::Q5_0, qavx512::Q5_0>(rows.data_ptr<float>(), n, wp, blocks, yp, m);
  } else if (bytes == qavx512::Q4_K::kBytes) {
    linear_q_rows<qavx2::Q4_K, qavx512::Q4_K>(rows.data_ptr<float>(), n, wp, blocks, yp, m);
  } else if (bytes == qavx512::Q6_K::kBytes) {
    linear_q_rows<qavx2::Q6_K, qavx512::Q6_K>(rows.data_ptr<float>(), n, wp, blocks, yp, m);
  } else {
    linear_q_rows<qavx2::Q8_0, qavx512::Q8_0>(rows.data_ptr<float>(), n, wp, blocks, yp, m);
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = m;
  return (float_out ? y : y.to(x.scalar_type())).view(shape);
}
