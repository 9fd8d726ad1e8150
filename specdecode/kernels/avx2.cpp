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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define SD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

using namespace sdk;  // common.h

constexpr int kMaxRows = 4;  // rows per pass over a tile: 8 accumulators (4 rows x 2 halves) of 16 registers
constexpr int64_t kPrefetchGroups = 8;

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

// qmatmul.cpp's quantize_groups: the same codes (round to nearest even, saturated), scales and
// sums for groups [lo, hi) of rows x (flat: group i is x[32 i .. 32 i + 31]).
SD_AVX2 void quantize_groups(const at::BFloat16* x, int64_t lo, int64_t hi, int8_t* codes, float* dxs, float* sqs) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  for (int64_t i = lo; i < hi; ++i) {
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
    _mm256_storeu_si256((__m256i*)(codes + i * kGroup), _mm256_permutevar8x32_epi32(bytes, order));
    dxs[i] = d;
    sqs[i] = (float)hsum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  }
}

SD_AVX2 const QuantRows& quantize_rows(const at::BFloat16* x, int64_t T, int64_t K) {
  thread_local QuantRows out;
  out.reserve(T * K, T * (K / kGroup));
  // (plain pointers: a loop through `out` called __tls_get_addr in every iteration)
  quantize_groups(x, 0, T * (K / kGroup), out.q.get(), out.dx.get(), out.sq.get());
  return out;
}

SD_AVX2 inline __m256i bcast_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// An empty asm that takes and gives back each of n vectors in a register: the compiler must
// have them there at this point, so it cannot merge the adds before and after it.
template <int n>
SD_AVX2 inline void keep(__m256i* v) {
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) asm("" : "+x"(v[i]));
}

