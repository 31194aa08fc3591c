// bfloat16 products on Intel AMX tiles (products.h: linear and prompt_linear on CPUs that have
// them): y (n, m) float32 = x (n, k) @ w (m, k).T, for any number of rows, from a decode
// step's one to a prompt's hundreds.
//
// Why our own: oneDNN (PyTorch's GEMM) picks among its kernels by the row count, and on AMX
// CPUs the kernels it picks round differently, so a position got other bits when a
// different number of rows shared its call (another mode, another thread count). Here every
// output is one fixed sum whatever the call: TDPBF16PS adds into each float32 element its 32
// products of a k-chunk in one order the instruction defines, the chunks in ascending order
// of k, and an element's row of x meets no other row's data. A row's result is the same
// alone, in any group of rows, on any thread count, and on either walk below.
//
// Layout. A tiles are 16 weight rows x 32 bfloat16 of k; B tiles are 16 rows of x in the pair
// layout TDPBF16PS wants: tile row p holds (x[r][2p], x[r][2p + 1]) for r = 0..15, i.e. the
// 16 x 16 matrix of x's bfloat16 pairs, transposed (pack_x, once per call). C tiles hold 16
// weight rows x 16 x rows (y transposed), turned back as they are stored (store_c). Each
// step of the inner loop (tile_pass): 2 A tiles x 2 B tiles into 4 C tiles (32 x 32 outputs),
// a tile with no row of x or w in it left out. Zeros pad the other rows beyond n and m and
// the bfloat16 beyond k (0 * 0 adds nothing).
//
// Two walks, by the row count (gemm_bf16):
// - few rows (a decode or tree step, up to kStreamedRows): the A tiles are loaded straight
//   from w, 16 rows of it at a stride, so the weights are read once, from memory, as in the
//   one-row kernels (streamed_columns). One tile multiply covers 16 rows of x for the cost of
//   one: on a 2-core AMX VM the 135M's 121 products of a step take ~12 ms for 1 to 16 rows
//   and ~15 for 32, against 12, 32 and 60 ms on the AVX512-BF16 kernels (linear_bf16).
// - many rows (a prompt): each block of 32 weight rows is copied once into one contiguous
//   buffer and meets every row group from there (packed_columns): a 512-token prefill of the
//   135M in 262 ms against 234 ms through oneDNN and 870 ms on the one-row kernels.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

namespace amx {

// Whether this CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22) and Linux
// lets this process use the tile data (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: a
// process must ask once; the answer covers all its threads).
inline bool request() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

constexpr int64_t kChunk = 32;  // bfloat16 of k per tile row
constexpr int64_t kTile = 16;   // rows per tile

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

// Transposes the 16 x 16 matrix of 32-bit elements r[row] in place (r[c] becomes column c):
// pairs of rows interleaved, then pairs of pairs, then 128-bit lanes across rows 4 apart.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i s[16];  // s[4i + q], 128-bit lane L: column 4L + q of rows 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // lanes 0 and 2 (0x88) or 1 and 3 (0xdd) of each operand
    const __m512i u = _mm512_shuffle_i32x4(s[q], s[4 + q], 0x88), v = _mm512_shuffle_i32x4(s[8 + q], s[12 + q], 0x88);
    const __m512i u2 = _mm512_shuffle_i32x4(s[q], s[4 + q], 0xdd), v2 = _mm512_shuffle_i32x4(s[8 + q], s[12 + q], 0xdd);
    r[q] = _mm512_shuffle_i32x4(u, v, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(u, v, 0xdd);
    r[4 + q] = _mm512_shuffle_i32x4(u2, v2, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(u2, v2, 0xdd);
  }
}

// Packs x (n, k) into B tiles: for each pair of 16-row groups and k-chunk c, the two groups'
// 16 x 16 uint32 (1 KB each) side by side, at (((g / 2) * chunks + c) * 2 + g % 2) * 256, so
// the inner loop reads one stream; rows beyond n and bfloat16 beyond k are zeros.
inline void pack_x(const uint16_t* x, int64_t n, int64_t k, int64_t groups, int64_t chunks, uint32_t* out) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i = c * kChunk;
      const __mmask32 mask = k - i >= kChunk ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (k - i)) - 1);
      __m512i r[kTile];
      for (int64_t t = 0; t < kTile; ++t) {
        const int64_t row = g * kTile + t;
        r[t] = row < n ? _mm512_maskz_loadu_epi16(mask, x + row * k + i) : _mm512_setzero_si512();
      }
      transpose16(r);  // r[p]: pair p of the chunk for the group's 16 rows
      uint32_t* tile = out + (((g / 2) * chunks + c) * 2 + g % 2) * (kTile * kTile);
      for (int64_t p = 0; p < kTile; ++p) _mm512_storeu_si512(tile + p * kTile, r[p]);
    }
}

// A C tile (16 weight rows a x 16 x rows r, float32 [a][r]) into y[rr + r][jj + a].
inline void store_c(const float* c, float* y, int64_t n, int64_t m, int64_t rr, int64_t jj) {
  __m512i r[kTile];
  for (int t = 0; t < kTile; ++t) r[t] = _mm512_loadu_si512(c + t * kTile);
  transpose16(r);  // r[t]: x row rr + t, weight rows jj..jj+15
  const __mmask16 mask = m - jj >= kTile ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (m - jj)) - 1);
  for (int64_t t = 0; t < kTile && rr + t < n; ++t) _mm512_mask_storeu_epi32(y + (rr + t) * m + jj, mask, r[t]);
}

