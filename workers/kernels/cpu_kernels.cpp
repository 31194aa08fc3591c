// The native CPU kernels of the forward pass (workers.kernels.native): linear, rms_norm, rotary_,
// attention, and decoder_layer, which runs a whole layer through them in one call.
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
#include <ATen/ThreadLocalState.h>
#include <immintrin.h>
#include <omp.h>

#include "amx_gemm.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// The kernels' parallel loops run on a pool of their own instead of OpenMP's.
//
// Why: libgomp keeps one thread team per calling thread, and once more team threads exist
// than cores (the main thread's team plus a decoding thread's), it stops spinning between
// parallel regions: every region then wakes a sleeping thread. A server decodes in worker
// threads, so a layer's small products cost 2-3x their main-thread time there (measured:
// one 1536 x 576 product, 8 rows, 34 us on the main thread against 66-114 us in another
// thread; a pass of 8 one-token steps 10.8 ms against 15.7 ms). This pool is shared by
// every calling thread: its workers spin a while after each loop (the next layer's loop
// comes within microseconds) and sleep after that. One caller at a time uses it; a second
// caller meanwhile runs its loop alone (the cores are busy anyway).
//
// parallel_for splits [begin, end) as at::parallel_for does: at most at::get_num_threads()
// contiguous chunks of at least `grain`. Every kernel computes each output the same way
// whichever chunk holds it, so the split never changes a result.
class SpinPool {
 public:
  void run(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
    const int64_t range = end - begin;
    if (range <= 0) return;
    const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / std::max<int64_t>(grain, 1));
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (tasks <= 1 || !busy.owns_lock()) {
      f(begin, end);
      return;
    }
    while (static_cast<int64_t>(workers_.size()) < tasks - 1) {
      const int index = static_cast<int>(workers_.size());
      const uint64_t seen = generation_.load();  // a new worker waits for the next loop, whenever it starts
      workers_.emplace_back([this, index, seen] { work(index, seen); });
      workers_.back().detach();
    }
    fn_ = &f;
    begin_ = begin, end_ = end, chunk_ = (range + tasks - 1) / tasks, tasks_ = tasks;
    remaining_.store(static_cast<int>(workers_.size()));  // every worker answers every loop, even one with no chunk
    generation_.fetch_add(1);  // seq_cst, against a worker going to sleep (work)
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    f(begin, std::min(end, begin + chunk_));
    while (remaining_.load(std::memory_order_acquire) > 0) _mm_pause();
  }

 private:
  static constexpr int64_t kSpins = 1 << 16;  // ~1 ms of pauses before a worker sleeps

  void work(int index, uint64_t seen) {
    while (true) {
      int64_t spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen && ++spins < kSpins) _mm_pause();
      if (generation_.load(std::memory_order_acquire) == seen) {
        sleeping_.fetch_add(1);
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load(std::memory_order_acquire);
      const int64_t task = index + 1;  // the caller runs chunk 0
      const int64_t j0 = begin_ + task * chunk_;
      if (task < tasks_ && j0 < end_) (*fn_)(j0, std::min(end_, j0 + chunk_));
      remaining_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex use_, sleep_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0}, sleeping_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0, tasks_ = 0;
};

// The main thread keeps OpenMP (its team is the one libgomp keeps spinning: measured
// fastest there), every other thread uses the pool. One pool a process: a child made by
// fork() has none of its parent's threads, so it starts a pool of its own.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  static std::atomic<SpinPool*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex making;
  thread_local const bool main_thread = getpid() == static_cast<pid_t>(syscall(SYS_gettid));
  if (main_thread) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const pid_t pid = getpid();
  if (owner.load() != pid) {
    std::lock_guard<std::mutex> lock(making);
    if (owner.load() != pid) {
      pool.store(new SpinPool());  // never freed: its detached workers live as long as the process
      owner.store(pid);
    }
  }
  pool.load()->run(begin, end, grain, f);
}

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

// The last rows of a tile (fewer than R) together: their dot products are independent
// chains of FMAs that overlap (one row at a time waits on each FMA's latency).
template <int C, int Rest, typename W>
inline void rest_rows(const float* x, int64_t rows, const W* w, int64_t k, float* y, int64_t m) {
  if constexpr (Rest > 0) {
    if (rows == Rest) return block<Rest, C>(x, k, w, k, y, m);
    rest_rows<C, Rest - 1>(x, rows, w, k, y, m);
  }
}