// fp32 -> bf16, round to nearest even (qmatmul.cpp's store_bf16_rne)
SD_AVX2 inline void store_bf16_rne(at::BFloat16* y, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i rounding = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)));
  const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, rounding), 16);  // 8 x uint32 < 65536
  _mm_storeu_si128((__m128i*)y, _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// R rows x H half-tiles (H / 2 tiles of 16 outputs side by side, 8 outputs a half) over all
// groups. Each row's activations are broadcast once a quad for all H halves (a broadcast a
// `vpmaddubsw` before: a fifth of the instructions); per group and half the same integer sums and
// the same fp32 steps in the same order, so the results are those of one half at a time.
template <int R, int H, bool INT4>
SD_AVX2 void tile_rows(const uint8_t* wt, int64_t tile_bytes, const at::Half* dt, const at::Half* mt,
                       const int8_t* xq, int64_t ldx, const float* dx, const float* sq, int64_t G, at::BFloat16* y,
                       int64_t ldy) {
  static_assert(H % 2 == 0 && R * H <= 8, "8 accumulators at most (16 registers)");
  constexpr int group_bytes = INT4 ? 256 : 512;
  alignas(32) float tot[H][R][8];
  for (auto& half : tot)
    for (auto& row : half) _mm256_store_ps(row, _mm256_setzero_ps());
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* xg = xq + g * kGroup;
    // kPrefetchGroups ahead; near a tile's end, the start of the tile after this call's (the
    // next call's: tiles lie one after another), whose first groups were not prefetched before
    // (a prefetch past the weights' end does not fault)
    const int64_t ahead = g + kPrefetchGroups;
    for (int u = 0; u < H / 2; ++u) {
      const uint8_t* next = ahead < G ? wt + u * tile_bytes + ahead * group_bytes
                                      : wt + (H / 2 + u) * tile_bytes + (ahead - G) * group_bytes;
      for (int line = 0; line < group_bytes; line += 64) _mm_prefetch((const char*)(next + line), _MM_HINT_T0);
    }
    const uint8_t* w[H];
    for (int h = 0; h < H; ++h) w[h] = wt + (h / 2) * tile_bytes + g * group_bytes + (h % 2) * 32;
    __m256i acc[H][R];
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_si256();
    // Half by half within a quad step (a half's unpacked codes live only while its rows use
    // them), and `keep` after each step: the accumulators stay in registers. Without it GCC
    // merged a group's whole chain of adds and computed every product first (17 spilled
    // vectors a quad step, half the kernel's speed). Integer sums: any order gives the same.
    if constexpr (INT4) {
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {  // quads 2p (low nibbles) and 2p + 1 (high)
        // one row: its two broadcasts serve every half; more rows: broadcast again per half
        // (a load each) rather than hold 2R more registers
        __m256i xa1, xb1;
        if constexpr (R == 1) xa1 = bcast_quad(xg + 8 * p), xb1 = bcast_quad(xg + 8 * p + 4);
        for (int h = 0; h < H; ++h) {
          const __m256i raw = _mm256_loadu_si256((const __m256i*)(w[h] + p * 64));
          const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          for (int r = 0; r < R; ++r) {
            const __m256i xa = R == 1 ? xa1 : bcast_quad(xg + r * ldx + 8 * p);
            const __m256i xb = R == 1 ? xb1 : bcast_quad(xg + r * ldx + 8 * p + 4);
            acc[h][r] = _mm256_add_epi16(acc[h][r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa),
                                                                     _mm256_maddubs_epi16(hi, xb)));
          }
        }
        if constexpr (R > 1) keep<H * R>(&acc[0][0]);
      }
      for (int h = 0; h < H; ++h)
        for (int r = 0; r < R; ++r) acc[h][r] = _mm256_madd_epi16(acc[h][r], ones);
    } else {
#pragma GCC unroll 8
      for (int qd = 0; qd < 8; ++qd) {
        __m256i x1;
        if constexpr (R == 1) x1 = bcast_quad(xg + 4 * qd);
        for (int h = 0; h < H; ++h) {
          const __m256i wq = _mm256_loadu_si256((const __m256i*)(w[h] + qd * 64));
          const __m256i aw = _mm256_abs_epi8(wq);  // -128 -> 128 as the unsigned operand
          for (int r = 0; r < R; ++r) {
            const __m256i xs = _mm256_sign_epi8(R == 1 ? x1 : bcast_quad(xg + r * ldx + 4 * qd), wq);
            acc[h][r] = _mm256_add_epi32(acc[h][r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
          }
        }
        if constexpr (R > 1) keep<H * R>(&acc[0][0]);
      }
    }
    // A half's scales are converted once for all rows; per row the same fp32 steps as before.
    __m256 dh[H], mh[H];
    for (int h = 0; h < H; ++h) {
      const int64_t so = (h / 2) * G * kTile + g * kTile + (h % 2) * 8;
      dh[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dt + so)));
      if constexpr (INT4) mh[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mt + so)));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 dxr = _mm256_set1_ps(dx[r * G + g]);
      const __m256 sqr = _mm256_set1_ps(INT4 ? sq[r * G + g] : 0.0f);
      for (int h = 0; h < H; ++h) {
        __m256 t = _mm256_mul_ps(dh[h], _mm256_cvtepi32_ps(acc[h][r]));
        if constexpr (INT4) t = _mm256_fmadd_ps(mh[h], sqr, t);
        _mm256_store_ps(tot[h][r], _mm256_fmadd_ps(t, dxr, _mm256_load_ps(tot[h][r])));
      }
    }
  }
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < R; ++r) store_bf16_rne(y + r * ldy + h * 8, _mm256_load_ps(tot[h][r]));
}

// Halves per pass: two tiles side by side for one row (more independent work), one tile else.
constexpr int halves_for(int R) { return R == 1 ? 4 : 2; }

using TileFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, const int8_t*, int64_t, const float*,
                        const float*, int64_t, at::BFloat16*, int64_t);

template <bool INT4, int... Rs>
struct Kernels {
  static constexpr TileFn wide[] = {tile_rows<Rs, halves_for(Rs), INT4>...};
  static constexpr TileFn narrow[] = {tile_rows<Rs, 2, INT4>...};
};

template <bool INT4>
using RowKernels = Kernels<INT4, 1, 2, 3, 4>;

// Tiles [begin, end) of an avx2 linear for T quantized rows (codes q [T, K], scales dx and code
// sums sq [T, G]) into y [T, N]. Rows in balanced chunks of at most kMaxRows (T = 9 -> 3 + 3 + 3);
// every chunk runs over a tile (or a pair) before the next tile: the tile's weights come from
// memory once and stay in L1/L2 for the other chunks (with chunks outside, T = 17 streamed them 5
// times). Each output is the same call on the same rows either way.
template <bool INT4>
void linear_tiles(const uint8_t* wp, const at::Half* dp, const at::Half* mp, const int8_t* q, const float* dx,
                  const float* sq, int64_t T, int64_t K, int64_t N, at::BFloat16* yp, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  const int64_t G = K / kGroup, chunks = (T + kMaxRows - 1) / kMaxRows, tile_bytes = K * kTile / (INT4 ? 2 : 1);
  auto run = [&](bool wide, int64_t tile) {
    for (int64_t c = 0, t0 = 0; c < chunks; ++c) {
      const int rows = (int)((T - t0) / (chunks - c));
      const int64_t so = tile * G * kTile;
      const TileFn fn = wide ? RowKernels<INT4>::wide[rows - 1] : RowKernels<INT4>::narrow[rows - 1];
      fn(wp + tile * tile_bytes, tile_bytes, dp + so, INT4 ? mp + so : nullptr, q + t0 * K, K, dx + t0 * G, sq + t0 * G,
         G, yp + t0 * N + tile * kTile, N);
      t0 += rows;
    }
  };
  // Two tiles a call for one row (T = 1), else one (a chunk has one row only when T = 1).
  const int span = T == 1 ? halves_for(1) / 2 : 1;
  int64_t j = begin;
  for (; j + span <= end; j += span) run(true, j);
  for (; j < end; ++j) run(false, j);
}

