// RMSNorm and the rotary embedding (part of cpu_kernels.cpp: included there, in order).
#pragma once

namespace {

// The reference (workers.kernels.reference) computes in the model's dtype op by op; these
// loops round where it rounds (to_dtype after each op), so float32 results match it exactly
// wherever the order of a sum is not involved (built with -ffp-contract=off: no fused a*b+c).
template <typename T>
inline T to_dtype(float v) { return static_cast<T>(v); }

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float scale = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i)
      y[r * d + i] = to_dtype<T>(static_cast<float>(w[i]) * static_cast<float>(to_dtype<T>(static_cast<float>(xr[i]) * scale)));
  }
}

template <typename T>
void rotary_impl(T* qkv, int64_t ld, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  std::vector<float> x(d);
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * d;
    const T* s = sin + r * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* p = qkv + r * ld + h * d;
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