template <int R, int C, typename W>
void columns(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m, int64_t j0, int64_t j1) {
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t r1 = std::min(n, r0 + kRowTile);
    for (int64_t j = j0; j < j1; j += C) {
      const W* wj = w + j * k;
      int64_t r = r0;
      if (j + C <= j1) {
        for (; r + R <= r1; r += R) block<R, C>(x + r * k, k, wj, k, y + r * m + j, m);
        rest_rows<C, R - 1>(x + r * k, r1 - r, wj, k, y + r * m + j, m);
      } else {  // the last few weight rows, one at a time
        for (int64_t jj = j; jj < j1; ++jj)
          for (int64_t rr = r0; rr < r1; ++rr) block<1, 1>(x + rr * k, k, w + jj * k, k, y + rr * m + jj, m);
      }
    }
  }
}

template <int R, int C, typename W>
void linear_blocks(const float* x, int64_t n, const W* w, int64_t k, float* y, int64_t m) {
  // Threads split the weight rows (parallel_for: the kernels' own pool). Grain: enough rows
  // per task that scheduling costs little.
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 16) / std::max<int64_t>(k, 1)) / C * C;
  parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { columns<R, C>(x, n, w, k, y, m, j0, j1); });
}

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
    linear_blocks<4, 1>(x, n, w, k, y, m);
  } else if (n <= 6) {
    linear_blocks<6, 2>(x, n, w, k, y, m);
  } else {
    linear_blocks<4, 3>(x, n, w, k, y, m);
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
// rest_rows_bf16 and columns_bf16 repeat rest_rows and columns: code compiled for
// AVX512 cannot be shared with the path that runs on CPUs without it (GCC inlines a
// target-specific intrinsic only into a function compiled for that target).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

template <int R, int C>
inline void block_bf16(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t k, float* y, int64_t ldy) {
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

template <int C, int Rest>
inline void rest_rows_bf16(const at::BFloat16* x, int64_t rows, const at::BFloat16* w, int64_t k, float* y, int64_t m) {
  if constexpr (Rest > 0) {
    if (rows == Rest) return block_bf16<Rest, C>(x, k, w, k, y, m);
    rest_rows_bf16<C, Rest - 1>(x, rows, w, k, y, m);
  }
}

template <int R, int C>
void columns_bf16(const at::BFloat16* x, int64_t n, const at::BFloat16* w, int64_t k, float* y, int64_t m, int64_t j0, int64_t j1) {
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t r1 = std::min(n, r0 + kRowTile);
    for (int64_t j = j0; j < j1; j += C) {
      const at::BFloat16* wj = w + j * k;
      int64_t r = r0;
      if (j + C <= j1) {
        for (; r + R <= r1; r += R) block_bf16<R, C>(x + r * k, k, wj, k, y + r * m + j, m);
        rest_rows_bf16<C, R - 1>(x + r * k, r1 - r, wj, k, y + r * m + j, m);
      } else {  // the last few weight rows, one at a time
        for (int64_t jj = j; jj < j1; ++jj)
          for (int64_t rr = r0; rr < r1; ++rr) block_bf16<1, 1>(x + rr * k, k, w + jj * k, k, y + rr * m + jj, m);
      }
    }
  }
}

#pragma GCC pop_options

template <int R, int C>
void linear_blocks_bf16(const at::BFloat16* x, int64_t n, const at::BFloat16* w, int64_t k, float* y, int64_t m) {
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 16) / std::max<int64_t>(k, 1)) / C * C;
  parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { columns_bf16<R, C>(x, n, w, k, y, m, j0, j1); });
}

void linear_bf16(const at::BFloat16* x, int64_t n, const at::BFloat16* w, int64_t k, float* y, int64_t m) {
  // 1-8 rows: one weight row at a time (the fewest weight streams; 1-4 rows are
  // memory-bound). From 9 rows on, 8 rows x 2 weight rows = 16 accumulators. Measured on
  // the model's 120 layer products, two threads, ms (4x1 / 8x1 / 4x4 / 8x2 blocks):
  // 8 rows 13.5 / 10.8 / 13.5 / 12.9; 16 rows 18.4 / 16.8 / 18.4 / 15.2; 32 rows
  // 28.4 / 35.1 / 28.4 / 26.0.
  if (n <= 4) {
    linear_blocks_bf16<4, 1>(x, n, w, k, y, m);
  } else if (n <= 8) {
    linear_blocks_bf16<8, 1>(x, n, w, k, y, m);
  } else {
    linear_blocks_bf16<8, 2>(x, n, w, k, y, m);
  }
}

bool avx512_bf16_enabled = __builtin_cpu_supports("avx512bf16");
const bool amx_available = amx::request();
bool amx_enabled = amx_available;

}  // namespace