// Tiles a chunk of work takes, each thread first through its own contiguous share (common.h
// take_shares: its chunks follow one another, so the prefetchers' streams go on). Several rows:
// about 8 chunks a thread, an even number of tiles each; one row streams the weights: the share
// in one chunk (chunks from one shared counter made the one-row step ~10% slower).
int64_t linear_step(int64_t T, int64_t tiles, int64_t threads) {
  return T == 1 ? (tiles + threads - 1) / threads : std::max<int64_t>(2, (tiles / (8 * threads) + 1) & ~int64_t{1});
}

template <bool INT4>
at::Tensor qlinear_avx2(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  const auto [x, T, K, tiles, G, N] = linear_shape(x_in, packed, d, INT4);
  if (INT4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "specdecode qlinear: m must match d");
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0) return y;
  const QuantRows& xr = quantize_rows(x.data_ptr<at::BFloat16>(), T, K);
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto* wp = (const uint8_t*)packed.data_ptr();
  const at::Tensor dc = d.contiguous(), mc = INT4 ? m.contiguous() : d;
  const auto* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = INT4 ? mc.data_ptr<at::Half>() : nullptr;
  const auto run = [&](int64_t begin, int64_t end) {
    linear_tiles<INT4>(wp, dp, mp, xr.q.get(), xr.dx.get(), xr.sq.get(), T, K, N, yp, begin, end);
  };
  parallel_shares(tiles, linear_step(T, tiles, at::get_num_threads()), run);
  return y;
}

// exp(x) for x <= 0 (softmax weights, SiLU's exp(-|g|)): 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], p Cephes' degree-7 polynomial (relative error ~2e-7); x < -87 gives 0.
SD_AVX2 inline __m256 exp_neg(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

SD_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 bf16 values as two fp32 vectors: lanes j of `even` and `odd` hold values 2j and 2j + 1 (a bf16
// is the top half of its fp32: a shift for the low value of each pair, a mask for the high one).
SD_AVX2 inline void split_bf16x16(const at::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000)));
}

