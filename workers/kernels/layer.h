// A whole decoder layer in one call, alone or over several sequences (part of cpu_kernels.cpp:
// included there, in order).
#pragma once

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
