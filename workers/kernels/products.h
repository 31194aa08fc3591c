// Matrix products (part of cpu_kernels.cpp: included there, in order).
//
// linear: y = x @ w.T (+ b) for the decode and tree-step shapes: few rows of x (1-64) against a
// weight matrix w (out_features, in_features) that is streamed from memory once.
//
// Why: PyTorch's CPU matrix products read bfloat16 weights at a third of this machine's
// memory bandwidth, and on CPUs without AVX512-BF16 their cost grows with every row of x.
// Here a block of weight rows is loaded from memory once, widened to float32 in
// registers, and multiplied against every row of x while it sits in L1.
//
// Every output element y[r, j] is one dot product with a fixed summation order (8 float32
// lanes over in_features in ascending order, then a fixed horizontal sum), whatever the
// number of rows, their grouping or the thread count. A row's result therefore does not
// depend on which other rows share the call: a token tree's rows get exactly the numbers
// a one-row decode step would.
#pragma once

namespace {

constexpr int kLanes = 8;
// Software prefetch this far ahead in each weight row: the hardware prefetcher alone keeps
// two cores at ~2/3 of the DRAM bandwidth on the 56 MB LM head (measured, docs/results.md).
constexpr int kPrefetchBytes = 2048;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  // bfloat16 is the upper half of a float32: widen to 32 bits and shift into place.
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum(__m256 v) {
  // Fixed order: (lanes 0-3 + lanes 4-7), then pairs, then the last two.
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Weight rows are taken against all n rows of x in tiles of kRowTile rows (row_tiles.h): a
// tile of x stays in L2 while the weight rows pass by (a 300-token prompt's x would not).
constexpr int64_t kRowTile = 64;

// The float32 path (AVX2 FMA on weights widened to float32).
namespace avx2 {

// R rows of x against C weight rows: R * C accumulators stay in registers.
template <int R, int C, typename W>
inline void block(const float* x, int64_t ldx, const W* w, int64_t k, float* y, int64_t ldy) {
  __m256 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t k8 = k - k % kLanes;
  for (int64_t i = 0; i < k8; i += kLanes) {
    __m256 wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * k + i) + kPrefetchBytes, _MM_HINT_T0);
      wv[c] = load8(w + c * k + i);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 xv = load8(x + r * ldx + i);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  float sums[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) sums[r][c] = hsum(acc[r][c]);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = sums[r][c];
      for (int64_t i = k8; i < k; ++i) s += x[r * ldx + i] * to_float(w[c * k + i]);
      y[r * ldy + c] = s;
    }
}

#include "row_tiles.h"

}  // namespace avx2

template <typename W>
void linear_impl(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m) {
  // 1-4 rows (a decode step, a small tree) are memory-bound: one weight row at a time
  // keeps the fewest streams open, which the prefetchers follow best (all 121 products of a
  // bfloat16 decode step from DRAM: 11-13 ms against 17 ms with 3 rows at a time), and the
  // rows it meets share each weight vector once loaded (a whole step's products at a
  // 200-token context, two threads: 2 rows 16.5-19.6 -> 13.4-13.7 ms, 4 rows 18.4-19.8 ->
  // 14.9-15.3 against two weight rows at a time). 5-6 rows: two weight rows at a time. From
  // 7 rows on it is compute-bound: 4 rows x 3 weight rows = 12 accumulators + 3 weight
  // vectors of the 16 AVX2 registers. Either way each output is the same dot product,
  // summed in the same order.
  if (n <= 4) {
    avx2::linear_blocks<4, 1>(x, n, w, k, y, m);
  } else if (n <= 6) {
    avx2::linear_blocks<6, 2>(x, n, w, k, y, m);
  } else {
    avx2::linear_blocks<4, 3>(x, n, w, k, y, m);
  }
}

// bfloat16 rows against bfloat16 weights on CPUs with AVX512-BF16 (vdpbf16ps): each
// instruction multiplies 32 bfloat16 pairs exactly and adds them, two by two, into 16
// float32 lanes, 4x the multiply-adds of an AVX2 FMA on widened values, so a tree step's
// 8-64 rows stop being compute-bound. Each output is again one dot product in a fixed
// order (32 weights at a time in ascending order, a masked last chunk, then
// _mm512_reduce_add_ps), whatever the rows around it: a row's result does not depend on
// which rows share the call. The sums differ in rounding from the AVX2 path's, so one
// engine takes one path for every call (use_avx512).
//
// The same row tiles (row_tiles.h) are compiled again here, for AVX512: GCC inlines a
// target-specific intrinsic only into a function compiled for that target.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

namespace avx512 {

template <int R, int C>
inline void block(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t k, float* y, int64_t ldy) {
  __m512 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    // The last chunk of a row whose length is not a multiple of 32 is read with a mask
    // (zeros beyond: 0 * 0 adds nothing).
    const __mmask32 mask = k - i >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (k - i)) - 1);
    __m512bh wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * k + i) + kPrefetchBytes, _MM_HINT_T0);
      wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c * k + i);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + i);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