// The sums of 8 vectors, one per lane: lane i = sum of v[i]'s lanes.
SD_AVX2 inline __m256 sums8(const __m256 v[8]) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// One query row of one head: softmax(q . k_j / sqrt(D)) over the key slots `slots` (n of them),
// times their values, into out (bf16); scores: room for n rounded up to 8. Every row alone, in
// the same order whatever else is scored. C = D / 16 chunks (0: any D, read at run time).
template <int C>
SD_AVX2 void attend_row(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, int64_t D,
                        const int64_t* slots, int64_t n, float* scores, at::BFloat16* out) {
  // D <= 256; with C known the arrays have exactly C chunks, so GCC keeps them in registers
  // (sized 16 for every C, the value accumulators went to the stack and back for every key)
  constexpr int kMaxChunks = C > 0 ? C : 16;
  const int chunks = C > 0 ? C : (int)(D / 16);
  const float scale = 1.0f / std::sqrt((float)D);
  __m256 qe[kMaxChunks], qo[kMaxChunks];
  for (int c = 0; c < chunks; ++c) split_bf16x16(q + 16 * c, qe[c], qo[c]);
  __m256 best = _mm256_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {  // 8 keys at a time (past the last key: key j0 again, dropped)
    __m256 dot[8];
    for (int r = 0; r < 8; ++r) {
      const at::BFloat16* kr = k + slots[std::min<int64_t>(j0 + r, n - 1)] * D;
      __m256 acc = _mm256_setzero_ps();
      for (int c = 0; c < chunks; ++c) {
        __m256 ke, ko;
        split_bf16x16(kr + 16 * c, ke, ko);
        acc = _mm256_fmadd_ps(qe[c], ke, acc);
        acc = _mm256_fmadd_ps(qo[c], ko, acc);
      }
      dot[r] = acc;
    }
    __m256 sc = _mm256_mul_ps(sums8(dot), _mm256_set1_ps(scale));
    if (j0 + 8 > n) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j0)), lane));
      sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc, valid);
    }
    _mm256_storeu_ps(scores + j0, sc);
    best = _mm256_max_ps(best, sc);
  }
  const __m256 top = _mm256_set1_ps(hmax(best));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += 8) {  // (-inf past the last key: weight 0)
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(scores + j0), top));
    _mm256_storeu_ps(scores + j0, e);
    total = _mm256_add_ps(total, e);
  }
  __m256 ae[kMaxChunks], ao[kMaxChunks];
  for (int c = 0; c < chunks; ++c) ae[c] = ao[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_broadcast_ss(scores + j);
    const at::BFloat16* vr = v + slots[j] * D;
    for (int c = 0; c < chunks; ++c) {
      __m256 ve, vo;
      split_bf16x16(vr + 16 * c, ve, vo);
      ae[c] = _mm256_fmadd_ps(w, ve, ae[c]);
      ao[c] = _mm256_fmadd_ps(w, vo, ao[c]);
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(total));
  for (int c = 0; c < chunks; ++c) {  // back to the values' order: (e0 o0 e1 o1 ...)
    const __m256 lo = _mm256_unpacklo_ps(ae[c], ao[c]), hi = _mm256_unpackhi_ps(ae[c], ao[c]);
    store_bf16_rne(out + 16 * c, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), inv));
    store_bf16_rne(out + 16 * c + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), inv));
  }
}

SD_AVX2 void rms_norm_rows(const float* x, const float* w, at::BFloat16* y, int64_t T, int64_t H, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const float* r = x + t * H;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < H; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(r + i), acc);
    const __m256 s = _mm256_set1_ps(1.0f / std::sqrt(hsum(acc) / (float)H + eps));
    for (int64_t i = 0; i < H; i += 8)
      store_bf16_rne(y + t * H + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), s), _mm256_loadu_ps(w + i)));
  }
}

SD_AVX2 void rotate_row(const at::BFloat16* x, const float* rope, at::BFloat16* y, int64_t D) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi64x(0x0000000080000000LL));  // negate even lanes
  for (int64_t i = 0; i < D; i += 8) {  // 4 pairs (a, b): (a c - b s, b c + a s)
    const __m256 ab = bf16x8(x + i), rs = _mm256_loadu_ps(rope + i);
    const __m256 c = _mm256_moveldup_ps(rs), sn = _mm256_xor_ps(_mm256_movehdup_ps(rs), sign);
    store_bf16_rne(y + i, _mm256_fmadd_ps(_mm256_permute_ps(ab, 0xB1), sn, _mm256_mul_ps(ab, c)));
  }
}

SD_AVX2 void silu_mul_vectors(const at::BFloat16* src, at::BFloat16* y, int64_t F, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i round = _mm256_set1_epi32(0x7fff), lsb = _mm256_set1_epi32(1), high = _mm256_set1_epi32((int)0xffff0000);
  for (int64_t vi = begin; vi < end; ++vi) {
    const int64_t t = vi / (F / 16), i0 = vi % (F / 16) * 16;
    for (int64_t i = i0; i < i0 + 16; i += 8) {
      const __m256 g = bf16x8(src + t * 2 * F + i);
      const __m256 e = exp_neg(_mm256_sub_ps(zero, _mm256_and_ps(g, absmask)));  // exp(-|g|)
      const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
      const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), _mm256_cmp_ps(g, zero, _CMP_LT_OQ));  // g < 0: e / (1 + e)
      const __m256i b = _mm256_castps_si256(_mm256_mul_ps(g, sig));  // silu, rounded to bf16 before the product
      const __m256 silu16 = _mm256_castsi256_ps(_mm256_and_si256(
          _mm256_add_epi32(b, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(b, 16), lsb))), high));
      store_bf16_rne(y + t * F + i, _mm256_mul_ps(silu16, bf16x8(src + t * 2 * F + F + i)));
    }
  }
}

SD_AVX2 void add_residual_rows(float* x, const at::BFloat16* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), bf16x8(y + i)));
}

}  // namespace

namespace sdk {

at::Tensor int4_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  return qlinear_avx2<true>(x, packed, d, m);
}

at::Tensor int8_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d) {
  return qlinear_avx2<false>(x, packed, d, d);
}