// x (..., k) float32 or bfloat16; w (m, k) bfloat16 or float32, contiguous; bias (m,) or
// None. Returns y (..., m) in x's dtype, or float32 with `float_out`, computed in float32.
// bfloat16 x and w take the AVX512-BF16 path where it is enabled (use_avx512).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "linear: shapes ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "linear: the weight must be contiguous (out_features, in_features)");
  const int64_t k = w.size(1), m = w.size(0);
  torch::Tensor y;
  if (avx512_bf16_enabled && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {
    const auto rows = x.reshape({-1, k}).contiguous();
    y = torch::empty({rows.size(0), m}, rows.options().dtype(at::kFloat));
    linear_bf16(rows.data_ptr<at::BFloat16>(), rows.size(0), w.data_ptr<at::BFloat16>(), k, y.data_ptr<float>(), m);
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
// prompt_linear). bfloat16 rows on CPUs with AMX take the tiles (amx_gemm.h: every output one
// fixed sum, whatever the rows around it or the thread count); everything else takes linear
// above, whose rows are independent too. Never a library's GEMM: which kernel oneDNN picks
// depends on the row count and the CPU, and with it the rounding (issue 36).
torch::Tensor prompt_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "prompt_linear: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "prompt_linear: shapes ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "prompt_linear: the weight must be contiguous (out_features, in_features)");
  if (!(amx_enabled && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16)) return linear(x, w, bias, false);
  const int64_t k = w.size(1), m = w.size(0);
  const auto rows = x.reshape({-1, k}).contiguous();
  auto y = torch::empty({rows.size(0), m}, rows.options().dtype(at::kFloat));
  amx::gemm_bf16(reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()), rows.size(0),
                 reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), k, y.data_ptr<float>(), m, parallel_for);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = m;
  return y.to(x.scalar_type()).view(shape);
}

// Turn the AMX path of prompt_linear on (where the CPU and the OS allow it; the default) or
// off (tests cover both paths); returns whether it is on.
bool use_amx(bool enable) {
  amx_enabled = enable && amx_available;
  return amx_enabled;
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

// exp of 8 floats at once, x <= 0 (scores minus their maximum): x = n ln2 + r with
// |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf coefficients; ~1 ulp), times
// 2^n built in the exponent bits; below -87.3 the result is 0 (it would underflow anyway).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 zero_out = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_out, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Query vectors attended together: they share their kv head's keys and values, which are
// read once for all of them.
constexpr int kQueries = 4;

// scores_avx2 and scores_avx512 write es[a][t] = (q_a . k_t) * scale for the keys 0..keys-1,
// each dot product in a fixed order whatever the other query vectors (a missing one repeats
// the first; its scores are dropped). Which of the two an engine runs is fixed
// (use_avx512): their sums round differently.
//
// AVX2: 8 lanes over d in ascending order, then hsum; each key read once for all queries.
void scores_avx2(const float* const* qa, float* const* es, const float* k, int64_t key_stride, int64_t keys,
                 int64_t d, float scale) {
  for (int64_t t = 0; t < keys; ++t) {
    const float* kt = k + t * key_stride;
    __m256 acc[kQueries];
    for (int a = 0; a < kQueries; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += kLanes) {
      const __m256 kv = _mm256_loadu_ps(kt + i);
#pragma GCC unroll 4
      for (int a = 0; a < kQueries; ++a) acc[a] = _mm256_fmadd_ps(_mm256_loadu_ps(qa[a] + i), kv, acc[a]);
    }
#pragma GCC unroll 4
    for (int a = 0; a < kQueries; ++a) es[a][t] = hsum(acc[a]) * scale;
  }
}

// The weighted sums of values, 16 dims at a time: kQueries x 2 accumulators, each value
// vector read once for all query vectors; out[a] = (sum_t es[a][t] v_t) / total[a], each
// element's sum in ascending key order (the AVX-512 version's numbers exactly).
void weighted_values_avx2(const float* const* es, const float* total, int count, const float* v, int64_t key_stride,
                          int64_t keys, int64_t d, float* const* out) {
  for (int64_t i0 = 0; i0 < d; i0 += 2 * kLanes) {
    const bool two = i0 + kLanes < d;
    __m256 acc[kQueries][2];
    for (int a = 0; a < kQueries; ++a) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < keys; ++t) {
      const float* vt = v + t * key_stride + i0;
      const __m256 v0 = _mm256_loadu_ps(vt), v1 = two ? _mm256_loadu_ps(vt + kLanes) : v0;
#pragma GCC unroll 4
      for (int a = 0; a < kQueries; ++a) {
        const __m256 w = _mm256_set1_ps(es[a][t]);
        acc[a][0] = _mm256_fmadd_ps(w, v0, acc[a][0]);
        acc[a][1] = _mm256_fmadd_ps(w, v1, acc[a][1]);
      }
    }
    for (int a = 0; a < count; ++a) {
      const __m256 s = _mm256_set1_ps(1.f / total[a]);
      _mm256_storeu_ps(out[a] + i0, _mm256_mul_ps(acc[a][0], s));
      if (two) _mm256_storeu_ps(out[a] + i0 + kLanes, _mm256_mul_ps(acc[a][1], s));
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq")

// 16 vectors of 16 partial sums -> one vector whose lane t is the total of a[t]'s lanes, by a
// fixed tree: lanes j + j+8, then j + j+4, then j + j+2, then j + j+1 (four levels, each
// adding two vectors' halves side by side).
inline __m512 totals16(const __m512* a) {
  __m512 b[8], c[4], e[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // [a[2i] lanes j + j+8 | a[2i+1] alike], j < 8
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // quarter r: vector 4i + r's four partial sums
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // quarter r: two partial sums of vectors 8i + r and 8i + 4 + r
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4r + s: the total of vector 4s + r; put vector t in lane t
  const __m512 totals = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, totals);
}

// AVX-512 (d a multiple of 16): 16 keys at a time for one query vector, 16 accumulators of 16
// lanes over d in ascending order, then totals16. A block's keys (16 x d floats) stay in L1
// for all the query vectors.
void scores_avx512(const float* const* qa, float* const* es, const float* k, int64_t key_stride, int64_t keys,
                   int64_t d, float scale) {
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < keys; t0 += 16) {
    const int nk = static_cast<int>(std::min<int64_t>(16, keys - t0));
    const float* kt[16];
    for (int t = 0; t < 16; ++t) kt[t] = k + (t0 + std::min(t, nk - 1)) * key_stride;  // past the end: the last key again
    for (int a = 0; a < kQueries; ++a) {
      __m512 acc[16];
      const __m512 q0 = _mm512_loadu_ps(qa[a]);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_mul_ps(q0, _mm512_loadu_ps(kt[t]));
      for (int64_t i = 16; i < d; i += 16) {
        const __m512 qi = _mm512_loadu_ps(qa[a] + i);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qi, _mm512_loadu_ps(kt[t] + i), acc[t]);
      }
      _mm512_mask_storeu_ps(es[a] + t0, static_cast<__mmask16>((1u << nk) - 1), _mm512_mul_ps(totals16(acc), scale16));
    }
  }
}

// weighted_values_avx2 with 64 dims at a time: the same sums (each element's, in ascending
// key order), with a quarter of the passes over the values.
void weighted_values_avx512(const float* const* es, const float* total, int count, const float* v, int64_t key_stride,
                            int64_t keys, int64_t d, float* const* out) {
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(4, (d - i0) / 16));
    __m512 acc[kQueries][4];
    for (int a = 0; a < kQueries; ++a)
      for (int c = 0; c < 4; ++c) acc[a][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; ++t) {
      const float* vt = v + t * key_stride + i0;
      __m512 vc[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) vc[c] = c < chunks ? _mm512_loadu_ps(vt + 16 * c) : _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int a = 0; a < kQueries; ++a) {
        const __m512 w = _mm512_set1_ps(es[a][t]);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[a][c] = _mm512_fmadd_ps(w, vc[c], acc[a][c]);
      }
    }
    for (int a = 0; a < count; ++a) {
      const __m512 s = _mm512_set1_ps(1.f / total[a]);
      for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(out[a] + i0 + 16 * c, _mm512_mul_ps(acc[a][c], s));
    }
  }
}