// Weight rows [j, j + 32) as A tiles, copied once per block of 32 rows so that the inner loop
// reads two contiguous streams: chunk c's two tiles at c * 1024 bfloat16 (rows j..j+15, then
// j+16..j+31), 32 bfloat16 a row; rows beyond m and bfloat16 beyond k are zeros.
inline void pack_w(const uint16_t* w, int64_t m, int64_t k, int64_t j, int64_t chunks, uint16_t* out) {
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i = c * kChunk;
    const __mmask32 mask = k - i >= kChunk ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (k - i)) - 1);
    for (int64_t r = 0; r < 2 * kTile; ++r) {
      const __m512i v = j + r < m ? _mm512_maskz_loadu_epi16(mask, w + (j + r) * k + i) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + (c * 2 * kTile + r) * kChunk, v);
    }
  }
}

// One pass of both walks below: the A tiles of weight rows j.. (a0; a1 for rows j + 16..,
// when `two`) against the B tiles of row groups g (b; group g + 1 beside it, when `pair`),
// summed over the chunks into C tiles and stored into y. A chunk's A tile is a_step
// bfloat16 after the previous one, its rows a_stride bytes apart.
inline void tile_pass(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t a_stride, bool two, const uint32_t* b,
                      bool pair, int64_t chunks, float* y, int64_t n, int64_t m, int64_t g, int64_t j) {
  alignas(64) float out[4][kTile * kTile];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c, b += 2 * kTile * kTile) {  // the pair's B tiles: chunk c at c * 512 uint32
    _tile_loadd(4, a0 + c * a_step, a_stride);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (pair) {
      _tile_loadd(7, b + kTile * kTile, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (two) {
      _tile_loadd(5, a1 + c * a_step, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      if (pair) _tile_dpbf16ps(3, 5, 7);
    }
  }
  for (int t = 0; t < 4; ++t) {  // C tile t: weight rows j + 16 * (t / 2), x rows of group g + t % 2
    if ((t % 2 && !pair) || (t / 2 && !two)) continue;
    switch (t) {  // _tile_stored takes a constant tile number
      case 0: _tile_stored(0, out[0], 64); break;
      case 1: _tile_stored(1, out[1], 64); break;
      case 2: _tile_stored(2, out[2], 64); break;
      default: _tile_stored(3, out[3], 64);
    }
    store_c(out[t], y, n, m, (g + t % 2) * kTile, j + kTile * (t / 2));
  }
}

inline void full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = kTile, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// Weight rows [j0, j1) (multiples of 32 apart from the end at m), copied block by block
// (pack_w), against the `groups` row groups that hold rows of x; y (n, m) float32.
inline void packed_columns(const uint32_t* xp, int64_t n, int64_t groups, int64_t chunks, const uint16_t* w, int64_t m,
                           int64_t k, float* y, int64_t j0, int64_t j1) {
  full_tiles();
  std::vector<uint16_t> ap(static_cast<size_t>(chunks * 2 * kTile * kChunk));
  for (int64_t j = j0; j < j1; j += 2 * kTile) {
    pack_w(w, m, k, j, chunks, ap.data());  // chunk c's two A tiles at c * 1024, the second 512 after the first
    for (int64_t g = 0; g < groups; g += 2)
      tile_pass(ap.data(), ap.data() + kTile * kChunk, 2 * kTile * kChunk, 64, j + kTile < j1, xp + g * chunks * (kTile * kTile),
                g + 1 < groups, chunks, y, n, m, g, j);
  }
  _tile_release();
}

// Weight rows [j0, j1) (multiples of 16, k a multiple of 32) as A tiles loaded straight from
// w at a stride of one weight row, against the `groups` row groups that hold rows of x, two
// groups a pass; each block of 32 weight rows meets all the groups before the next is read,
// so the weights come from memory once (their later passes find them in L2). A software
// prefetch measured slower.
inline void streamed_columns(const uint32_t* xp, int64_t n, int64_t groups, int64_t chunks, const uint16_t* w, int64_t m,
                             int64_t k, float* y, int64_t j0, int64_t j1) {
  full_tiles();
  for (int64_t j = j0; j < j1; j += 2 * kTile)
    for (int64_t g = 0; g < groups; g += 2)
      tile_pass(w + j * k, w + (j + kTile) * k, kChunk, k * 2, j + kTile < j1, xp + g * chunks * (kTile * kTile), g + 1 < groups,
                chunks, y, n, m, g, j);
  _tile_release();
}

#pragma GCC pop_options

// Rows of x up to which the weights are streamed (streamed_columns) rather than packed:
// packing pays once many row groups reuse each block.
constexpr int64_t kStreamedRows = 64;

// y (n, m) = x (n, k) @ w (m, k).T, bfloat16 in, float32 out. Threads split the weight rows
// in blocks of 32 (parallel_for: the caller's, which never changes a result here).
inline void gemm_bf16(const uint16_t* x, int64_t n, const uint16_t* w, int64_t k, float* y, int64_t m,
                      const std::function<void(int64_t, int64_t, int64_t, const std::function<void(int64_t, int64_t)>&)>& parallel_for) {
  const int64_t groups = (n + kTile - 1) / kTile;  // groups of 16 rows of x
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  const int64_t packed = (groups + 1) / 2 * 2;  // an even count: B tiles are laid out in pairs
  std::unique_ptr<uint32_t[]> xp(new uint32_t[static_cast<size_t>(packed * chunks * kTile * kTile)]);  // pack_x fills it all
  pack_x(x, n, k, packed, chunks, xp.get());
  const int64_t blocks = (m + 2 * kTile - 1) / (2 * kTile);
  const bool streamed = n <= kStreamedRows && k % kChunk == 0 && m % kTile == 0;
  parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * 2 * kTile, j1 = std::min(m, b1 * 2 * kTile);
    (streamed ? streamed_columns : packed_columns)(xp.get(), n, groups, chunks, w, m, k, y, j0, j1);
  });
}

}  // namespace amx