void rms_norm_rows_avx2(const float* x, const float* w, at::BFloat16* y, int64_t T, int64_t H, float eps) {
  rms_norm_rows(x, w, y, T, H, eps);
}

void rotate_row_avx2(const at::BFloat16* x, const float* rope, at::BFloat16* y, int64_t D) { rotate_row(x, rope, y, D); }

void silu_mul_vectors_avx2(const at::BFloat16* src, at::BFloat16* y, int64_t F, int64_t begin, int64_t end) {
  silu_mul_vectors(src, y, F, begin, end);
}

void add_residual_avx2(float* x, const at::BFloat16* y, int64_t n) { add_residual_rows(x, y, n); }

// Tasks [begin, end) of attend_many_avx2 (first[s]: sequence s's first task; a task is one row x
// head): a row attends to its sequence's cached slots and the new rows of its chain (or of its
// tree path), on its own.
void attend_tasks_avx2(const std::vector<SeqAttention>& seqs, const std::vector<int64_t>& first, int64_t H, int64_t D,
                       int64_t group, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> slots;
  size_t slots_s = seqs.size();  // the (sequence, row) `slots` holds: a row's H heads share it
  int64_t slots_t = -1;
  for (int64_t task = begin; task < end; ++task) {
    const size_t s = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const SeqAttention& a = seqs[s];
    const int64_t t = (task - first[s]) / H, h = (task - first[s]) % H, kv = h / group;
    if (s != slots_s || t != slots_t) {
      slots_s = s, slots_t = t;
      slots.resize(a.past);
      for (int64_t j = 0; j < a.past; ++j) slots[j] = j;
      if (a.paths.empty())
        for (int64_t j = 0; j <= t; ++j) slots.push_back(a.past + j);
      else
        for (const int64_t node : a.paths[t]) slots.push_back(a.past + node);
      if (scores.size() < slots.size() + 8) scores.resize(slots.size() + 8);
    }
    const auto row = D == 64 ? attend_row<4> : D == 128 ? attend_row<8> : attend_row<0>;
    row(a.q + t * a.qs + h * D, a.k + kv * a.hs, a.v + kv * a.hs, D, slots.data(), (int64_t)slots.size(), scores.data(),
        a.out + (t * H + h) * D);
  }
}

std::vector<int64_t> attend_task_starts_avx2(const std::vector<SeqAttention>& seqs, int64_t H) {
  std::vector<int64_t> first(seqs.size() + 1, 0);  // first task of each sequence
  for (size_t s = 0; s < seqs.size(); ++s) first[s + 1] = first[s] + seqs[s].T * H;
  return first;
}

// Tasks a chunk of attend_tasks_avx2's work takes: half a row's heads.
int64_t attend_step_avx2(int64_t H) { return std::max<int64_t>(1, H / 2); }

// Each sequence's rows x heads, one task each (attend_tasks_avx2).
void attend_many_avx2(const std::vector<SeqAttention>& seqs, int64_t H, int64_t D, int64_t group) {
  const std::vector<int64_t> first = attend_task_starts_avx2(seqs, H);
  parallel_chunks(first.back(), attend_step_avx2(H), [&](int64_t begin, int64_t end) {
    attend_tasks_avx2(seqs, first, H, D, group, begin, end);
  });
}

void quantize_groups_avx2(const at::BFloat16* x, int64_t lo, int64_t hi, int8_t* q, float* dx, float* sq) {
  quantize_groups(x, lo, hi, q, dx, sq);
}

void linear_tiles_avx2(bool int4, const uint8_t* w, const at::Half* d, const at::Half* m, const int8_t* q, const float* dx,
                       const float* sq, int64_t T, int64_t K, int64_t N, at::BFloat16* y, int64_t begin, int64_t end) {
  if (int4) linear_tiles<true>(w, d, m, q, dx, sq, T, K, N, y, begin, end);
  else linear_tiles<false>(w, d, m, q, dx, sq, T, K, N, y, begin, end);
}

int64_t linear_step_avx2(int64_t T, int64_t tiles, int64_t threads) { return linear_step(T, tiles, threads); }

}  // namespace sdk

TORCH_LIBRARY_FRAGMENT(specdecode, m) {
  m.def("int4_linear_avx2(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  m.def("int8_linear_avx2(Tensor x, Tensor packed, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(specdecode, CPU, m) {
  m.impl("int4_linear_avx2", &sdk::int4_linear_avx2);
  m.impl("int8_linear_avx2", &sdk::int8_linear_avx2);
}