#pragma GCC pop_options

bool avx512_attention_available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool avx512_attention_enabled = avx512_attention_available();

// Up to kQueries query vectors (each with the mask row of its query row, nullptr: all
// keys) over one kv head's keys 0..keys-1 (every key each of them sees). For each query vector alone, whatever the
// others: its scores (the same dot product for every key), their maximum over the
// keys it sees, e = exp(score - max) for those keys and exactly 0 for the others, their
// sum in ascending key order, and the e-weighted sum of values in ascending key order
// (a masked key adds 0 * v, which leaves the sum as it is). A query row's result is
// therefore the one a one-row step over the same keys gets.
void attend_block(const float* const* q, const bool* const* seen, int count, const float* k, const float* v,
                  int64_t key_stride, int64_t keys, int64_t d, float scale, float* e, float* const* out) {
  // Missing query vectors (count < kQueries) repeat the first; their results are dropped.
  const float* qa[kQueries];
  float* es[kQueries];
  for (int a = 0; a < kQueries; ++a) {
    qa[a] = q[a < count ? a : 0];
    es[a] = e + a * keys;
  }
  const bool wide = avx512_attention_enabled && d % 16 == 0;
  if (wide) {
    scores_avx512(qa, es, k, key_stride, keys, d, scale);
  } else {
    scores_avx2(qa, es, k, key_stride, keys, d, scale);
  }
  const int64_t k8 = keys - keys % kLanes;
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  for (int a = 0; a < kQueries; ++a) {  // masked keys to -inf (exp: exactly 0); the maximum; exp
    float* ea = es[a];
    const bool* m = a < count ? seen[a] : nullptr;
    __m256 top8 = neg_inf;
    int64_t t = 0;
    for (; t < k8; t += kLanes) {
      __m256 sc = _mm256_loadu_ps(ea + t);
      if (m != nullptr) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + t));  // bool: 0 or 1
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256()));
        sc = _mm256_blendv_ps(neg_inf, sc, keep);
        _mm256_storeu_ps(ea + t, sc);
      }
      top8 = _mm256_max_ps(top8, sc);
    }
    float lanes[kLanes], top = -INFINITY;
    _mm256_storeu_ps(lanes, top8);
    for (int l = 0; l < kLanes; ++l) top = std::max(top, lanes[l]);
    for (; t < keys; ++t) {
      if (m != nullptr && !m[t]) ea[t] = -INFINITY;
      top = std::max(top, ea[t]);
    }
    const __m256 topv = _mm256_set1_ps(top);
    for (t = 0; t < k8; t += kLanes) _mm256_storeu_ps(ea + t, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(ea + t), topv)));
    if (t < keys) {  // the last few keys through the same vector code
      float tail[kLanes];
      for (int l = 0; l < kLanes; ++l) tail[l] = t + l < keys ? ea[t + l] : -INFINITY;
      _mm256_storeu_ps(tail, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), topv)));
      for (int l = 0; t + l < keys; ++l) ea[t + l] = tail[l];
    }
  }
  // Each query vector's sum in ascending key order (a masked key adds exactly 0); the four
  // sums side by side, so that their chains of additions overlap.
  float total[kQueries] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t t = 0; t < keys; ++t)
