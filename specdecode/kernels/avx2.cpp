// The `avx2` kernel: int4 / int8 linears for x86-64 CPUs with AVX2 but no AVX-512 (AMD Zen 1-3,
// Intel before Ice Lake, most laptops), where the AVX-512 kernels of qmatmul.cpp cannot run.
//
// The avx512-vnni kernel's arithmetic in 256-bit registers: each row's activations quantized to
// int8 per group of 32 (x = dx * xq, dx = max|x| / 127, as llama.cpp does), exact integer dot
// products with the weight codes, then per group and output, in fp32 and in this order,
//   int4: tot += (d * sum(q * xq) + m * sum(xq)) * dx        (w = d * q + m)
//   int8: tot += (d * sum(q * xq)) * dx                      (w = d * q)
// Without VNNI's `vpdpbusd` the products go through `vpmaddubsw` (unsigned x signed bytes to
// int16 pair sums) and `vpmaddwd` with ones (to int32):
//   int4: codes 0..15 are the unsigned operand, activations the signed one; a group's eight
//         quads add up in int16 before widening (16 products of at most 15 * 127: no overflow).
//   int8: signed x signed through |w| x (xq with w's sign) (`vpsignb`): a pair sums to at most
//         2 * 128 * 127, so each quad widens to int32 on its own.
// The int32 sums are exact, so they equal VNNI's, and the fp32 steps after them are the same
// instructions lane by lane: results are bitwise those of avx512-vnni (tests/test_kernels.py),
// and a row's result does not depend on how many rows a call has (batch invariance).
// Weights: the VNNI quad layouts (qmatmul.cpp), a tile's 16 outputs as two halves of 8: bytes
// 32h..32h+31 of every 64-byte quad line are outputs 8h..8h+7.

#include "common.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <vector>

#define SD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

using namespace sdk;  // common.h

constexpr int kMaxRows = 8;  // rows per pass over a tile: 8 accumulators + 6 working registers of 16
constexpr int64_t kPrefetchGroups = 8;

struct QuantRows {
  std::vector<int8_t> q;  // [T, K]
  std::vector<float> dx;  // [T, G]
  std::vector<float> sq;  // [T, G] sum of the row's codes per group (exact in fp32)
};

SD_AVX2 inline __m256 bf16x8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

SD_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

SD_AVX2 inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

// qmatmul.cpp's quantize_rows: the same codes (round to nearest even, saturated), scales and sums.
SD_AVX2 QuantRows quantize_rows(const at::BFloat16* x, int64_t T, int64_t K) {
  const int64_t G = K / kGroup;
  QuantRows out{std::vector<int8_t>(T * K), std::vector<float>(T * G), std::vector<float>(T * G)};
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  for (int64_t i = 0; i < T * G; ++i) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = bf16x8(x + i * kGroup + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], absmask));
    }
    const float d = hmax(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)(out.q.data() + i * kGroup), _mm256_permutevar8x32_epi32(bytes, order));
    out.dx[i] = d;
    out.sq[i] = (float)hsum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  }
  return out;
}

