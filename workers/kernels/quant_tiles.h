// Row tiles of linear_q, written once and compiled twice by quant.h (no include guard): in
// each of quant.h's namespaces, over its own `block<R, C, F>` (R rows of x against C weight
// rows of format F, all blocks of the row) and its own rows of x (type X, `ldx` X a row).
// The same walk as row_tiles.h, over rows of blocks: weight row j starts at byte
// j * row_bytes, row_bytes = blocks * F::kBytes.

// The last rows of a tile (fewer than R) together, R - 1 down to 1.
template <int C, int Rest, class F, class X>
inline void rest_rows(const X* x, int64_t ldx, int64_t rows, const uint8_t* w, int64_t row_bytes, int64_t blocks, float* y,
                      int64_t m) {
  if constexpr (Rest > 0) {
    if (rows == Rest) return block<Rest, C, F>(x, ldx, w, row_bytes, blocks, y, m);
    rest_rows<C, Rest - 1, F>(x, ldx, rows, w, row_bytes, blocks, y, m);
  }
}

// Weight rows [j0, j1) against all n rows of x, a tile of quant::kRowTile rows at a time.
template <int R, int C, class F, class X>
void columns(const X* x, int64_t ldx, int64_t n, const uint8_t* w, int64_t blocks, float* y, int64_t m, int64_t j0, int64_t j1) {
  const int64_t row_bytes = blocks * F::kBytes;
  for (int64_t r0 = 0; r0 < n; r0 += quant::kRowTile) {
    const int64_t r1 = std::min(n, r0 + quant::kRowTile);
    for (int64_t j = j0; j < j1; j += C) {
      const uint8_t* wj = w + j * row_bytes;
      if (j + C <= j1) {
        int64_t r = r0;
        for (; r + R <= r1; r += R) block<R, C, F>(x + r * ldx, ldx, wj, row_bytes, blocks, y + r * m + j, m);
        rest_rows<C, R - 1, F>(x + r * ldx, ldx, r1 - r, wj, row_bytes, blocks, y + r * m + j, m);
      } else {  // the last few weight rows, one at a time
        for (int64_t jj = j; jj < j1; ++jj)
          for (int64_t rr = r0; rr < r1; ++rr)
            block<1, 1, F>(x + rr * ldx, ldx, w + jj * row_bytes, row_bytes, blocks, y + rr * m + jj, m);
      }
    }
  }
}

// Threads split the weight rows (parallel_for, the kernels' pool); a chunk is a multiple of C rows.
template <int R, int C, class F, class X>
void linear_blocks(const X* x, int64_t ldx, int64_t n, const uint8_t* w, int64_t blocks, float* y, int64_t m) {
  const int64_t grain = std::max<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(blocks * F::kBytes, 1)) / C * C;
  parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { columns<R, C, F>(x, ldx, n, w, blocks, y, m, j0, j1); });
}