#pragma GCC unroll 4
    for (int a = 0; a < kQueries; ++a) total[a] += es[a][t];
  if (wide) {
    weighted_values_avx512(es, total, count, v, key_stride, keys, d, out);
  } else {
    weighted_values_avx2(es, total, count, v, key_stride, keys, d, out);
  }
}

// One sequence's attention for attend_all: n query rows, q[h, i] at q + h * q_head + i * q_row
// (d floats each); its keys and values k[kvh, t] at k + kvh * kv_head + t * key_stride (v alike);
// mask (n, keys) row-major or nullptr (all); row i's result at y + i * y_row + h * d.
struct AttendJob {
  const float* q;
  int64_t q_head, q_row;
  const float* k;
  const float* v;
  int64_t kv_head, key_stride;
  const bool* mask;
  int64_t n, keys;
  float* y;
  int64_t y_row;
};

// The attention of every job in one parallel loop: tasks are (job, kv head, block of
// kQueries query vectors), a kv head's query vectors being its `group` heads at each row.
void attend_all(const std::vector<AttendJob>& jobs, int64_t heads, int64_t kv_heads, int64_t d) {
  const int64_t group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  std::vector<int64_t> first_task(jobs.size() + 1, 0), blocks(jobs.size());
  int64_t max_keys = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    blocks[j] = (group * jobs[j].n + kQueries - 1) / kQueries;
    first_task[j + 1] = first_task[j] + kv_heads * blocks[j];
    max_keys = std::max(max_keys, jobs[j].keys);
  }
  parallel_for(0, first_task.back(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> e(kQueries * max_keys);
    for (int64_t task = t0; task < t1; ++task) {
      const size_t j = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const AttendJob& job = jobs[j];
      const int64_t local = task - first_task[j], kvh = local / blocks[j], g0 = (local % blocks[j]) * kQueries;
      const float* qv[kQueries];
      const bool* seen[kQueries];
      float* out[kQueries];
      const int count = static_cast<int>(std::min<int64_t>(kQueries, group * job.n - g0));
      for (int a = 0; a < count; ++a) {
        const int64_t i = (g0 + a) / group, h = kvh * group + (g0 + a) % group;
        qv[a] = job.q + h * job.q_head + i * job.q_row;
        seen[a] = job.mask == nullptr ? nullptr : job.mask + i * job.keys;
        out[a] = job.y + i * job.y_row + h * d;
      }
      // Keys after the last one any of these rows sees (a prompt's causal rows) are skipped.
      int64_t limit = job.mask == nullptr ? job.keys : 0;
      for (int a = 0; a < count && limit < job.keys; ++a)
        for (int64_t t = job.keys - 1; t >= limit; --t)
          if (seen[a][t]) {
            limit = t + 1;
            break;
          }
      const int64_t kv = kvh * job.kv_head;
      attend_block(qv, seen, count, job.k + kv, job.v + kv, job.key_stride, limit, d, scale, e.data(), out);
    }
  });
}

}  // namespace

