// Attention in float32, each query row on its own (part of cpu_kernels.cpp: included there, in order).
#pragma once

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
