// The native CPU kernels of the forward pass (workers.kernels.native): linear, rms_norm, rotary_, attention.
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
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

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

// Weight rows [j0, j1) against all n rows of x, in tiles of kRowTile rows: a tile of x
// stays in L2 while the weight rows pass by (a 300-token prompt's x would not), and each
// block of C weight rows stays in L1 while every row of the tile meets it.
constexpr int64_t kRowTile = 64;

template <int C, typename W>
void columns(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m, int64_t j0, int64_t j1) {
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t r1 = std::min(n, r0 + kRowTile);
    for (int64_t j = j0; j < j1; j += C) {
      const W* wj = w + j * k;
      int64_t r = r0;
      if (j + C <= j1) {
        for (; r + 4 <= r1; r += 4) block<4, C>(x + r * k, k, wj, k, y + r * m + j, m);
        for (; r < r1; ++r) block<1, C>(x + r * k, k, wj, k, y + r * m + j, m);
      } else {  // the last few weight rows, one at a time
        for (int64_t jj = j; jj < j1; ++jj)
          for (int64_t rr = r0; rr < r1; ++rr) block<1, 1>(x + rr * k, k, w + jj * k, k, y + rr * m + jj, m);
      }
    }
  }
}

template <int C, typename W>
void linear_blocks(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m) {
  // Threads split the weight rows (compiled with -fopenmp, at::parallel_for runs on torch's
  // own OpenMP pool). Grain: enough rows per task that scheduling costs little.
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 16) / std::max<int64_t>(k, 1)) / C * C;
  at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { columns<C>(x, n, w, k, y, m, j0, j1); });
}

template <typename W>
void linear_impl(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m) {
  // Up to 4 rows the product is memory-bound: one weight row at a time keeps the fewest
  // streams open, which the prefetchers follow best (all 121 products of a bfloat16 decode
  // step from DRAM: 11-13 ms against 17 ms with 3 rows at a time). From 5 rows on it is
  // compute-bound: 4 rows x 3 weight rows = 12 accumulators + 3 weight vectors of the 16
  // AVX2 registers. Either way each output is the same dot product, summed in the same order.
  if (n <= 4) {
    linear_blocks<1>(x, n, w, k, y, m);
  } else {
    linear_blocks<3>(x, n, w, k, y, m);
  }
}

}  // namespace

// x (..., k) float32 or bfloat16; w (m, k) bfloat16 or float32, contiguous; bias (m,) or
// None. Returns y (..., m) in x's dtype, computed in float32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "linear: shapes ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "linear: the weight must be contiguous (out_features, in_features)");
  const int64_t k = w.size(1), m = w.size(0);
  const auto rows = x.reshape({-1, k}).to(at::kFloat).contiguous();  // bfloat16 -> float32 is exact
  const int64_t n = rows.size(0);
  auto y = torch::empty({n, m}, rows.options());
  if (w.scalar_type() == at::kBFloat16) {
    linear_impl(rows.data_ptr<float>(), n, w.data_ptr<at::BFloat16>(), k, y.data_ptr<float>(), m);
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "linear: w must be bfloat16 or float32");
    linear_impl(rows.data_ptr<float>(), n, w.data_ptr<float>(), k, y.data_ptr<float>(), m);
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = m;
  return y.to(x.scalar_type()).view(shape);
}

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

namespace {

inline float dot(const float* a, const float* b, int64_t d) {  // d % 8 == 0, fixed order
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += kLanes) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

// One query row of one head over the keys its mask row allows, in ascending key order:
// scores, their maximum, exp and sum, then the weighted values, 64 dims at a time in
// registers. `keys_seen` lists the allowed keys (ascending); `scores` has room for them.
void attend_row(const float* q, const float* k, const float* v, int64_t key_stride, const int64_t* keys_seen,
                int64_t count, int64_t d, float scale, float* scores, float* out) {
  float top = -INFINITY;
  int64_t t = 0;
  for (; t + 4 <= count; t += 4) {  // four keys at once: four independent chains of FMAs
    const float* k0 = k + keys_seen[t] * key_stride;
    const float* k1 = k + keys_seen[t + 1] * key_stride;
    const float* k2 = k + keys_seen[t + 2] * key_stride;
    const float* k3 = k + keys_seen[t + 3] * key_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < d; i += kLanes) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
    }
    scores[t] = hsum(a0) * scale;  // each the same sum dot() makes
    scores[t + 1] = hsum(a1) * scale;
    scores[t + 2] = hsum(a2) * scale;
    scores[t + 3] = hsum(a3) * scale;
    top = std::max(std::max(top, std::max(scores[t], scores[t + 1])), std::max(scores[t + 2], scores[t + 3]));
  }
  for (; t < count; ++t) {
    scores[t] = dot(q, k + keys_seen[t] * key_stride, d) * scale;
    top = std::max(top, scores[t]);
  }
  float total = 0.f;
  for (t = 0; t < count; ++t) {
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    const int lanes = static_cast<int>(std::min<int64_t>(64, d - i0)) / kLanes;
    __m256 acc[8];
    for (int l = 0; l < 8; ++l) acc[l] = _mm256_setzero_ps();
    for (t = 0; t < count; ++t) {
      const __m256 e = _mm256_set1_ps(scores[t]);
      const float* vj = v + keys_seen[t] * key_stride + i0;
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l)
        if (l < lanes) acc[l] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vj + l * kLanes), acc[l]);
    }
    for (int l = 0; l < lanes; ++l) _mm256_storeu_ps(out + i0 + l * kLanes, _mm256_mul_ps(acc[l], inv));
  }
}

}  // namespace

// Attention of n query rows over keys/values in float32, a query row's result independent of
// the other rows: a key is either skipped (masked) or taken in ascending order, so a token
// tree's row gets the numbers a one-row step over the same keys gets. q (B, heads, n, d),
// k, v (B, kv_heads, keys, d) with unit stride in d (cache views); mask (n, keys) bool or
// None (all). Returns (B, n, heads * d) float32.
torch::Tensor attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                        const c10::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "attention: float32 keys and values");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides() && k.sizes() == v.sizes(), "attention: k, v layout");
  const auto q = q_in.to(at::kFloat);
  const int64_t B = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2), group = heads / kv_heads;
  TORCH_CHECK(d % kLanes == 0 && heads % kv_heads == 0 && q.stride(3) == 1, "attention: head_dim % 8 and heads % kv_heads");
  torch::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == keys, "attention: mask must be (n, keys)");
  }
  auto y = torch::empty({B, n, heads * d}, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * n * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(keys);
    std::vector<int64_t> seen(keys);
    int64_t seen_row = -1, count = 0;
    for (int64_t t = t0; t < t1; ++t) {
      // Heads outermost: consecutive tasks read the same kv head's keys and values from L2.
      const int64_t h = t / (B * n), b = (t / n) % B, i = t % n;
      if (i != seen_row) {  // the keys query row i may see
        count = 0;
        for (int64_t j = 0; j < keys; ++j)
          if (mp == nullptr || mp[i * keys + j]) seen[count++] = j;
        seen_row = i;
      }
      const int64_t kv = (b * k.stride(0) + (h / group) * k.stride(1));
      attend_row(qp + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), kp + kv, vp + kv, k.stride(2), seen.data(), count,
                 d, scale, scores.data(), yp + (b * n + i) * heads * d + h * d);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ w.T (+ b): few rows, weights streamed once (AVX2, FMA)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, rounding as the reference does");
  m.def("rotary_", &rotary_, "rotary embedding in place on the q and k heads of the fused projection");
  m.def("attention", &attention, "attention in float32, each query row independent of the others");
}