// Whether the kernels take their AVX-512 paths where the CPU has them: bfloat16 rows against
// bfloat16 weights in linear (AVX512-BF16 dot products) and attention's scores and weighted
// values (16 lanes). `enable` false turns them off (tests of the AVX2 paths on a CPU that has
// both), true turns them on where the CPU has them. Their sums round otherwise than the AVX2
// paths', so a process keeps one setting while it decodes. Returns whether any is on.
bool use_avx512(bool enable) {
  avx512_bf16_enabled = enable && __builtin_cpu_supports("avx512bf16");
  avx512_attention_enabled = enable && avx512_attention_available();
  return avx512_bf16_enabled || avx512_attention_enabled;
}

// Attention of n query rows over keys/values in float32, a query row's result independent of
// the other rows (attend_block): a token tree's row gets the numbers a one-row step over the
// same keys gets. q (B, heads, n, d), k, v (B, kv_heads, keys, d) with unit stride in d (cache
// views); mask (n, keys) bool or None (all). Returns (B, n, heads * d) float32.
torch::Tensor attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                        const c10::optional<torch::Tensor>& mask_in) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "attention: float32 keys and values");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides() && k.sizes() == v.sizes(), "attention: k, v layout");
  const auto q = q_in.to(at::kFloat);
  const int64_t B = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);
  TORCH_CHECK(d % kLanes == 0 && heads % kv_heads == 0 && q.stride(3) == 1, "attention: head_dim % 8 and heads % kv_heads");
  torch::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == keys, "attention: mask must be (n, keys)");
  }
  auto y = torch::empty({B, n, heads * d}, q.options());
  std::vector<AttendJob> jobs;
  for (int64_t b = 0; b < B; ++b)
    jobs.push_back({q.data_ptr<float>() + b * q.stride(0), q.stride(1), q.stride(2), k.data_ptr<float>() + b * k.stride(0),
                    v.data_ptr<float>() + b * v.stride(0), k.stride(1), k.stride(2),
                    mask.defined() ? mask.data_ptr<bool>() : nullptr, n, keys, y.data_ptr<float>() + b * n * heads * d,
                    heads * d});
  attend_all(jobs, heads, kv_heads, d);
  return y;
}

namespace {

// A decoder layer's first part: the norm, the fused q/k/v projection, rotary angles on the
// q and k heads. h (..., rows, dim); cos, sin (rows, d) or as many leading dims as h.
torch::Tensor projected_qkv(const torch::Tensor& h, const torch::Tensor& norm1, const torch::Tensor& qkv_w,
                            const c10::optional<torch::Tensor>& qkv_b, double eps, int64_t heads, int64_t kv_heads, int64_t d,
                            const torch::Tensor& cos, const torch::Tensor& sin) {
  auto qkv = ::linear(::rms_norm(h, norm1, eps), qkv_w, qkv_b, false);
  const auto rows = qkv.sizes().slice(0, qkv.dim() - 1);
  std::vector<int64_t> angle_shape(rows.begin(), rows.end());
  angle_shape.push_back(d);
  ::rotary_(qkv, cos.dim() < qkv.dim() ? cos.expand(angle_shape) : cos, sin.dim() < qkv.dim() ? sin.expand(angle_shape) : sin,
            heads + kv_heads, d);
  return qkv;
}

// Attention of a block of rows (1 or B sequences of n rows) over one cache: the new keys and
// values into slots [length, length + n), attention over prefix + new in float32.
torch::Tensor cached_attention(const torch::Tensor& qkv, int64_t heads, int64_t kv_heads, int64_t d,
                               const c10::optional<torch::Tensor>& mask, torch::Tensor cache_k, torch::Tensor cache_v,
                               int64_t length) {
  const int64_t B = qkv.size(0), n = qkv.size(1);
  TORCH_CHECK(length + n <= cache_k.size(2), "decoder layer: no room in the cache");
  const auto parts = qkv.split_with_sizes({heads * d, kv_heads * d, kv_heads * d}, -1);
  const auto q = parts[0].view({B, n, heads, d}).transpose(1, 2);
  const auto k = parts[1].view({B, n, kv_heads, d}).transpose(1, 2);
  const auto v = parts[2].view({B, n, kv_heads, d}).transpose(1, 2);
  cache_k.slice(2, length, length + n).copy_(k);
  cache_v.slice(2, length, length + n).copy_(v);
  return ::attention(q.to(at::kFloat), cache_k.slice(2, 0, length + n), cache_v.slice(2, 0, length + n), mask);
}

// The new keys and values of rows [offset, offset + n) of the fused projection `qkv` (rows
// `row` elements apart: q heads, then k heads, then v heads) into slots [length, length + n)
// of a layer's float32 cache slices (1, kv_heads, max_len, d): what copy_ does, without
// its dispatch (two calls a sequence a layer add up in a batched step).
template <typename T>
void store_kv(const T* qkv, int64_t row, int64_t offset, int64_t n, int64_t heads, int64_t kv_heads, int64_t d,
              const torch::Tensor& cache_k, const torch::Tensor& cache_v, int64_t length) {
  float* k = cache_k.data_ptr<float>();
  float* v = cache_v.data_ptr<float>();
  const int64_t head_stride = cache_k.stride(1), key_stride = cache_k.stride(2);
  for (int64_t i = 0; i < n; ++i) {
    const T* src = qkv + (offset + i) * row + heads * d;
    for (int64_t h = 0; h < kv_heads; ++h) {
      float* kd = k + h * head_stride + (length + i) * key_stride;
      float* vd = v + h * head_stride + (length + i) * key_stride;
      for (int64_t j = 0; j < d; ++j) {
        kd[j] = static_cast<float>(src[h * d + j]);
        vd[j] = static_cast<float>(src[(kv_heads + h) * d + j]);
      }
    }
  }
}

// A decoder layer's last part: the output projection and residual, then the MLP (norm,
// fused gate/up projection, silu(gate) * up, down projection) and its residual.
torch::Tensor attention_out_and_mlp(const torch::Tensor& h, const torch::Tensor& y, const torch::Tensor& o_w,
                                    const c10::optional<torch::Tensor>& o_b, const torch::Tensor& norm2,
                                    const torch::Tensor& gate_up_w, const c10::optional<torch::Tensor>& gate_up_b,
                                    const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_b, double eps) {
  const auto after_attention = h + ::linear(y.to(h.scalar_type()), o_w, o_b, false);
  const auto gate_up = ::linear(::rms_norm(after_attention, norm2, eps), gate_up_w, gate_up_b, false).chunk(2, -1);
  return after_attention + ::linear(at::silu(gate_up[0]) * gate_up[1], down_w, down_b, false);
}

}  // namespace