#include "row_tiles.h"

}  // namespace avx512

#pragma GCC pop_options

void linear_bf16(const at::BFloat16* x, int64_t n, const at::BFloat16* w, int64_t k, float* y, int64_t m) {
  // 1-8 rows: one weight row at a time (the fewest weight streams; 1-4 rows are
  // memory-bound). From 9 rows on, 8 rows x 2 weight rows = 16 accumulators. Measured on
  // the model's 120 layer products, two threads, ms (4x1 / 8x1 / 4x4 / 8x2 blocks):
  // 8 rows 13.5 / 10.8 / 13.5 / 12.9; 16 rows 18.4 / 16.8 / 18.4 / 15.2; 32 rows
  // 28.4 / 35.1 / 28.4 / 26.0.
  if (n <= 4) {
    avx512::linear_blocks<4, 1>(x, n, w, k, y, m);
  } else if (n <= 8) {
    avx512::linear_blocks<8, 1>(x, n, w, k, y, m);
  } else {
    avx512::linear_blocks<8, 2>(x, n, w, k, y, m);
  }
}

bool avx512_bf16_enabled = __builtin_cpu_supports("avx512bf16");
const bool amx_available = amx::request();
bool amx_enabled = amx_available;

}  // namespace

// x (..., k) float32 or bfloat16; w (m, k) bfloat16 or float32, contiguous; bias (m,) or
// None. Returns y (..., m) in x's dtype, or float32 with `float_out`, computed in float32.
// bfloat16 x and w take AMX tiles where the CPU has them (amx_gemm.h; use_amx), else the
// AVX512-BF16 path where it is enabled (use_avx512): each output one fixed sum either way, so
// a row's bits never depend on the rows around it, but the two round differently, so one
// process keeps one setting while it decodes.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  if (w.scalar_type() == at::kByte || w.scalar_type() == at::kChar) return linear_q(x, w, bias, float_out);  // GGUF blocks (quant.h)
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "linear: shapes ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "linear: the weight must be contiguous (out_features, in_features)");
  const int64_t k = w.size(1), m = w.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16;
  torch::Tensor y;
  if (bf16 && (amx_enabled || avx512_bf16_enabled)) {
    const auto rows = x.reshape({-1, k}).contiguous();
    y = torch::empty({rows.size(0), m}, rows.options().dtype(at::kFloat));
    if (amx_enabled) {
      amx::gemm_bf16(reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()), rows.size(0),
                     reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), k, y.data_ptr<float>(), m, parallel_for);
    } else {
      linear_bf16(rows.data_ptr<at::BFloat16>(), rows.size(0), w.data_ptr<at::BFloat16>(), k, y.data_ptr<float>(), m);
    }
  } else {
    const auto rows = x.reshape({-1, k}).to(at::kFloat).contiguous();  // bfloat16 -> float32 is exact
    y = torch::empty({rows.size(0), m}, rows.options());
    if (w.scalar_type() == at::kBFloat16) {
      linear_impl(rows.data_ptr<float>(), rows.size(0), w.data_ptr<at::BFloat16>(), k, y.data_ptr<float>(), m);
    } else {
      TORCH_CHECK(w.scalar_type() == at::kFloat, "linear: w must be bfloat16 or float32");
      linear_impl(rows.data_ptr<float>(), rows.size(0), w.data_ptr<float>(), k, y.data_ptr<float>(), m);
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = m;
  return (float_out ? y : y.to(x.scalar_type())).view(shape);
}

// prompt_linear: y = x @ w.T (+ b) for many rows (a prompt's, workers.kernels.native.
// prompt_linear): linear, whose rows are independent, except for quantized weights (quant.h):
// bfloat16 rows on AMX take the tiles against the weights de-quantized to bfloat16 for the
// call (exactly the bfloat16 weights of weights = "float": a prompt position gets the bits
// it gets there; ~4x faster than linear_q at 300 rows); elsewhere linear_q. Never a
// library's GEMM: which kernel oneDNN picks depends on the row count and the CPU, and with it
// the rounding (issue 36).
torch::Tensor prompt_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "prompt_linear: CPU tensors only");
  if ((w.scalar_type() == at::kByte || w.scalar_type() == at::kChar) && amx_enabled && x.scalar_type() == at::kBFloat16)
    return linear(x, dequantize_bf16(w), bias, false);
  return linear(x, w, bias, false);
}

// Turn the AMX path of linear and prompt_linear on (where the CPU and the OS allow it; the
// default) or off (tests cover both paths); returns whether it is on.
bool use_amx(bool enable) {
  amx_enabled = enable && amx_available;
  return amx_enabled;
}
