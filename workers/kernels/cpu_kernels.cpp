// The native CPU kernels of the forward pass (workers.kernels.native), one translation unit
// in parts, each included in order:
//
//   thread_pool.h  the kernels' own pool and parallel_for (outside the main thread)
//   products.h     linear (rows of x against weights streamed once: AMX tiles from
//                  amx_gemm.h where the CPU has them, else AVX512-BF16 or AVX2) and
//                  prompt_linear (many rows); row_tiles.h, the walk over rows and weight
//                  rows, compiled there once per target
//   norms.h        rms_norm, rotary_
//   attention.h    attention in float32, AVX2 or 16 AVX-512 lanes
//   quant.h        linear_q: products with the GGUF file's quantized blocks (Q4_1, Q5_0,
//                  Q8_0; Q4_K, Q6_K in quant_k.h), x in float32, or in int8 (quant_i8.h,
//                  quant_i8_block.h; not the K formats); quant_tiles.h
//                  its tiling, compiled once per target. linear and prompt_linear hand
//                  uint8 and int8 (quantized) weights to it
//   layer.h        decoder_layer and ragged_decoder_layer: a whole layer through the above
//
// Every kernel computes each row of its output on its own, in a fixed order whatever the
// other rows, their grouping or the thread count: a token tree's rows get exactly the
// numbers a one-row decode step would, which makes bfloat16 tree decoding lossless.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <immintrin.h>
#include <omp.h>

#include "amx_gemm.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>


#include "thread_pool.h"

// quant.h (below) defines it; linear hands it uint8 and int8 (quantized) weights.
torch::Tensor linear_q(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, bool float_out);
torch::Tensor dequantize_bf16(const torch::Tensor& w);

#include "products.h"
#include "norms.h"
#include "attention.h"
#include "quant.h"
#include "layer.h"

// Which paths are on now: (AMX tiles, AVX512-BF16 products, AVX-512 attention).
std::tuple<bool, bool, bool> paths_on() { return {amx_enabled, avx512_bf16_enabled, avx512_attention_enabled}; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel lets go of the GIL while it computes (they touch no Python object): threads
  // decoding other requests (workers.batched_step) run their Python between the layers of a pass.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "y = x @ w.T (+ b): weights streamed once (AMX tiles, AVX512-BF16 or AVX2 FMA)", no_gil);
  m.def("prompt_linear", &prompt_linear, "y = x @ w.T (+ b): many rows; quantized weights on AMX de-quantized to bfloat16 for the tiles, else linear",
        no_gil);
  m.def("use_amx", &use_amx, "turn the AMX path of linear and prompt_linear on (where the CPU and OS allow it) or off");
  m.def("paths_on", &paths_on, "which paths are on: (AMX tiles, AVX512-BF16 products, AVX-512 attention)");
  m.def("use_avx512", &use_avx512, "turn the AVX-512 paths of linear and attention on (where the CPU has them) or off");
  m.def("linear_q", &linear_q, "y = x @ W.T (+ b), W the GGUF file's blocks (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K): uint8, x in float32; int8, x in int8",
        no_gil);
  m.def("use_vnni", &use_vnni, "turn linear_q's AVX-VNNI dot products (int8 x) on (where the CPU has them) or off");
  m.def("dequantize_bf16", &dequantize_bf16, "quantized blocks (out, blocks, bytes) -> (out, in) bfloat16, as gguf-py then .to(bfloat16)",
        no_gil);
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, rounding as the reference does", no_gil);
  m.def("rotary_", &rotary_, "rotary embedding in place on the q and k heads of the fused projection", no_gil);
  m.def("attention", &attention, "attention in float32, each query row independent of the others", no_gil);
  m.def("decoder_layer", &decoder_layer, "one decoder layer, the kernels above and ATen's ops in the model's order", no_gil);
  m.def("ragged_decoder_layer", &ragged_decoder_layer, "decoder_layer over the rows of several sequences, each with its own cache",
        no_gil);
}