// One decoder layer (pre-norm attention, then a SwiGLU MLP) in one call: the same kernels
// and ATen ops as workers.model.DecoderLayer runs op by op on the native kernels, in the same
// order and dtypes, so the result is bit-identical; what it saves is Python's dispatch of
// ~20 ops a layer (~3 ms of a 13 ms bfloat16 decode step). h (B, n, dim) in the model's
// dtype; cos, sin (n, d) or (B, n, d); mask (n, keys) bool or None; cache_k, cache_v
// (B, kv_heads, max_len, d) float32, this layer's slice of the cache, whose slots
// [length, length + n) receive the new keys and values.
torch::Tensor decoder_layer(const torch::Tensor& h, const torch::Tensor& norm1, const torch::Tensor& qkv_w,
                            const c10::optional<torch::Tensor>& qkv_b, const torch::Tensor& o_w,
                            const c10::optional<torch::Tensor>& o_b, const torch::Tensor& norm2,
                            const torch::Tensor& gate_up_w, const c10::optional<torch::Tensor>& gate_up_b,
                            const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_b, double eps,
                            int64_t heads, int64_t kv_heads, int64_t d, const torch::Tensor& cos, const torch::Tensor& sin,
                            const c10::optional<torch::Tensor>& mask, torch::Tensor cache_k, torch::Tensor cache_v,
                            int64_t length) {
  TORCH_CHECK(h.dim() == 3, "decoder_layer: h (B, n, dim)");
  const auto qkv = projected_qkv(h, norm1, qkv_w, qkv_b, eps, heads, kv_heads, d, cos, sin);
  const auto y = cached_attention(qkv, heads, kv_heads, d, mask, cache_k, cache_v, length);
  return attention_out_and_mlp(h, y, o_w, o_b, norm2, gate_up_w, gate_up_b, down_w, down_b, eps);
}