SD_AVX2 inline __m256i bcast_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// fp32 -> bf16, round to nearest even (qmatmul.cpp's store_bf16_rne)
SD_AVX2 inline void store_bf16_rne(at::BFloat16* y, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i rounding = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)));
  const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, rounding), 16);  // 8 x uint32 < 65536
  _mm_storeu_si128((__m128i*)y, _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// R rows x TILES tiles of 16 outputs over all groups, one half-tile (8 outputs) at a time.
template <int R, int TILES, bool INT4>
SD_AVX2 void tile_rows(const uint8_t* wt, int64_t tile_bytes, const at::Half* dt, const at::Half* mt,
                       const int8_t* xq, int64_t ldx, const float* dx, const float* sq, int64_t G, at::BFloat16* y,
                       int64_t ldy) {
  constexpr int group_bytes = INT4 ? 256 : 512;
  alignas(32) float tot[TILES * 2][R][8];
  for (auto& half : tot)
    for (auto& row : half) _mm256_store_ps(row, _mm256_setzero_ps());
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* xg = xq + g * kGroup;
    if (g + kPrefetchGroups < G)
      for (int u = 0; u < TILES; ++u)
        for (int line = 0; line < group_bytes; line += 64)
          _mm_prefetch((const char*)(wt + u * tile_bytes + (g + kPrefetchGroups) * group_bytes + line), _MM_HINT_T0);
    for (int h = 0; h < TILES * 2; ++h) {
      const uint8_t* w = wt + (h / 2) * tile_bytes + g * group_bytes + (h % 2) * 32;
      __m256i acc[R];
      if constexpr (INT4) {
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {  // quads 2p (low nibbles) and 2p + 1 (high)
          const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + p * 64));
          const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          for (int r = 0; r < R; ++r) {
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(lo, bcast_quad(xg + r * ldx + 8 * p)));
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(hi, bcast_quad(xg + r * ldx + 8 * p + 4)));
          }
        }
        for (int r = 0; r < R; ++r) acc[r] = _mm256_madd_epi16(acc[r], ones);
      } else {
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; ++qd) {
          const __m256i wq = _mm256_loadu_si256((const __m256i*)(w + qd * 64));
          const __m256i aw = _mm256_abs_epi8(wq);  // -128 -> 128 as the unsigned operand
          for (int r = 0; r < R; ++r) {
            const __m256i xs = _mm256_sign_epi8(bcast_quad(xg + r * ldx + 4 * qd), wq);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
          }
        }
      }
      const int64_t so = (h / 2) * G * kTile + g * kTile + (h % 2) * 8;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dt + so)));
      if constexpr (INT4) {
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mt + so)));
        for (int r = 0; r < R; ++r) {
          const __m256 t = _mm256_fmadd_ps(m, _mm256_set1_ps(sq[r * G + g]), _mm256_mul_ps(d, _mm256_cvtepi32_ps(acc[r])));
          _mm256_store_ps(tot[h][r], _mm256_fmadd_ps(t, _mm256_set1_ps(dx[r * G + g]), _mm256_load_ps(tot[h][r])));
        }
      } else {
        for (int r = 0; r < R; ++r)
          _mm256_store_ps(tot[h][r], _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(acc[r])), _mm256_set1_ps(dx[r * G + g]),
                                                     _mm256_load_ps(tot[h][r])));
      }
    }
  }
  for (int h = 0; h < TILES * 2; ++h)
    for (int r = 0; r < R; ++r) store_bf16_rne(y + r * ldy + h * 8, _mm256_load_ps(tot[h][r]));
}

// Tiles side by side per pass: more independent work for one or two rows.
constexpr int tiles_for(int R) { return R <= 2 ? 2 : 1; }

using TileFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, const int8_t*, int64_t, const float*,
                        const float*, int64_t, at::BFloat16*, int64_t);

template <bool INT4, int... Rs>
struct Kernels {
  static constexpr TileFn wide[] = {tile_rows<Rs, tiles_for(Rs), INT4>...};
  static constexpr TileFn narrow[] = {tile_rows<Rs, 1, INT4>...};
};

template <bool INT4>
using RowKernels = Kernels<INT4, 1, 2, 3, 4, 5, 6, 7, 8>;

template <bool INT4>
at::Tensor qlinear_avx2(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  const auto [x, T, K, tiles, G, N] = linear_shape(x_in, packed, d, INT4);
  if (INT4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "specdecode qlinear: m must match d");
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0) return y;
  const int64_t chunks = (T + kMaxRows - 1) / kMaxRows;
  const QuantRows xr = quantize_rows(x.data_ptr<at::BFloat16>(), T, K);
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto* wp = (const uint8_t*)packed.data_ptr();
  const at::Tensor dc = d.contiguous(), mc = INT4 ? m.contiguous() : d;
  const auto* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = INT4 ? mc.data_ptr<at::Half>() : nullptr;
  const int64_t tile_bytes = K * kTile / (INT4 ? 2 : 1);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    int64_t t0 = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int rows = (int)((T - t0) / (chunks - c));
      const int wide = tiles_for(rows);
      auto run = [&](TileFn fn, int64_t tile) {
        const int64_t so = tile * G * kTile;
        fn(wp + tile * tile_bytes, tile_bytes, dp + so, INT4 ? mp + so : nullptr, xr.q.data() + t0 * K, K,
           xr.dx.data() + t0 * G, xr.sq.data() + t0 * G, G, yp + t0 * N + tile * kTile, N);
      };
      int64_t j = begin;
      for (; j + wide <= end; j += wide) run(RowKernels<INT4>::wide[rows - 1], j);
      for (; j < end; ++j) run(RowKernels<INT4>::narrow[rows - 1], j);
      t0 += rows;
    }
  });
  return y;
}

at::Tensor int4_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  return qlinear_avx2<true>(x, packed, d, m);
}

at::Tensor int8_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d) {
  return qlinear_avx2<false>(x, packed, d, d);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specdecode, m) {
  m.def("int4_linear_avx2(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  m.def("int8_linear_avx2(Tensor x, Tensor packed, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(specdecode, CPU, m) {
  m.impl("int4_linear_avx2", &int4_linear_avx2);
  m.impl("int8_linear_avx2", &int8_linear_avx2);
}
