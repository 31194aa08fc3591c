// RMSNorm and the rotary embedding (part of cpu_kernels.cpp: included there, in order).
#pragma once

namespace {

// The reference (workers.kernels.reference) computes in the model's dtype op by op; these
// loops round where it rounds (to_dtype after each op), so float32 results match it exactly
// wherever the order of a sum is not involved (built with -ffp-contract=off: no fused a*b+c).
template <typename T>
inline T to_dtype(float v) { return static_cast<T>(v); }

// 8 floats rounded to T as static_cast<T> rounds each (bfloat16: to nearest even, NaN to
// 0x7fc0, as c10::BFloat16 does; quant.h's rows_to_bf16 rounds 16 de-quantized weights at a
// time, which are never NaN), returned widened back to float32; store8 writes them as T.
template <typename T>
__m256 round8(__m256 v);
template <>
inline __m256 round8<float>(__m256 v) { return v; }  // float32: nothing to round
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline __m256i bf16_bits8(__m256 v) {  // the bfloat16 bits of each lane, in its low half
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}
template <>
inline __m256 round8<at::BFloat16>(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i bits = bf16_bits8(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);  // lanes 0-3, 4-7 as 16 bits
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Per row: the sum of squares in 8 lanes over d in ascending order, a fixed horizontal sum,
// then the last d % 8 in order (each square rounded before it is added, as x.pow(2) does);
// then y = T(w * float(T(x * scale))), 8 at a time, the reference's roundings.
template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  // float64 (which the dispatch also compiles) one by one
  const int64_t d8 = std::is_same_v<T, double> ? 0 : d - d % kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    float ss = 0.f;
    if constexpr (!std::is_same_v<T, double>) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < d8; i += kLanes) {
        const __m256 v = load8(xr + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      }
      ss = hsum(acc);
    }
    for (int64_t i = d8; i < d; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float scale = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    if constexpr (!std::is_same_v<T, double>) {
      const __m256 sv = _mm256_set1_ps(scale);
      for (int64_t i = 0; i < d8; i += kLanes)
        store8(y + r * d + i, _mm256_mul_ps(load8(w + i), round8<T>(_mm256_mul_ps(load8(xr + i), sv))));
    }
    for (int64_t i = d8; i < d; ++i)
      y[r * d + i] = to_dtype<T>(static_cast<float>(w[i]) * static_cast<float>(to_dtype<T>(static_cast<float>(xr[i]) * scale)));
  }
}

template <typename T>
void rotary_impl(T* qkv, int64_t ld, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  std::vector<float> x(d);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * d;
    const T* s = sin + r * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* p = qkv + r * ld + h * d;
      if constexpr (!std::is_same_v<T, double>) {  // (float64, which the dispatch compiles too: below)
        if (half % kLanes == 0) {  // 8 of each half at a time, the same roundings as below
          for (int64_t i = 0; i < half; i += kLanes) {
            const __m256 x1 = load8(p + i), x2 = load8(p + i + half);
            const __m256 a1 = round8<T>(_mm256_mul_ps(x1, load8(c + i)));
            const __m256 b1 = round8<T>(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(s + i)));
            const __m256 a2 = round8<T>(_mm256_mul_ps(x2, load8(c + i + half)));
            const __m256 b2 = round8<T>(_mm256_mul_ps(x1, load8(s + i + half)));
            store8(p + i, _mm256_add_ps(a1, b1));
            store8(p + i + half, _mm256_add_ps(a2, b2));
          }
          continue;
        }
      }
      for (int64_t i = 0; i < d; ++i) x[i] = static_cast<float>(p[i]);
      for (int64_t i = 0; i < d; ++i) {
        // rotate_half(x) = (-x2, x1): out = x * cos + rotate_half(x) * sin
        const float rot = i < half ? -x[i + half] : x[i - half];
        const float a = static_cast<float>(to_dtype<T>(x[i] * static_cast<float>(c[i])));
        const float b = static_cast<float>(to_dtype<T>(rot * static_cast<float>(s[i])));
        p[i] = to_dtype<T>(a + b);
      }
    }
  }
}

}  // namespace

// RMSNorm of each row of x (..., d): weight * (x / sqrt(mean(x^2) + eps)), as RMSNorm does.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == w.scalar_type() && w.numel() == x.size(-1), "rms_norm: bad inputs");
  const auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(xc.data_ptr<scalar_t>(), w.contiguous().data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, d, static_cast<float>(eps));
  });
  return y;
}

// Rotary embedding in place on the first `heads` heads of each row of qkv (rows, >= heads * d),
// contiguous: the q and k heads of the fused projection. cos, sin (rows, d).
torch::Tensor rotary_(torch::Tensor qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t d) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous() && qkv.size(-1) >= heads * d && d % 2 == 0, "rotary_: bad qkv");
  const int64_t rows = qkv.numel() / qkv.size(-1);
  const auto c = cos.to(qkv.scalar_type()).reshape({rows, d}).contiguous();
  const auto s = sin.to(qkv.scalar_type()).reshape({rows, d}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rotary_", [&] {
    rotary_impl<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.size(-1), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), rows, heads, d);
  });
  return qkv;
}