// decoder_layer over the rows of several sequences, each with its own cache (a batched step
// of several requests, workers.batched_step): h (1, R, dim), sequence s owning the next
// rows[s] rows, with masks[s] (rows[s], keys) or an empty tensor (attend to all), its
// layer's cache slices caches_k[s], caches_v[s] and committed length lengths[s]; cos, sin
// (R, d). Products run once over all R rows, attention per sequence (all of them in one
// parallel loop); a row's result is the one the sequence's own decoder_layer gives it
// (every kernel computes a row on its own).
torch::Tensor ragged_decoder_layer(const torch::Tensor& h, const torch::Tensor& norm1, const torch::Tensor& qkv_w,
                                   const c10::optional<torch::Tensor>& qkv_b, const torch::Tensor& o_w,
                                   const c10::optional<torch::Tensor>& o_b, const torch::Tensor& norm2,
                                   const torch::Tensor& gate_up_w, const c10::optional<torch::Tensor>& gate_up_b,
                                   const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_b, double eps,
                                   int64_t heads, int64_t kv_heads, int64_t d, const torch::Tensor& cos,
                                   const torch::Tensor& sin, const std::vector<int64_t>& rows,
                                   const std::vector<torch::Tensor>& masks, const std::vector<torch::Tensor>& caches_k,
                                   const std::vector<torch::Tensor>& caches_v, const std::vector<int64_t>& lengths) {
  const size_t S = rows.size();
  TORCH_CHECK(h.dim() == 3 && h.size(0) == 1, "ragged_decoder_layer: h (1, rows, dim)");
  TORCH_CHECK(masks.size() == S && caches_k.size() == S && caches_v.size() == S && lengths.size() == S,
              "ragged_decoder_layer: one mask, cache and length per sequence");
  TORCH_CHECK(d % kLanes == 0 && heads % kv_heads == 0, "ragged_decoder_layer: head_dim % 8 and heads % kv_heads");
  const int64_t R = h.size(1);
  const auto qkv = projected_qkv(h, norm1, qkv_w, qkv_b, eps, heads, kv_heads, d, cos, sin);
  TORCH_CHECK(qkv.is_contiguous(), "ragged_decoder_layer: a contiguous projection");
  const auto q = qkv.slice(2, 0, heads * d).to(at::kFloat).contiguous();  // (1, R, heads * d)
  auto y = torch::empty({1, R, heads * d}, q.options());
  std::vector<torch::Tensor> bool_masks(S);
  std::vector<AttendJob> jobs;
  int64_t offset = 0;
  for (size_t s = 0; s < S; ++s) {  // each sequence's new keys and values into its cache; its attention job
    const int64_t n = rows[s], length = lengths[s], keys = length + n;
    const auto& ck = caches_k[s];
    TORCH_CHECK(ck.scalar_type() == at::kFloat && ck.stride(3) == 1 && ck.strides() == caches_v[s].strides() && keys <= ck.size(2),
                "ragged_decoder_layer: float32 caches with room for the new rows");
    if (qkv.scalar_type() == at::kBFloat16) {
      store_kv(qkv.data_ptr<at::BFloat16>(), qkv.stride(1), offset, n, heads, kv_heads, d, ck, caches_v[s], length);
    } else {
      TORCH_CHECK(qkv.scalar_type() == at::kFloat, "ragged_decoder_layer: float32 or bfloat16 rows");
      store_kv(qkv.data_ptr<float>(), qkv.stride(1), offset, n, heads, kv_heads, d, ck, caches_v[s], length);
    }
    const bool* mask = nullptr;
    if (masks[s].defined() && masks[s].numel()) {
      bool_masks[s] = masks[s].to(at::kBool).contiguous();
      TORCH_CHECK(bool_masks[s].dim() == 2 && bool_masks[s].size(0) == n && bool_masks[s].size(1) == keys,
                  "ragged_decoder_layer: a mask must be (rows, keys)");
      mask = bool_masks[s].data_ptr<bool>();
    }
    jobs.push_back({q.data_ptr<float>() + offset * heads * d, d, heads * d, ck.data_ptr<float>(), caches_v[s].data_ptr<float>(),
                    ck.stride(1), ck.stride(2), mask, n, keys, y.data_ptr<float>() + offset * heads * d, heads * d});
    offset += n;
  }
  TORCH_CHECK(offset == R, "ragged_decoder_layer: the sequences' rows must add up to h's");
  attend_all(jobs, heads, kv_heads, d);  // every sequence's attention in one parallel loop
  return attention_out_and_mlp(h, y, o_w, o_b, norm2, gate_up_w, gate_up_b, down_w, down_b, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel lets go of the GIL while it computes (they touch no Python object): threads
  // decoding other requests (workers.batched_step) run their Python between the layers of a pass.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "y = x @ w.T (+ b): few rows, weights streamed once (AVX2 FMA, or AVX512-BF16)", no_gil);
  m.def("prompt_linear", &prompt_linear, "y = x @ w.T (+ b): many rows, on AMX tiles where the CPU has them, else linear",
        no_gil);
  m.def("use_amx", &use_amx, "turn prompt_linear's AMX path on (where the CPU and OS allow it) or off");
  m.def("use_avx512", &use_avx512, "turn the AVX-512 paths of linear and attention on (where the CPU has them) or off");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, rounding as the reference does", no_gil);
  m.def("rotary_", &rotary_, "rotary embedding in place on the q and k heads of the fused projection", no_gil);
  m.def("attention", &attention, "attention in float32, each query row independent of the others", no_gil);
  m.def("decoder_layer", &decoder_layer, "one decoder layer, the kernels above and ATen's ops in the model's order", no_gil);
  m.def("ragged_decoder_layer", &ragged_decoder_layer, "decoder_layer over the rows of several sequences, each with its own cache",
        no_gil);
}
