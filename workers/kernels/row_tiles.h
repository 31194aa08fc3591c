// Row tiles: how a product y = x @ w.T walks its rows, written once and compiled twice by
// products.h (no include guard): in namespace avx2 over its float32 block, and in namespace
// avx512, under the AVX512-BF16 target, over its bfloat16 block. `block<R, C>` (the
// namespace's own) takes R rows of x against C weight rows, all of the k inputs.
//
// Weight rows [j0, j1) meet all n rows of x in tiles of kRowTile rows, each block of C
// weight rows staying in L1 while every row of the tile meets it.

// The last rows of a tile (fewer than R) together: their dot products are independent
// chains of FMAs that overlap (one row at a time waits on each FMA's latency).
template <int C, int Rest, typename X, typename W>
inline void rest_rows(const X* x, int64_t rows, const W* w, int64_t k, float* y, int64_t m) {
  if constexpr (Rest > 0) {
    if (rows == Rest) return block<Rest, C>(x, k, w, k, y, m);
    rest_rows<C, Rest - 1>(x, rows, w, k, y, m);
  }
}

template <int R, int C, typename X, typename W>
void columns(const X* x, int64_t n, const W* w, int64_t k, float* y, int64_t m, int64_t j0, int64_t j1) {
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

// Threads split the weight rows (parallel_for: the kernels' own pool). Grain: enough rows
// per task that scheduling costs little.
template <int R, int C, typename X, typename W>
void linear_blocks(const X* x, int64_t n, const W* w, int64_t k, float* y, int64_t m) {
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 16) / std::max<int64_t>(k, 1)) / C * C;
  parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { columns<R, C>(x, n, w, k, y, m, j0, j1); });
}
