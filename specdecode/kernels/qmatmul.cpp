// specdecode CPU kernels: weight-only int4 / int8 matmuls whose cost is flat in the number of
// rows, and row-by-row causal attention, both batch invariant (a row's result does not depend
// on how many rows a call has).
//
// Why: a verification step scores T = k+1 rows. PyTorch's weight-only CPU kernels dequantize
// the whole weight again for every block of 4 rows, so T=5 costs ~2x T=1. Here a tile of
// 16 outputs x 2 inputs is unpacked ONCE into bf16 and multiplied with every row (AVX512-BF16
// `vdpbf16ps`: bf16 x bf16 products are exact in fp32, sums in fp32), so extra rows cost one
// dot-product instruction each.
//
// Three matmul paths (specdecode/kernels/__init__.py picks one per process):
//   avx512-bf16 (this first section): weights unpacked to bf16 in registers, `vdpbf16ps`.
//   avx512-vnni: activations quantized to int8 per block of 32, integer dot products.
//   amx: int4 and int8 weights unpacked once per group of 32 inputs to bf16 tiles and multiplied
//        with up to 16 bf16 rows a tile instruction (`tdpbf16ps`), for any number of rows.
//
// Weight layout of the avx512-bf16 path (built in specdecode/models/quant.py; the VNNI section
// describes the quad layouts), for N outputs, K inputs, groups of 32 inputs (GGUF's block
// size), G = K / 32:
//   int4: packed uint8 [N/16, G, 8, 32]: for output tile j, group g, pair-of-pairs p, byte b:
//         the low nibble is lane b of input pair 2p, the high nibble lane b of pair 2p+1,
//         where lane l of pair kp is (output 16j + l/2, input 32g + 2kp + l%2).
//         w = d * q + m with q in [0, 15] (GGUF Q4_1; Q4_0 is m = -8 d).
//   int8: packed int8 [N/16, G, 16, 32]: byte l of pair kp is lane l as above. w = d * q (Q8_0).
//   d, m: float16 [N/16, G, 16] (the 16 outputs of a tile side by side).
// y[t, n] = sum_g d[n,g] * (sum_{i in g} q[n,i] x[t,i]) + m[n,g] * (sum_{i in g} x[t,i]),
// in this order for every row, whatever T is.
//
// Every kernel function carries its own target attribute, so the library loads on any x86-64
// CPU. The glue ops (rms_norm, rope_attend, attend_rows, silu_mul, add_residual, decoder_layers)
// run avx2.cpp's code where the CPU lacks AVX-512 (cpu_has_avx512); the others are called only
// where /proc/cpuinfo lists avx512_bf16 (specdecode/kernels: load_error).

#include "common.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include <sys/syscall.h>
#include <unistd.h>

#define SD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

namespace {

using namespace sdk;  // common.h

SD_TARGET inline __m512 bcast_pair(const at::BFloat16* p) {
  // Two adjacent bf16 values (one input pair) broadcast to all 16 lanes.
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

SD_TARGET inline __m512 dot_pair(__m512 acc, __m512i w, __m512 x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

// Sum of each row's inputs per group (fp32, fixed order): the int4 offset term m * sum(x).
SD_TARGET void group_sums(const at::BFloat16* x, int64_t K, float* out) {
  const __m512i shift = _mm512_set1_epi32(16);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512i raw = _mm512_loadu_si512(x + g * kGroup);  // 32 bf16
    __m512 lo = _mm512_castsi512_ps(_mm512_sllv_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), shift));
    __m512 hi = _mm512_castsi512_ps(_mm512_sllv_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), shift));
    out[g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

// bf16 bit patterns of 0..15 (vpermw table for unpacking int4 codes).
SD_TARGET inline __m512i int4_table() {
  alignas(64) static const uint16_t table[32] = {
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120,
      0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm512_load_si512(table);
}

// R rows x TILES output tiles (16 outputs each) over all groups. Each (row, output) is computed
// by the same instructions in the same order whatever R and TILES are (they only decide how many
// independent dot-product chains run side by side), so results are batch invariant. The
// per-group totals live in `tot` (L1) so that the registers hold R * TILES accumulators.
template <int R, int TILES, bool INT4>
SD_TARGET void tile_rows(const uint8_t* wt, int64_t tile_bytes,  // first tile's codes; bytes per tile
                         const at::Half* dt, const at::Half* mt,   // first tile's [G, 16] scales / offsets
                         const at::BFloat16* x, int64_t ldx,       // rows [R, K]
                         const float* sx,                          // [R, G] group sums (int4)
                         int64_t G, at::BFloat16* y, int64_t ldy) {
  alignas(64) float tot[R * TILES][kTile];
  for (int i = 0; i < R * TILES; ++i) _mm512_store_ps(tot[i], _mm512_setzero_ps());
  const __m512i table = int4_table();
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[TILES][R];
    for (int u = 0; u < TILES; ++u)
      for (int r = 0; r < R; ++r) acc[u][r] = _mm512_setzero_ps();
    const at::BFloat16* xg = x + g * kGroup;
    if constexpr (INT4) {
      for (int p = 0; p < 8; ++p) {
        for (int u = 0; u < TILES; ++u) {
          __m256i raw = _mm256_loadu_si256((const __m256i*)(wt + u * tile_bytes + g * (kGroup * kTile / 2) + p * 32));
          __m512i w0 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(raw, low4)), table);
          __m512i w1 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)), table);
          for (int r = 0; r < R; ++r) {
            acc[u][r] = dot_pair(acc[u][r], w0, bcast_pair(xg + r * ldx + 4 * p));
            acc[u][r] = dot_pair(acc[u][r], w1, bcast_pair(xg + r * ldx + 4 * p + 2));
          }
        }
      }
    } else {
      for (int kp = 0; kp < 16; ++kp) {
        for (int u = 0; u < TILES; ++u) {
          const int8_t* wk = (const int8_t*)wt + u * tile_bytes + g * (kGroup * kTile) + kp * 32;
          __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)wk)));
          __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wk + 16))));
          __m512i w = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // lanes 0-15 from a, 16-31 from b (exact: |q| <= 128)
          for (int r = 0; r < R; ++r) acc[u][r] = dot_pair(acc[u][r], w, bcast_pair(xg + r * ldx + 2 * kp));
        }
      }
    }
    for (int u = 0; u < TILES; ++u) {
      const int64_t so = u * G * kTile + g * kTile;
      __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + so)));
      if constexpr (INT4) {
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mt + so)));
        for (int r = 0; r < R; ++r) {
          __m512 t = _mm512_fmadd_ps(acc[u][r], d, _mm512_load_ps(tot[u * R + r]));
          _mm512_store_ps(tot[u * R + r], _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * G + g]), t));
        }
      } else {
        for (int r = 0; r < R; ++r)
          _mm512_store_ps(tot[u * R + r], _mm512_fmadd_ps(acc[u][r], d, _mm512_load_ps(tot[u * R + r])));
      }
    }
  }
  for (int u = 0; u < TILES; ++u)
    for (int r = 0; r < R; ++r)
      _mm256_storeu_si256((__m256i*)(y + r * ldy + u * kTile), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(tot[u * R + r])));
}

// How many tiles run side by side for R rows: enough independent chains to hide the
// dot-product latency, few enough to keep R * TILES accumulators in 32 registers.
constexpr int tiles_for(int R) { return R <= 2 ? 4 : R <= 8 ? 2 : 1; }

using TileFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, const at::BFloat16*, int64_t,
                        const float*, int64_t, at::BFloat16*, int64_t);

template <bool INT4, int... Rs>
struct Kernels {
  static constexpr TileFn wide[] = {tile_rows<Rs, tiles_for(Rs), INT4>...};
  static constexpr TileFn narrow[] = {tile_rows<Rs, 1, INT4>...};
};

template <bool INT4>
using RowKernels = Kernels<INT4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;
constexpr int kMaxRows = 16;


template <bool INT4>
at::Tensor qlinear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  const auto [x, T, K, tiles, G, N] = linear_shape(x_in, packed, d, INT4);
  if (INT4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "specdecode qlinear: m must match d");
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0) return y;
  const auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto* wp = (const uint8_t*)packed.data_ptr();
  const at::Tensor dc = d.contiguous();
  const at::Tensor mc = INT4 ? m.contiguous() : m;
  const auto* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = INT4 ? mc.data_ptr<at::Half>() : nullptr;
  std::vector<float> sx(INT4 ? T * G : 0);
  if (INT4)
    for (int64_t t = 0; t < T; ++t) group_sums(xp + t * K, K, sx.data() + t * G);
  const int64_t tile_bytes = K * kTile / (INT4 ? 2 : 1);
  // Rows in balanced chunks of at most 16 (T = 17 -> 9 + 8), each chunk over all tiles.
  const int64_t chunks = (T + kMaxRows - 1) / kMaxRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    int64_t t0 = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int rows = (int)((T - t0) / (chunks - c));
      const int wide = tiles_for(rows);
      int64_t j = begin;
      auto run = [&](TileFn fn, int64_t tile) {
        fn(wp + tile * tile_bytes, tile_bytes, dp + tile * G * kTile, INT4 ? mp + tile * G * kTile : nullptr,
           xp + t0 * K, K, INT4 ? sx.data() + t0 * G : nullptr, G, yp + t0 * N + tile * kTile, N);
      };
      for (; j + wide <= end; j += wide) run(RowKernels<INT4>::wide[rows - 1], j);
      for (; j < end; ++j) run(RowKernels<INT4>::narrow[rows - 1], j);
      t0 += rows;
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// The same weights with int8 activations (llama.cpp's arithmetic: each row's inputs quantized
// per block of 32 to int8 with an fp32 scale dx = max|x| / 127), integer dot products through
// AVX512-VNNI `vpdpbusd` (64 multiply-adds an instruction, twice bf16's): per group the sum is
// an exact int32, then y += dx * (d * S + m * sum(xq)). Each row's quantization and sums depend
// on that row alone, so this too is batch invariant.
//
// Layouts ("quads": 16 outputs x 4 inputs = 64 codes, code of output i, input 4qd + j at byte
// 4i + j):
//   int4: uint8 [N/16, G, 4, 64]: quads 2p and 2p+1 in the low and high nibbles of 64 bytes
//         (one load and two masks give both).
//   int8: int8 [N/16, G, 8, 64] and wsum int16 [N/16, G, 16] (each output's code sum per group,
//         for the +128 that makes the activations unsigned). The amx path's int8 weights are
//         these quads too (no wsum).

#define SD_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// Groups [lo, hi) of rows x [.., K] bf16 (flat: group i is x[i * 32 .. i * 32 + 31]) to int8
// codes q, scales dx and code sums sq at the same indices (q at i * 32).
SD_VNNI void quantize_groups(const at::BFloat16* x, int64_t lo, int64_t hi, int8_t* q, float* dxs, float* sqs) {
  const __m512i shift = _mm512_set1_epi32(16);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t i = lo; i < hi; ++i) {
    __m512i raw = _mm512_loadu_si512(x + i * kGroup);
    __m512 lo16 = _mm512_castsi512_ps(_mm512_sllv_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), shift));
    __m512 hi16 = _mm512_castsi512_ps(_mm512_sllv_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), shift));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo16, absmask), _mm512_and_ps(hi16, absmask)));
    const float d = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo16, inv));  // round to nearest even
    __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi16, inv));
    _mm_storeu_si128((__m128i*)(q + i * kGroup), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i*)(q + i * kGroup + 16), _mm512_cvtsepi32_epi8(qhi));
    dxs[i] = d;
    sqs[i] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  }
}

SD_VNNI const QuantRows& quantize_rows(const at::BFloat16* x, int64_t T, int64_t K) {
  thread_local QuantRows out;
  out.reserve(T * K, T * (K / kGroup));
  // (plain pointers: a loop through `out` called __tls_get_addr in every iteration, spilling the
  // vectors around the call: 4x this loop's time)
  quantize_groups(x, 0, T * (K / kGroup), out.q.get(), out.dx.get(), out.sq.get());
  return out;
}

// fp32 -> bf16, round to nearest even (written out: this target has no avx512bf16)
SD_VNNI inline void store_bf16_rne(at::BFloat16* y, __m512 v) {
  __m512i b = _mm512_castps_si512(v);
  __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)));
  _mm256_storeu_si256((__m256i*)y, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, rounding), 16)));
}

SD_VNNI inline __m512i bcast_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

constexpr int64_t kPrefetchGroups = 8;

// Ask for group g of a tile (group_bytes each) a few groups before it is used: the weights'
// memory traffic and the arithmetic overlap. Near the tile's end (g >= G), the start of the next
// tile (tiles lie one after another), whose first groups were not prefetched before (a prefetch
// past the weights' end does not fault).
SD_VNNI inline void prefetch_group(const uint8_t* wt, int64_t tile_bytes, int64_t g, int64_t G, int group_bytes) {
  const uint8_t* next = g < G ? wt + g * group_bytes : wt + tile_bytes + (g - G) * group_bytes;
  for (int line = 0; line < group_bytes; line += 64) _mm_prefetch((const char*)(next + line), _MM_HINT_T0);
}

// One group's exact int32 sums (16 outputs of one row) into the row's fp32 totals.
SD_VNNI inline __m512 add_group_int4(__m512 tot, __m512i acc, __m512 d, __m512 m, float sq, float dx) {
  __m512 t = _mm512_fmadd_ps(m, _mm512_set1_ps(sq), _mm512_mul_ps(d, _mm512_cvtepi32_ps(acc)));
  return _mm512_fmadd_ps(t, _mm512_set1_ps(dx), tot);
}

SD_VNNI inline __m512 add_group_int8(__m512 tot, __m512i acc, __m512 d, float dx) {
  return _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(acc)), _mm512_set1_ps(dx), tot);
}

// R rows x one tile of 16 outputs over all groups, one tile at a time for every row count: each
// tile's weights stream from memory in order, one stream per thread, which the prefetchers follow
// best. (Tiles side by side, up to 4 for one row, had hidden `vpdpbusd`'s latency when a step's
// matmuls ran on one thread; with a thread per core streaming its own share, one tile at a time
// measured faster at every row count. Zen 4, in one process switched at run time: the embedded
// int4 model's step at T = 1 / 2 / 3 / 5 0.82 / 0.76 / 0.83 / 0.90 of the side-by-side tiles,
// T = 9 the same (one tile already); the qwen2-1.5B-shaped Q4_K_M 0.86 / 0.84 / 0.93 / 0.97;
// all-int8 T = 1 / 2 0.90 / 0.81; docs/perf.md, session 30.) Each row's instructions and their
// order are the same whatever R is, so results are batch invariant.
template <int R, bool INT4>
SD_VNNI void tile_rows_vnni(const uint8_t* wt, int64_t tile_bytes, const at::Half* dt, const at::Half* mt,
                            const int16_t* ws, const int8_t* xq, int64_t ldx, const float* dx, const float* sq,
                            int64_t G, at::BFloat16* y, int64_t ldy) {
  alignas(64) float tot[R][kTile];
  for (int r = 0; r < R; ++r) _mm512_store_ps(tot[r], _mm512_setzero_ps());
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    const int8_t* xg = xq + g * kGroup;
    prefetch_group(wt, tile_bytes, g + kPrefetchGroups, G, INT4 ? 256 : 512);
    __m512i pair[2];  // int4: quads 2p and 2p+1, from one 64-byte load
#pragma GCC unroll 8  // (rolled, GCC copied every accumulator twice an iteration: -25% at T=9)
    for (int qd = 0; qd < 8; ++qd) {
      if constexpr (INT4) {
        if (qd % 2 == 0) {
          __m512i raw = _mm512_loadu_si512(wt + g * 256 + qd * 32);
          pair[0] = _mm512_and_si512(raw, low4);
          pair[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
        for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], pair[qd % 2], bcast_quad(xg + r * ldx + 4 * qd));
      } else {
        __m512i w = _mm512_loadu_si512(wt + g * 512 + qd * 64);
        for (int r = 0; r < R; ++r)
          acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_xor_si512(bcast_quad(xg + r * ldx + 4 * qd), flip), w);
      }
    }
    const int64_t so = g * kTile;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + so)));
    if constexpr (INT4) {
      __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mt + so)));
      for (int r = 0; r < R; ++r)
        _mm512_store_ps(tot[r], add_group_int4(_mm512_load_ps(tot[r]), acc[r], d, m, sq[r * G + g], dx[r * G + g]));
    } else {
      __m512i corr = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)(ws + so))), 7);
      for (int r = 0; r < R; ++r)
        _mm512_store_ps(tot[r], add_group_int8(_mm512_load_ps(tot[r]), _mm512_sub_epi32(acc[r], corr), d, dx[r * G + g]));
    }
  }
  for (int r = 0; r < R; ++r) store_bf16_rne(y + r * ldy, _mm512_load_ps(tot[r]));
}

using VnniFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, const int16_t*, const int8_t*, int64_t,
                        const float*, const float*, int64_t, at::BFloat16*, int64_t);

template <bool INT4, int... Rs>
struct VnniKernels {
  static constexpr VnniFn rows[] = {tile_rows_vnni<Rs, INT4>...};
};

template <bool INT4>
using VnniRowKernels = VnniKernels<INT4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

// A call whose row chunks have `amx_rows` rows or more goes through AMX-INT8 tiles instead where
// asked (the `amx-int8` kernel; defined with the AMX code below): the same exact int32 group sums,
// the same fp32 arithmetic after them, so a row's result is bitwise the same on either path.
template <bool INT4>
void chunk_amx_int8(const uint8_t* wp, int64_t tile_bytes, const at::Half* dp, const at::Half* mp, const int8_t* xq,
                    int64_t ldx, const float* dx, const float* sq, int64_t G, int R, int64_t T, at::BFloat16* y,
                    int64_t ldy, int64_t begin, int64_t end);
void release_amx_tiles();
bool amx_permitted();

// y[t, n] = bf16(y[t, n] + bias[n]) for outputs [n0, n1) of T rows (y's row stride N): what
// ATen's bf16 `y + b` gives (both widened to fp32, added, rounded to nearest even).
void add_bias(at::BFloat16* y, int64_t N, int64_t T, const at::BFloat16* bias, int64_t n0, int64_t n1) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = n0; n < n1; ++n) y[t * N + n] = at::BFloat16((float)y[t * N + n] + (float)bias[n]);
}

// One VNNI linear over quantized rows: tiles [begin, end) of its outputs for all T rows (run),
// and a bias added to those outputs where given (bf16 + bf16 rounded to bf16: what ATen's
// `y + b` gives). Rows go in balanced chunks of at most kMaxRows (T = 17 -> 8 + 9); every chunk
// runs over a tile group before the next group, so the weights come from memory once for all.
template <bool INT4>
struct VnniCall {
  const uint8_t* w;
  int64_t tile_bytes;
  const at::Half* d;
  const at::Half* m;   // int4
  const int16_t* ws;   // int8
  const int8_t* q;     // the rows' codes [T, K], scales and code sums [T, G] (quantize_groups)
  const float* dx;
  const float* sq;
  int64_t T, K, G, N;
  at::BFloat16* y;     // [T, N]
  const at::BFloat16* bias;  // [N] or nullptr

  static int64_t chunks(int64_t T) { return (T + kMaxRows - 1) / kMaxRows; }
  // Tiles a chunk of work takes, each thread first through its own contiguous share of the tiles
  // (common.h take_shares): about 8 chunks a thread, for any number of rows (a share in one chunk
  // for one row, as it was while tiles went side by side, measured 1-5% slower with one tile at a
  // time: the thread done first can take the other's last chunks).
  static int64_t step(int64_t /*T*/, int64_t tiles, int64_t threads) { return tiles / (8 * threads) + 1; }
  void run(int64_t begin, int64_t end) const {
    const int64_t n = chunks(T);
    for (int64_t j = begin; j < end; ++j)
      for (int64_t c = 0, t0 = 0; c < n; ++c) {
        const int rows = (int)((T - t0) / (n - c));
        const int64_t so = j * G * kTile;
        VnniRowKernels<INT4>::rows[rows - 1](w + j * tile_bytes, tile_bytes, d + so, INT4 ? m + so : nullptr,
                                             INT4 ? nullptr : ws + so, q + t0 * K, K, dx + t0 * G, sq + t0 * G, G,
                                             y + t0 * N + j * kTile, N);
        t0 += rows;
      }
    if (bias) add_bias(y, N, T, bias, begin * kTile, end * kTile);
  }
};

template <bool INT4>
at::Tensor qlinear_vnni(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& aux,
                        int64_t amx_rows = 0) {
  const auto [x, T, K, tiles, G, N] = linear_shape(x_in, packed, d, INT4);
  TORCH_CHECK(aux.sizes() == d.sizes() && aux.scalar_type() == (INT4 ? at::kHalf : at::kShort), "specdecode qlinear: m / wsum must match d");
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0) return y;
  const int64_t chunks = (T + kMaxRows - 1) / kMaxRows;
  const QuantRows& xr = quantize_rows(x.data_ptr<at::BFloat16>(), T, K);
  auto* yp = y.data_ptr<at::BFloat16>();
  const auto* wp = (const uint8_t*)packed.data_ptr();
  const at::Tensor dc = d.contiguous(), ac = aux.contiguous();
  const auto* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = INT4 ? ac.data_ptr<at::Half>() : nullptr;
  const int16_t* sp = INT4 ? nullptr : ac.data_ptr<int16_t>();
  const int64_t tile_bytes = K * kTile / (INT4 ? 2 : 1);
  const int64_t R = (T + chunks - 1) / chunks;  // the largest chunk
  if (amx_rows > 0 && R >= amx_rows) {  // tiles read whole chunks of R rows: zero rows past T
    TORCH_CHECK(amx_permitted(), "specdecode qlinear: Linux refused this process the AMX tile state (kernel 5.16+ needed)");
    std::vector<int8_t> q(chunks * R * K, 0);
    std::copy(xr.q.get(), xr.q.get() + T * K, q.begin());
    std::vector<float> dx(chunks * G * R, 0.0f), sq(chunks * G * R, 0.0f);  // [chunks, G, R]: a group's rows side by side
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at = ((t / R) * G + g) * R + t % R;
        dx[at] = xr.dx[t * G + g];
        sq[at] = xr.sq[t * G + g];
      }
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush;
      chunk_amx_int8<INT4>(wp, tile_bytes, dp, mp, q.data(), K, dx.data(), sq.data(), G, (int)R, T, yp, N, begin, end);
      release_amx_tiles();
    });
    return y;
  }
  const VnniCall<INT4> call{wp, tile_bytes, dp, mp, sp, xr.q.get(), xr.dx.get(), xr.sq.get(), T, K, G, N, yp, nullptr};
  const auto run = [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    call.run(begin, end);
  };
  parallel_shares(tiles, VnniCall<INT4>::step(T, tiles, at::get_num_threads()), run);
  return y;
}

// ---------------------------------------------------------------------------------------------
// AMX-BF16 tiles (the `amx` kernel: int4 and int8 weights). Each group of 32 inputs of a tile of
// 16 outputs is unpacked ONCE into bf16 weights (int4: w = d*q + m, int8: w = d*q, rounded to
// nearest even) in the tile layout of `tdpbf16ps`'s second operand, and one tile instruction
// multiplies it with up to 16 rows of bf16 activations, adding into fp32 sums that stay in the
// tile over all groups: no per-group work for each row at all (the int8-activation kernels scale
// every row's sums per group, which is what made their cost grow with rows). Unpacking costs
// ~60 cycles a group and tile, about what streaming its 256 (int4) or 512 (int8) bytes from
// memory costs on one core, so one row costs about what the VNNI kernel's does and 33 rows
// about twice that (VNNI: 3-5x).
// Batch invariant: the tile unit computes each row from that row of A and the weights alone,
// in the same order whatever the number of rows (tests/test_kernels.py, rows 1..130), and the
// same path runs for every row count (T = 1 too).
// Weight layouts: int4 the avx512-bf16 kernel's ([N/16, G, 8, 32] nibbles, d and m
// [N/16, G, 16] f16); int8 the VNNI kernel's quads ([N/16, G, 8, 64], d [N/16, G, 16] f16).

#define SD_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,fma,f16c,amx-tile,amx-bf16")))

// Linux hands out the tile registers' state only after a process asks (5.16 and later).
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

SD_AMX_BF16 void release_tiles() { _tile_release(); }

// Output n of a tile for the 32 bf16 lanes of a tile row (lane l = output l/2): lanes 0-15
// (`cvtne2ps`'s second operand) are outputs 0-7, lanes 16-31 outputs 8-15.
SD_AMX_BF16 inline __m512i lo_outputs() { return _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0); }
SD_AMX_BF16 inline __m512i hi_outputs() { return _mm512_add_epi32(lo_outputs(), _mm512_set1_epi32(8)); }

// vpermb indices: byte 2 of lane i of vector v takes code byte 16v + i (the other bytes are kept).
struct alignas(64) CodeIndex {
  uint8_t b[4][64];
};
constexpr CodeIndex code_index() {
  CodeIndex t{};
  for (int v = 0; v < 4; ++v)
    for (int i = 0; i < 16; ++i) t.b[v][4 * i + 2] = (uint8_t)(16 * v + i);
  return t;
}
alignas(64) constexpr CodeIndex kCodeIndex = code_index();

// int4: group g of one output tile (256 bytes of nibbles) as 16 x 32 bf16 weights, tile row kp =
// input pair kp, lane l = (output l/2, input 2kp + l%2): the nibble layout's order. A code q
// lands in the mantissa of 2.0f (f = 2 + q/64 exactly), so w = f * 64d + (m - 128d) is one fma.
SD_AMX_BF16 inline void unpack_int4_bf16(const uint8_t* w, const at::Half* dg, const at::Half* mg, uint16_t* out) {
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)dg));
  const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)mg));
  const __m512 d64 = _mm512_mul_ps(d, _mm512_set1_ps(64.0f));
  const __m512 m0 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d, m);
  const __m512i lo_out = lo_outputs(), hi_out = hi_outputs();
  const __m512 dl = _mm512_permutexvar_ps(lo_out, d64), dh = _mm512_permutexvar_ps(hi_out, d64);
  const __m512 ml = _mm512_permutexvar_ps(lo_out, m0), mh = _mm512_permutexvar_ps(hi_out, m0);
  const __m512i two = _mm512_set1_epi32(0x40000000);
  const __mmask64 byte2 = 0x4444444444444444ULL;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512i idx[4];
  for (int v = 0; v < 4; ++v) idx[v] = _mm512_load_si512(kCodeIndex.b[v]);
  for (int p = 0; p < 8; p += 2) {
    const __m512i raw = _mm512_loadu_si512(w + p * 32);  // pairs of pairs p and p + 1
    const __m512i nib[2] = {_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4)};
    for (int h = 0; h < 2; ++h)      // which pair of pairs: bytes 32h..32h+31
      for (int s = 0; s < 2; ++s) {  // low nibbles: input pair 2(p+h), high: 2(p+h)+1
        const __m512 f0 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, byte2, idx[2 * h], nib[s]));
        const __m512 f1 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, byte2, idx[2 * h + 1], nib[s]));
        const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(f1, dh, mh), _mm512_fmadd_ps(f0, dl, ml));
        _mm512_store_si512(out + (2 * (p + h) + s) * 32, (__m512i)b);
      }
  }
}

// vpermb indices for int8 quads: vector 2s + h, lane i (16 int32 lanes, byte 1; the others are
// kept) takes the code of output 8h + i/2, input 2s + i%2 of a quad row (byte 4n + j holds
// output n, input j of the quad's 4): s = 0 gives tile row 2kq, s = 1 row 2kq + 1.
constexpr CodeIndex quad_index() {
  CodeIndex t{};
  for (int s = 0; s < 2; ++s)
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 16; ++i) t.b[2 * s + h][4 * i + 1] = (uint8_t)(4 * (8 * h + i / 2) + 2 * s + i % 2);
  return t;
}
alignas(64) constexpr CodeIndex kQuadIndex = quad_index();

// int8: group g of one output tile (8 quads x 64 bytes) as the same 16 x 32 bf16 tile rows as
// int4's. A code q, offset to u = q + 128 (0..255), lands in mantissa bits 8-15 of 2.0f
// (f = 2 + u/2^14 exactly), so w = f * 2^14 d - (2^15 + 128) d is one fma whose exact result is
// d*q (at most 8 + 11 significant bits, so fp32 holds it exactly; 2^14 d and (2^15 + 128) d are
// exact too), then rounded to nearest even bf16.
SD_AMX_BF16 inline void unpack_int8_bf16(const uint8_t* w, const at::Half* dg, uint16_t* out) {
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)dg));
  const __m512 dk = _mm512_mul_ps(d, _mm512_set1_ps(16384.0f));
  const __m512 m0 = _mm512_mul_ps(d, _mm512_set1_ps(-32896.0f));
  const __m512i lo_out = lo_outputs(), hi_out = hi_outputs();
  const __m512 dl = _mm512_permutexvar_ps(lo_out, dk), dh = _mm512_permutexvar_ps(hi_out, dk);
  const __m512 ml = _mm512_permutexvar_ps(lo_out, m0), mh = _mm512_permutexvar_ps(hi_out, m0);
  const __m512i two = _mm512_set1_epi32(0x40000000);
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const __mmask64 byte1 = 0x2222222222222222ULL;
  __m512i idx[4];
  for (int v = 0; v < 4; ++v) idx[v] = _mm512_load_si512(kQuadIndex.b[v]);
  for (int kq = 0; kq < 8; ++kq) {
    const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w + kq * 64), flip);
    for (int s = 0; s < 2; ++s) {
      const __m512 f0 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, byte1, idx[2 * s], u));
      const __m512 f1 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, byte1, idx[2 * s + 1], u));
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(f1, dh, mh), _mm512_fmadd_ps(f0, dl, ml));
      _mm512_store_si512(out + (2 * kq + s) * 32, (__m512i)b);
    }
  }
}

// Tile numbers: 0-3 sums of up to 4 chunks of R rows, 4-5 weights (two groups in flight), 6-7
// activations.
SD_AMX_BF16 void load_tile_config_bf16(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = t == 4 || t == 5 ? 16 : rows, cfg.colsb[t] = 64;
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

// GCC's tile load/store intrinsics are asm statements that do not tell the compiler which
// memory they touch; these say it (a ring buffer's weights, a block's activations, the sums), so
// that the ordinary stores and loads around them stay in order without a full memory barrier.
#define SD_TILE_LOAD_BF16(T, p, stride, bytes) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #T ::"r"(p), "r"((int64_t)(stride)), "m"(*(const uint8_t(*)[bytes])(p)))
#define SD_TILE_STORE_F32(T, p) \
  asm volatile("tilestored %%tmm" #T ", (%1,%2,1)" : "=m"(*(float(*)[16 * kTile])(p)) : "r"(p), "r"(64L))
// One group: its weights into tile B, then each chunk's activations (group-major: chunk c's R
// rows of 32 inputs at xg + 32 R c, stride 64 bytes) into A and onto sums C_c.
#define SD_BF16_GROUP(B)                                                                   \
  do {                                                                                     \
    SD_TILE_LOAD_BF16(B, ring[g % kRing], 64, 1024);                                       \
    SD_TILE_LOAD_BF16(6, xg, 64, 64 * 16);                                                 \
    _tile_dpbf16ps(0, 6, B);                                                               \
    if constexpr (CHUNKS > 1) { SD_TILE_LOAD_BF16(7, xg + 32 * R, 64, 64 * 16); _tile_dpbf16ps(1, 7, B); } \
    if constexpr (CHUNKS > 2) { SD_TILE_LOAD_BF16(6, xg + 64 * R, 64, 64 * 16); _tile_dpbf16ps(2, 6, B); } \
    if constexpr (CHUNKS > 3) { SD_TILE_LOAD_BF16(7, xg + 96 * R, 64, 64 * 16); _tile_dpbf16ps(3, 7, B); } \
  } while (0)

// Group g of an output tile's weights (codes wt, scales dt, offsets mt: int4 only) into out.
template <bool INT8>
SD_AMX_BF16 inline void unpack_group(const uint8_t* wt, const at::Half* dt, const at::Half* mt, int64_t g, uint16_t* out) {
  if constexpr (INT8)
    unpack_int8_bf16(wt + g * 512, dt + g * kTile, out);
  else
    unpack_int4_bf16(wt + g * 256, dt + g * kTile, mt + g * kTile, out);
}

// One output tile, one block of CHUNKS x R rows: groups unpacked kAhead ahead of the tile unit.
// wt, dt, mt: the tile's codes and [G, 16] scales / offsets (mt unused for INT8).
// x: group-major activations [G, RT, 32] (RT rows in all, this block's first row at `row0`).
template <int CHUNKS, bool INT8>
SD_AMX_BF16 void tile_block_bf16(const uint8_t* wt, const at::Half* dt, const at::Half* mt, int64_t G,
                                 const at::BFloat16* x, int64_t RT, int64_t row0, int64_t R, int64_t T,
                                 at::BFloat16* y, int64_t ldy) {
  constexpr int kRing = 4, kAhead = 2;
  constexpr int64_t group_bytes = INT8 ? 512 : 256;
  // Weights asked for ahead of the unpacking. int4: 8 groups (2 KB) into L1. int8 streams twice
  // the bytes for the same unpacking work, and L1's few fill buffers kept too little in flight:
  // 32 groups (16 KB) into L2 instead (embedded int8 model, 2 cores, T=1: 6.63 -> 6.09 ms a step;
  // 8 KB 7.4, 32 KB 6.9-7.8 (noisy); no software prefetch 9.1).
  constexpr int64_t ahead = INT8 ? 16384 / group_bytes : 2048 / group_bytes;
  alignas(64) uint16_t ring[kRing][16 * 32];
  alignas(64) float sums[16 * kTile];
  _tile_zero(0);
  if constexpr (CHUNKS > 1) _tile_zero(1);
  if constexpr (CHUNKS > 2) _tile_zero(2);
  if constexpr (CHUNKS > 3) _tile_zero(3);
  for (int64_t g = 0; g < std::min<int64_t>(kAhead, G); ++g) unpack_group<INT8>(wt, dt, mt, g, ring[g % kRing]);
  for (int64_t g = 0; g < G; ++g) {
    const at::BFloat16* xg = x + (g * RT + row0) * kGroup;
    if (g & 1)
      SD_BF16_GROUP(5);
    else
      SD_BF16_GROUP(4);
    const int64_t n = g + kAhead;  // unpacked while the tile unit works
    if (n < G) unpack_group<INT8>(wt, dt, mt, n, ring[n % kRing]);
    for (int line = 0; line < group_bytes; line += 64) {  // (past the tile's end: the next tile's first groups)
      const char* a = (const char*)(wt + (n + ahead) * group_bytes + line);
      if constexpr (INT8)
        _mm_prefetch(a, _MM_HINT_T1);
      else
        _mm_prefetch(a, _MM_HINT_T0);
    }
  }
  for (int c = 0; c < CHUNKS; ++c) {
    if (c == 0) SD_TILE_STORE_F32(0, sums);
    if (c == 1) SD_TILE_STORE_F32(1, sums);
    if (c == 2) SD_TILE_STORE_F32(2, sums);
    if (c == 3) SD_TILE_STORE_F32(3, sums);
    for (int64_t r = 0; r < R && row0 + c * R + r < T; ++r)
      _mm256_storeu_si256((__m256i*)(y + (row0 + c * R + r) * ldy),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + r * kTile)));
  }
}

using Bf16BlockFn = void (*)(const uint8_t*, const at::Half*, const at::Half*, int64_t, const at::BFloat16*, int64_t,
                             int64_t, int64_t, int64_t, at::BFloat16*, int64_t);
template <bool INT8>
constexpr Bf16BlockFn kBf16Blocks[] = {tile_block_bf16<1, INT8>, tile_block_bf16<2, INT8>, tile_block_bf16<3, INT8>,
                                       tile_block_bf16<4, INT8>};

// int4 (m: offsets) or int8 (m unused) weights times bf16 rows on the tile unit.
template <bool INT8>
at::Tensor linear_amx_bf16(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  if (!INT8) TORCH_CHECK(m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "specdecode qlinear: m must match d");
  const auto [x, T, K, tiles, G, N] = linear_shape(x_in, packed, d, !INT8);
  const int64_t tile_bytes = K * kTile / (INT8 ? 1 : 2);
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0) return y;
  TORCH_CHECK(amx_permitted(), "specdecode qlinear: Linux refused this process the AMX tile state (kernel 5.16+ needed)");
  // Rows in blocks of at most 64 (4 chunks of at most 16, the sums' tiles), balanced: 33 rows ->
  // 3 chunks of 11. Activations regrouped group-major ([G, RT, 32], zero rows past T) so that
  // each tile load reads 64 contiguous bytes a row.
  const int64_t blocks = (T + 63) / 64, block_rows = (T + blocks - 1) / blocks;
  const int64_t chunks = (block_rows + kTile - 1) / kTile, R = (block_rows + chunks - 1) / chunks;
  const int64_t RT = blocks * chunks * R;
  std::vector<at::BFloat16> xg(G * RT * kGroup, at::BFloat16(0.0f));
  const auto* xp = x.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) std::memcpy(&xg[(g * RT + t) * kGroup], xp + t * K + g * kGroup, kGroup * 2);
  const at::Tensor dc = d.contiguous(), mc = INT8 ? d : m.contiguous();
  const auto* wp = (const uint8_t*)packed.data_ptr();
  const auto* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = INT8 ? nullptr : mc.data_ptr<at::Half>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    load_tile_config_bf16((int)R);
    for (int64_t j = begin; j < end; ++j)
      for (int64_t b = 0; b < blocks; ++b)
        kBf16Blocks<INT8>[chunks - 1](wp + j * tile_bytes, dp + j * G * kTile, INT8 ? nullptr : mp + j * G * kTile, G,
                                      xg.data(), RT, b * chunks * R, R, T, yp + j * kTile, N);
    release_tiles();
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// AMX-INT8 tiles for the VNNI kernel's arithmetic (the `amx-int8` kernel: chunks of enough rows;
// fewer rows go through `vpdpbusd`, which costs less for them). The quad layout is the tile
// layout `tdpb*d` takes as its second operand (8 rows of 16 outputs x 4 inputs for a group of
// 32 inputs), so int8 weights load straight from memory and int4 codes need only their two
// nibbles split. One tile instruction gives a group's exact int32 sums for up to 16 rows at
// once (`tdpbssd`, signed activations x signed codes: int4 codes 0..15 are the same bytes signed,
// and for int8 it is what VNNI's unsigned-offset sum minus its correction equals; `tdpbsud` for
// int4 measured no faster), then each row's sums
// are scaled into its fp32 totals by the very instructions of the VNNI kernel (add_group_*), in
// the same order: results are bitwise equal to avx512-vnni's for any number of rows.

#define SD_AMX_INT8 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c,amx-tile,amx-int8")))

void release_amx_tiles() { release_tiles(); }

#define SD_TILE_STORE_I32(T, p) \
  asm volatile("tilestored %%tmm" #T ", (%1,%2,1)" : "=m"(*(int32_t(*)[kMaxRows * kTile])(p)) : "r"(p), "r"(64L))

// int4 quads of group g (4 x 64 bytes, quads 2p / 2p + 1 in low / high nibbles) as 8 x 64 codes.
SD_AMX_INT8 inline void split_nibbles(const uint8_t* w, uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int p = 0; p < 4; ++p) {
    const __m512i raw = _mm512_loadu_si512(w + 64 * p);
    _mm512_store_si512(out + 128 * p, _mm512_and_si512(raw, low4));
    _mm512_store_si512(out + 128 * p + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
  }
}

// Group g's weights as the tile unit reads them: int8 quads straight from memory, int4 codes
// split into `ring` (kAhead groups ahead of their use: a tile load right after the stores that
// wrote its bytes waits for them to reach L1, which doubled the int4 head's time).
constexpr int kInt8Ring = 4, kInt8Ahead = 2;

// One output tile, CH chunks of R rows (R <= 16; the last chunk's rows past T padded with zero
// activations, computed and dropped) over all groups, in one pass over the tile's weights.
// wt, dt, mt: the tile's codes, [G, 16] scales and offsets; xq,
// dx, sq: the rows as quantize_rows gives them (padded to CH * R rows); T: the real rows.
#define SD_INT8_GROUP(C0, C1, B)                                                       \
  do {                                                                                 \
    SD_TILE_LOAD_BF16(B, w, 64, 512);                                                  \
    _tile_zero(C0); _tile_loadd(4, xg, ldx); _tile_dpbssd(C0, 4, B);                   \
    if constexpr (CH > 1) { _tile_zero(C1); _tile_loadd(5, xg + R * ldx, ldx); _tile_dpbssd(C1, 5, B); } \
  } while (0)
// Group g's sums of chunk c (tile 2c + g % 2) into the chunk's totals, as tile_rows_vnni adds them.
#define SD_INT8_SCALE(c, T0, T1, g)                                                                      \
  do {                                                                                                   \
    if ((g) & 1) SD_TILE_STORE_I32(T1, sums); else SD_TILE_STORE_I32(T0, sums);                          \
    const float* dxc = dx + ((c) * G + (g)) * R;                                                         \
    const float* sqc = sq + ((c) * G + (g)) * R;                                                         \
    for (int r = 0; r < R; ++r) {                                                                        \
      const __m512i acc = _mm512_load_si512(sums[r]);                                                    \
      if constexpr (INT4)                                                                                \
        tot[c][r] = add_group_int4(tot[c][r], acc, d, m, sqc[r], dxc[r]);                                \
      else                                                                                               \
        tot[c][r] = add_group_int8(tot[c][r], acc, d, dxc[r]);                                           \
    }                                                                                                    \
  } while (0)
#define SD_INT8_DRAIN(g)                                                                                 \
  do {                                                                                                   \
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + (g) * kTile)));           \
    const __m512 m = INT4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mt + (g) * kTile))) : d; \
    SD_INT8_SCALE(0, 0, 1, g);                                                                           \
    if constexpr (CH > 1) SD_INT8_SCALE(1, 2, 3, g);                                                     \
  } while (0)

template <bool INT4, int CH, int R>
SD_AMX_INT8 void tile_rows_amx_int8(const uint8_t* wt, const at::Half* dt, const at::Half* mt, const int8_t* xq,
                                    int64_t ldx, const float* dx, const float* sq, int64_t G, int64_t T,
                                    at::BFloat16* y, int64_t ldy) {
  constexpr int64_t group_bytes = INT4 ? 256 : 512;
  __m512 tot[CH][R];
  alignas(64) int32_t sums[kMaxRows][kTile];
  alignas(64) uint8_t ring[INT4 ? kInt8Ring : 1][512];
  for (int c = 0; c < CH; ++c)
    for (int r = 0; r < R; ++r) tot[c][r] = _mm512_setzero_ps();
  if constexpr (INT4)
    for (int64_t g = 0; g < std::min<int64_t>(kInt8Ahead, G); ++g) split_nibbles(wt + g * group_bytes, ring[g % kInt8Ring]);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* w = wt + g * group_bytes;
    for (int line = 0; line < group_bytes; line += 64)  // (past the tile's end: the next tile's first groups)
      _mm_prefetch((const char*)(w + kPrefetchGroups * group_bytes + line), _MM_HINT_T0);
    if constexpr (INT4) {
      const int64_t n = g + kInt8Ahead;
      if (n < G) split_nibbles(wt + n * group_bytes, ring[n % kInt8Ring]);
      w = ring[g % kInt8Ring];
    }
    const int8_t* xg = xq + g * kGroup;
    if (g & 1)
      SD_INT8_GROUP(1, 3, 7);
    else
      SD_INT8_GROUP(0, 2, 6);
    if (g > 0) SD_INT8_DRAIN(g - 1);  // the previous group's sums, while this one's are computed
  }
  SD_INT8_DRAIN(G - 1);
  for (int c = 0; c < CH; ++c)
    for (int r = 0; r < R && c * R + r < T; ++r) store_bf16_rne(y + (c * R + r) * ldy, tot[c][r]);
}

using AmxInt8Fn = void (*)(const uint8_t*, const at::Half*, const at::Half*, const int8_t*, int64_t, const float*,
                           const float*, int64_t, int64_t, at::BFloat16*, int64_t);
template <bool INT4, int CH, int... Rs>
struct AmxInt8Rows {
  static constexpr AmxInt8Fn fn[] = {tile_rows_amx_int8<INT4, CH, Rs>...};
};
template <bool INT4, int CH>
using AmxInt8Kernels = AmxInt8Rows<INT4, CH, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

// Tiles 0-3: sums (chunk c, group parity p: tile 2c + p; rows x 16 int32), 4-5: activations of
// chunks 0 and 1 (rows x 32 int8), 6-7: weights (8 quads x 64 bytes), by group parity.
SD_AMX_INT8 void load_tile_config_int8(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = t >= 6 ? 8 : rows, cfg.colsb[t] = t == 4 || t == 5 ? 32 : 64;
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

// Output tiles [begin, end), rows in chunks of R (xq padded to a whole number of chunks), two
// chunks a pass over a tile's weights. dx, sq: chunk-major, then group-major ([chunks, G, R]).
template <bool INT4>
void chunk_amx_int8(const uint8_t* wp, int64_t tile_bytes, const at::Half* dp, const at::Half* mp, const int8_t* xq,
                    int64_t ldx, const float* dx, const float* sq, int64_t G, int R, int64_t T, at::BFloat16* y,
                    int64_t ldy, int64_t begin, int64_t end) {
  load_tile_config_int8(R);
  const int64_t chunks = (T + R - 1) / R;
  for (int64_t j = begin; j < end; ++j)
    for (int64_t c = 0; c < chunks; c += 2) {
      const auto fn = c + 1 < chunks ? AmxInt8Kernels<INT4, 2>::fn[R - 1] : AmxInt8Kernels<INT4, 1>::fn[R - 1];
      fn(wp + j * tile_bytes, dp + j * G * kTile, INT4 ? mp + j * G * kTile : nullptr, xq + c * R * ldx, ldx,
         dx + c * G * R, sq + c * G * R, G, T - c * R, y + c * R * ldy + j * kTile, ldy);
    }
}

template void chunk_amx_int8<true>(const uint8_t*, int64_t, const at::Half*, const at::Half*, const int8_t*, int64_t,
                                   const float*, const float*, int64_t, int, int64_t, at::BFloat16*, int64_t, int64_t,
                                   int64_t);
template void chunk_amx_int8<false>(const uint8_t*, int64_t, const at::Half*, const at::Half*, const int8_t*, int64_t,
                                    const float*, const float*, int64_t, int, int64_t, at::BFloat16*, int64_t, int64_t,
                                    int64_t);

at::Tensor int4_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  return linear_amx_bf16<false>(x, packed, d, m);
}

at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d) {
  return linear_amx_bf16<true>(x, packed, d, d);
}

at::Tensor int4_linear_vnni(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  return qlinear_vnni<true>(x, packed, d, m);
}

at::Tensor int8_linear_vnni(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& wsum) {
  return qlinear_vnni<false>(x, packed, d, wsum);
}

// From how many rows a chunk goes through AMX-INT8 tiles (the `amx-int8` kernel); fewer rows cost
// less through `vpdpbusd`. Measured on the embedded model (Xeon, 2 cores; forwards of T rows after
// 200 cached, int4 layers and the int8 head): int4 from 8 rows (T=5 4.26 ms a step with 8,
// 4.32 with 4, 4.35 with 2; T=9 -9% against VNNI alone, T=17 -20%), int8 from 4 (the 49152 x 576
// head: T=4 0.56 vs 0.61 ms, T=9 0.62 vs 1.01, T=33 1.25 vs 3.09; one row alike).
int64_t amx_int8_rows(bool int4) { return int4 ? 8 : 4; }

// This thread's intra-op thread count, set after this library's own lazy initialisation of it.
// ATen's `lazy_init_num_threads` is inline with a thread_local flag, so every shared library
// has its own: the first `at::parallel_for` of THIS library on a thread sets the thread's count
// to the count last set anywhere in the process (a serving process's main thread sets 1 after
// starting its compute thread with 2, and the compute thread then ran our kernels on one core).
int64_t set_thread_count(int64_t threads) {
  at::internal::lazy_init_num_threads();
  at::set_num_threads((int)threads);
  return at::get_num_threads();
}

at::Tensor int4_linear_amx_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m,
                                int64_t amx_rows) {
  return qlinear_vnni<true>(x, packed, d, m, std::max<int64_t>(amx_rows, 1));
}

at::Tensor int8_linear_amx_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d,
                                const at::Tensor& wsum, int64_t amx_rows) {
  return qlinear_vnni<false>(x, packed, d, wsum, std::max<int64_t>(amx_rows, 1));
}

bool amx_ready() { return amx_permitted(); }

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  return qlinear<true>(x, packed, d, m);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d) {
  return qlinear<false>(x, packed, d, d);
}

// ---------------------------------------------------------------------------------------------
// Causal attention, one query row at a time: row t (of T new tokens after `past` cached ones)
// attends to cache slots [0, past + t + 1). Scores are bf16 x bf16 dot products summed in fp32,
// softmax in fp32 (exp below), output sum in fp32: the same arithmetic for a row whatever T is.

SD_TARGET inline __m512 exp512(__m512 x) {
  // exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5],
  // 2^f by a degree-6 polynomial (rel. error ~2e-7); x below -87 gives 0.
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, log2e);
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

SD_TARGET inline __m512 bf16x16_to_ps(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// 16 rows of 16 int32 -> their 16 columns (c[j] lane i = r[i] lane j): 64 shuffles.
SD_TARGET inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i f0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), f1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(e0, f0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(e0, f0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(e1, f1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(e1, f1, 0xDD);
  }
}

// Keys j0..j0+15 of one head (rows of D bf16, stride ld; n valid, the rest zero) as D/2 vectors
// of their input pairs: kt[p] lane i = key j0+i's inputs (2p, 2p+1), what vdpbf16ps multiplies
// with a query's pair p broadcast: 16 keys' scores in one register, no horizontal sums.
SD_TARGET void transpose_keys(const at::BFloat16* k, int64_t ld, int64_t n, int64_t D, __m512i* kt) {
  for (int64_t c0 = 0; c0 < D / 2; c0 += 16) {
    const __mmask16 cols = (__mmask16)(D / 2 - c0 >= 16 ? 0xffff : (1u << (D / 2 - c0)) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < n ? _mm512_maskz_loadu_epi32(cols, k + i * ld + 2 * c0) : _mm512_setzero_si512();
    transpose16(r);
    for (int c = 0; c < 16 && c0 + c < D / 2; ++c) kt[c0 + c] = r[c];
  }
}

// Softmax over one row's S scores, in place and unnormalized (exp(s - max)); returns 1 / sum.
SD_TARGET float softmax_in_place(float* scores, int64_t S) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= S; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(scores + j));
  float mx = _mm512_reduce_max_ps(vmax);
  for (; j < S; ++j) mx = scores[j] > mx ? scores[j] : mx;
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= S; j += 16) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vmx));
    _mm512_storeu_ps(scores + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (j < S) {
    const __mmask16 tail = (__mmask16)((1u << (S - j)) - 1);
    __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), vmx));
    e = _mm512_maskz_mov_ps(tail, e);
    _mm512_mask_storeu_ps(scores + j, tail, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

// Softmax of one row's n raw scores for the tile path: p = exp(scale (s - max)) rounded to bf16
// into pr[0, n), zeros in pr[n, width) (width a multiple of 16); returns 1 / the sum of the fp32 p.
SD_TARGET float softmax_bf16(const float* s, int64_t n, int64_t width, float scale, uint16_t* pr) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
    vmax = _mm512_mask_max_ps(vmax, valid, vmax, _mm512_maskz_loadu_ps(valid, s + j));
  }
  const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), vscale = _mm512_set1_ps(scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 valid = j >= n ? (__mmask16)0 : n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + j), vmx), vscale)));
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256((__m256i*)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

// Attention reads each cached key and value once per KV head and step, from memory (a batch of
// 12 decoding sequences of 300 tokens: 80 MB a forward, as much as the weights): the next block
// of keys and the value rows a few ahead are asked for while the current ones are used (12
// sequences x 1-2 rows: 7-10% faster forwards; 16 / 32 keys ahead alike).
constexpr int64_t kValuePrefetch = 8;  // value rows ahead
constexpr int64_t kKeyAhead = 16;      // keys ahead: the next block

// Rows of one KV head's group that attend together: each value row is converted once for all.
constexpr int value_rows_for(int chunks) { return chunks >= 12 ? 1 : 24 / chunks > 8 ? 8 : 24 / chunks; }

// Rows a values task takes (of a KV head's per_head query rows; kv_heads: the KV heads of all
// the call's sequences). A few rows a head (decoding: 1-2 tokens) take the whole head, so that
// each head's values stream from memory once, on one thread (head_values runs the rows in
// chunks of value_rows_for; the later chunks read them from L2): the embedded model, one
// sequence, T = 1 / 2 after 2,000 cached tokens, 0.89 / 0.91 of the step time with the rows
// split in two tasks a head (three heads on two threads: each read twice); qwen2-1.5B-shaped
// 0.97; batches of 4 and T = 5 / 9 unchanged. Otherwise up to value_rows_for, and at least two
// tasks a thread where the rows allow it.
int64_t value_task_rows(int64_t D, int64_t per_head, int64_t kv_heads, int64_t threads) {
  if (kv_heads >= threads && per_head <= 8) return per_head;
  return std::max<int64_t>(1, std::min<int64_t>(value_rows_for((int)(D / 16)), per_head * kv_heads / (2 * threads)));
}

// out[r] = bf16(inv[r] * sum_{s < len[r]} p[r][s] v_{slot(r, s)}) for n <= value_rows_for(CH)
// rows, D = 16 CH, where slot(r, s) = s for s < shared and shared + tail[r][s - shared] past it
// (tail = nullptr: s; a tree row's path). For each row the same fmas in the same order (s
// ascending) however many rows share the call.
template <int CH>
SD_TARGET void values_block(float* const* p, const int64_t* len, const float* inv, int n, const at::BFloat16* v,
                            int64_t ld, at::BFloat16* const* out, int64_t shared, const int64_t* const* tail) {
  constexpr int R = value_rows_for(CH);
  __m512 o[R][CH];
  int64_t common = tail ? shared : len[0];  // positions whose value row is the same for every row
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < CH; ++c) o[r][c] = _mm512_setzero_ps();
    if (r < n) common = std::min(common, len[r]);
  }
  for (int64_t s = 0; s < common; ++s) {
    for (int c = 0; c < CH; c += 2) _mm_prefetch((const char*)(v + (s + kValuePrefetch) * ld + 16 * c), _MM_HINT_T0);
    __m512 vs[CH];
    for (int c = 0; c < CH; ++c) vs[c] = bf16x16_to_ps(v + s * ld + 16 * c);
    for (int r = 0; r < R; ++r)
      if (r < n) {
        const __m512 ps = _mm512_set1_ps(p[r][s]);
        for (int c = 0; c < CH; ++c) o[r][c] = _mm512_fmadd_ps(ps, vs[c], o[r][c]);
      }
  }
  for (int r = 0; r < R; ++r)
    if (r < n) {
      for (int64_t s = common; s < len[r]; ++s) {
        const __m512 ps = _mm512_set1_ps(p[r][s]);
        const at::BFloat16* vs = v + (tail && s >= shared ? shared + tail[r][s - shared] : s) * ld;
        for (int c = 0; c < CH; ++c) o[r][c] = _mm512_fmadd_ps(ps, bf16x16_to_ps(vs + 16 * c), o[r][c]);
      }
      const __m512 vinv = _mm512_set1_ps(inv[r]);
      for (int c = 0; c < CH; ++c)
        _mm256_storeu_si256((__m256i*)(out[r] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], vinv)));
    }
}

using ValuesFn = void (*)(float* const*, const int64_t*, const float*, int, const at::BFloat16*, int64_t,
                          at::BFloat16* const*, int64_t, const int64_t* const*);
constexpr ValuesFn kValues[16] = {values_block<1>, values_block<2>, values_block<3>, values_block<4>,
                                  values_block<5>, values_block<6>, values_block<7>, values_block<8>,
                                  values_block<9>, values_block<10>, values_block<11>, values_block<12>,
                                  values_block<13>, values_block<14>, values_block<15>, values_block<16>};

// Scores of R query rows against 16 keys (kt: their transposed pairs), each row's D/2 pair
// products summed in two chains (even and odd pairs) then added: the same arithmetic for a row
// whatever R is; R rows at once keep 2R chains in flight (vdpbf16ps has a latency of ~5 cycles).
template <int R>
SD_TARGET inline void score_rows(const __m512i* kt, const int32_t* const* q, int64_t D, __m512 vscale, float* const* out) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; p += 2)
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)kt[p], (__m512bh)_mm512_set1_epi32(q[r][p]));
      a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)kt[p + 1], (__m512bh)_mm512_set1_epi32(q[r][p + 1]));
    }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], _mm512_mul_ps(_mm512_add_ps(a0[r], a1[r]), vscale));
}

// Scores of keys j0..j0+15 of KV head kv (k: that head's keys) for every query row of the head's
// group that sees key j0, into scores [H, T, width] (scaled; entries past a row's last key are
// written and never read).
SD_TARGET void score_block(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t D, const at::BFloat16* k,
                           int64_t S, int64_t past, int64_t kv, int64_t group, int64_t j0, float scale,
                           float* scores, int64_t width) {
  __m512i kt[128];
  for (int64_t line = 0; line < 16 * D; line += 32) _mm_prefetch((const char*)(k + (j0 + kKeyAhead) * D + line), _MM_HINT_T0);
  transpose_keys(k + j0 * D, D, std::min<int64_t>(16, S - j0), D, kt);
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t t0 = std::max<int64_t>(0, j0 - past), n = (T - t0) * group;  // rows (t, h) that see key j0
  const int32_t* q[4];
  float* out[4];
  for (int64_t i = 0; i < n;) {
    const int r = n - i >= 4 ? 4 : 1;
    for (int j = 0; j < r; ++j, ++i) {
      const int64_t t = t0 + i / group, h = kv * group + i % group;
      q[j] = (const int32_t*)(qp + t * qs + h * D);
      out[j] = scores + (h * T + t) * width + j0;
    }
    if (r == 4) score_rows<4>(kt, q, D, vscale, out);
    else score_rows<1>(kt, q, D, vscale, out);
  }
}

// Each tree row's path, root first (parents[t] in [-1, t)); none for a chain (parents = nullptr).
std::vector<std::vector<int64_t>> tree_paths(const int64_t* parents, int64_t T) {
  std::vector<std::vector<int64_t>> paths(parents ? T : 0);
  for (int64_t t = 0; t < (parents ? T : 0); ++t) {
    for (int64_t i = t; i >= 0; i = parents[i]) paths[t].push_back(i);
    std::reverse(paths[t].begin(), paths[t].end());
  }
  return paths;
}

// Softmax and values of rows first..first+n-1 of KV head kv's group (row i = (t, h): t = i / group,
// h = kv group + i % group), their scores in scores [H, T, width]: the second pass of attend_block.
void head_values_chunk(int64_t T, int64_t H, int64_t D, const at::BFloat16* vp_head, int64_t past, int64_t group,
                       at::BFloat16* op, const std::vector<std::vector<int64_t>>& paths, float* scores, int64_t width,
                       int64_t kv, int64_t first, int n) {
  float* p[8];
  int64_t len[8];
  float inv[8];
  at::BFloat16* out[8];
  const int64_t* tail[8];
  const bool tree = !paths.empty();
  for (int r = 0; r < n; ++r) {
    const int64_t t = (first + r) / group, h = kv * group + (first + r) % group;
    p[r] = scores + (h * T + t) * width;
    if (tree) {  // the path's scores next to the prefix's (path[d] >= d: a forward copy)
      const std::vector<int64_t>& path = paths[t];
      for (size_t d = 0; d < path.size(); ++d) p[r][past + d] = p[r][past + path[d]];
      tail[r] = path.data();
      len[r] = past + (int64_t)path.size();
    } else {
      len[r] = past + t + 1;
    }
    inv[r] = softmax_in_place(p[r], len[r]);
    out[r] = op + t * H * D + h * D;
  }
  kValues[D / 16 - 1](p, len, inv, n, vp_head, D, out, past, tree ? tail : nullptr);
}

// head_values_chunk for any n rows, in chunks of at most value_rows_for (a row's arithmetic does
// not depend on the rows beside it: bitwise the same results however they are chunked).
void head_values(int64_t T, int64_t H, int64_t D, const at::BFloat16* vp_head, int64_t past, int64_t group,
                 at::BFloat16* op, const std::vector<std::vector<int64_t>>& paths, float* scores, int64_t width,
                 int64_t kv, int64_t first, int n) {
  const int chunk = value_rows_for((int)(D / 16));
  for (int c = 0; c < n; c += chunk)
    head_values_chunk(T, H, D, vp_head, past, group, op, paths, scores, width, kv, first + c, std::min(chunk, n - c));
}

// Rows t = 0..T-1 of q ([T, H, D] bf16, row stride qs) attend to k/v of one layer ([Hkv, L, D]
// bf16, head stride hs); out [T, H * D] bf16. A chain (parents = nullptr): row t sees slots
// [0, past + t + 1). A tree (parents[t] in [-1, t): the row it extends, -1 = the cached
// prefix): row t sees [0, past) and the slots past + i of its path (root .. t). Two passes:
// scores, one task per (KV head, block of 16 keys) whose keys are transposed once for every
// query row of the head's group that sees any of them; then per (row, head) the softmax and the
// values. A tree row's path scores are first moved next to the prefix's, so that its softmax
// and its values run exactly as the same path decoded as a chain: a row's scores and output are
// the same instructions on the same data whatever T and the rest of the tree are.
void attend_block(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t H, int64_t D, const at::BFloat16* kp,
                  const at::BFloat16* vp, int64_t hs, int64_t past, int64_t group, at::BFloat16* op,
                  const int64_t* parents = nullptr) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int64_t S = past + T, blocks = (S + 15) / 16, width = blocks * 16, kv_heads = H / group;
  std::vector<float> scores(H * T * width);
  const std::vector<std::vector<int64_t>> paths = tree_paths(parents, T);
  at::parallel_for(0, kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    for (int64_t i = begin; i < end; ++i)
      score_block(qp, qs, T, D, kp + (i / blocks) * hs, S, past, i / blocks, group, (i % blocks) * 16, scale,
                  scores.data(), width);
  });
  // Values: a KV head's query rows (t, then the heads of its group) in blocks of up to `rows`,
  // at least two tasks a thread where the rows allow it.
  const int64_t per_head = T * group, rows = value_task_rows(D, per_head, kv_heads, at::get_num_threads());
  const int64_t tasks_per_head = (per_head + rows - 1) / rows;
  at::parallel_for(0, kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t kv = i / tasks_per_head, first = (i % tasks_per_head) * rows;
      head_values(T, H, D, vp + kv * hs, past, group, op, paths, scores.data(), width, kv, first,
                  (int)std::min(rows, per_head - first));
    }
  });
}

// One KV head's whole attention (scores of every key block, then softmax and values of its
// rows): a task of `attend_many`. Each row's arithmetic is attend_block's (score_rows and
// values_block compute a row alike however many rows share a call).
void attend_head(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t H, int64_t D, const at::BFloat16* kp,
                 const at::BFloat16* vp, int64_t hs, int64_t past, int64_t group, at::BFloat16* op,
                 const std::vector<std::vector<int64_t>>& paths, int64_t kv) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int64_t S = past + T, blocks = (S + 15) / 16, width = blocks * 16;
  thread_local std::vector<float> scores;
  if ((int64_t)scores.size() < H * T * width) scores.resize(H * T * width);
  for (int64_t b = 0; b < blocks; ++b)
    score_block(qp, qs, T, D, kp + kv * hs, S, past, kv, group, b * 16, scale, scores.data(), width);
  head_values(T, H, D, vp + kv * hs, past, group, op, paths, scores.data(), width, kv, 0, (int)(T * group));
}

// ---------------------------------------------------------------------------------------------
// The same attention on AMX-BF16 tiles (the `amx` kernel): a KV head's query rows in blocks of
// 16 multiply 16 keys a tile instruction (scores) and 32 positions of values a tile instruction
// (output), instead of one row at a time on AVX-512 (which cost ~5 us a row and layer).
// Arithmetic per row (the same whatever T, the block or the tree):
// - s(row, slot) = sum over D/32 chunks (in order) of a tdpbf16ps of the row's q and the slot's
//   k (each chunk's 32 products summed by the tile unit in fp32);
// - p = exp(scale (s - max)) over the row's sequence, s the unscaled sums (softmax_bf16),
//   rounded to bf16;
// - out = bf16(sum over 32-position blocks j (in order, from position 0) of tdpbf16ps(p, v)
//   / sum p). Positions past the row's length have p = 0 (exactly +0 in the sums); positions
//   past the cache's valid slots have v = 0.
// A tree row's sequence is the cached prefix then its path (as that path decoded as a chain):
// blocks within the prefix are shared by all rows; a block holding path slots is gathered for
// the row alone and multiplied with its row of p (the block's other rows zero).

constexpr int kAttRows = 16, kAttPositions = 32;

SD_AMX_BF16 inline void att_tile_barrier() { asm volatile("" ::: "memory"); }

// Values of positions 32j..32j+31 (rows slot(s) of v, stride D; s >= n: zero) as the B tiles of
// tdpbf16ps, one per chunk of 16 dims: tile row r = positions (2r, 2r+1), lane 2i + e = v[2r+e][16c+i].
SD_AMX_BF16 void value_pairs(const at::BFloat16* v, int64_t D, const int64_t* slots, int64_t n, int64_t chunks,
                             uint16_t* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int r = 0; r < 16; ++r)
    for (int64_t c = 0; c < chunks; c += 2) {
      const __m512i a = 2 * r < n ? _mm512_loadu_si512(v + slots[2 * r] * D + 16 * c) : _mm512_setzero_si512();
      const __m512i b = 2 * r + 1 < n ? _mm512_loadu_si512(v + slots[2 * r + 1] * D + 16 * c) : _mm512_setzero_si512();
      _mm512_store_si512(out + (c * 16 + r) * 32, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(out + ((c + 1) * 16 + r) * 32, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// C tile (16 rows x 16 fp32) += A x B for each chunk, for CHUNKS <= 4 chunks of 16 dims of the
// values (tiles 0-3), A in tile 4, B through tiles 5 and 6.
#define SD_ATT_VALUES(A_PTR, A_STRIDE, B_PTR, CH)                                              \
  do {                                                                                         \
    _tile_loadd(4, (A_PTR), (A_STRIDE));                                                       \
    _tile_loadd(5, (B_PTR), 64);                                                               \
    _tile_dpbf16ps(0, 4, 5);                                                                   \
    if ((CH) > 1) { _tile_loadd(6, (B_PTR) + 512, 64); _tile_dpbf16ps(1, 4, 6); }              \
    if ((CH) > 2) { _tile_loadd(5, (B_PTR) + 1024, 64); _tile_dpbf16ps(2, 4, 5); }             \
    if ((CH) > 3) { _tile_loadd(6, (B_PTR) + 1536, 64); _tile_dpbf16ps(3, 4, 6); }             \
  } while (0)

// Scores of 16 keys (kt: their D/2 pair rows) for the rows whose q chunks are in tiles 4-7, into C.
#define SD_ATT_SCORES(C, kt)                                                         \
  do {                                                                               \
    _tile_zero(C);                                                                   \
    _tile_loadd(2, (kt), 64);                                                        \
    _tile_dpbf16ps(C, 4, 2);                                                         \
    if (chunks > 1) { _tile_loadd(3, (kt) + 512, 64); _tile_dpbf16ps(C, 5, 3); }     \
    if (chunks > 2) { _tile_loadd(2, (kt) + 1024, 64); _tile_dpbf16ps(C, 6, 2); }    \
    if (chunks > 3) { _tile_loadd(3, (kt) + 1536, 64); _tile_dpbf16ps(C, 7, 3); }    \
  } while (0)

// One KV head's query rows first..first+n-1 (row i = (t, h): t = i / group, h = kv group + i % group).
SD_AMX_BF16 void attend_rows_amx(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t D, const uint16_t* kt_all,
                                 const uint16_t* vp_all, const at::BFloat16* v, int64_t S, int64_t past, int64_t kv,
                                 int64_t group, int64_t first, int n, float scale, int64_t H, at::BFloat16* op,
                                 const std::vector<std::vector<int64_t>>& paths) {
  const bool tree = !paths.empty();
  int64_t len[kAttRows], last = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t t = (first + r) / group;
    len[r] = past + (tree ? (int64_t)paths[t].size() : t + 1);
    last = std::max(last, tree ? S : past + t + 1);  // slots the block's rows read
  }
  const int64_t width = (last + kAttPositions - 1) / kAttPositions * kAttPositions, chunks = D / 32;
  alignas(64) uint16_t qb[kAttRows * 128];
  thread_local std::vector<float> sc;  // scores [16, width]
  thread_local std::vector<uint16_t> pb;  // p [16, width] bf16, zero past each row's length
  if ((int64_t)sc.size() < kAttRows * width) sc.resize(kAttRows * width), pb.resize(kAttRows * width);
  if (n < kAttRows) std::memset(pb.data() + n * width, 0, (kAttRows - n) * width * 2);
  alignas(64) float tmp[kAttRows * 16];
  for (int r = 0; r < kAttRows; ++r)
    if (r < n) {
      const int64_t t = (first + r) / group, h = kv * group + (first + r) % group;
      std::memcpy(qb + r * D, qp + t * qs + h * D, D * 2);
    } else {
      std::memset(qb + r * D, 0, D * 2);
    }
  att_tile_barrier();
  // Scores: the rows' q chunks stay in tiles 4-7; each 16 keys' sums in tile 0 or 1.
  _tile_loadd(4, qb, D * 2);
  if (chunks > 1) _tile_loadd(5, qb + 32, D * 2);
  if (chunks > 2) _tile_loadd(6, qb + 64, D * 2);
  if (chunks > 3) _tile_loadd(7, qb + 96, D * 2);
  for (int64_t b = 0; b < width / 16; ++b) {  // even and odd key blocks in tiles 0 and 1
    const uint16_t* kt = kt_all + b * 16 * D;  // D/2 rows of 16 keys' pairs
    if (b & 1) {
      SD_ATT_SCORES(1, kt);
      _tile_stored(1, sc.data() + b * 16, width * 4);
    } else {
      SD_ATT_SCORES(0, kt);
      _tile_stored(0, sc.data() + b * 16, width * 4);
    }
  }
  att_tile_barrier();
  float inv[kAttRows];
  for (int r = 0; r < n; ++r) {
    float* p = sc.data() + r * width;
    if (tree) {  // the path's scores next to the prefix's (path[d] >= d: a forward copy)
      const std::vector<int64_t>& path = paths[(first + r) / group];
      for (size_t d = 0; d < path.size(); ++d) p[past + d] = p[past + path[d]];
    }
    inv[r] = softmax_bf16(p, len[r], width, scale, pb.data() + r * width);
  }
  // Values, up to 4 chunks of 16 dims a pass.
  const int64_t shared_blocks = tree ? past / kAttPositions : width / kAttPositions;
  alignas(64) uint16_t own_p[kAttRows * kAttPositions];
  alignas(64) uint16_t own_v[8 * 16 * 32];
  int64_t slots[kAttPositions];
  for (int64_t c0 = 0; c0 < D / 16; c0 += 4) {
    const int ch = (int)std::min<int64_t>(4, D / 16 - c0);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    att_tile_barrier();
    for (int64_t j = 0; j < shared_blocks; ++j)
      SD_ATT_VALUES(pb.data() + j * kAttPositions, width * 2, vp_all + (j * (D / 16) + c0) * 512, ch);
    for (int64_t j = shared_blocks; j < width / kAttPositions; ++j)  // a tree's blocks with path slots
      for (int r = 0; r < n; ++r) {
        const int64_t s0 = j * kAttPositions;
        if (len[r] <= s0) continue;
        const std::vector<int64_t>& path = paths[(first + r) / group];
        const int64_t m = std::min<int64_t>(kAttPositions, len[r] - s0);
        for (int64_t s = 0; s < m; ++s) slots[s] = s0 + s < past ? s0 + s : past + path[s0 + s - past];
        std::memset(own_p, 0, sizeof(own_p));
        std::memcpy(own_p + r * kAttPositions, pb.data() + r * width + s0, kAttPositions * 2);
        for (int c = 0; c < ch; c += 2) value_pairs(v + 16 * (c0 + c), D, slots, m, 2, own_v + c * 512);  // 32 dims
        att_tile_barrier();
        SD_ATT_VALUES(own_p, kAttPositions * 2, own_v, ch);
      }
    for (int c = 0; c < ch; ++c) {
      if (c == 0) _tile_stored(0, tmp, 64);
      if (c == 1) _tile_stored(1, tmp, 64);
      if (c == 2) _tile_stored(2, tmp, 64);
      if (c == 3) _tile_stored(3, tmp, 64);
      att_tile_barrier();
      for (int r = 0; r < n; ++r) {
        const int64_t t = (first + r) / group, h = kv * group + (first + r) % group;
        _mm256_storeu_si256((__m256i*)(op + t * H * D + h * D + 16 * (c0 + c)),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(tmp + r * 16), _mm512_set1_ps(inv[r]))));
      }
    }
  }
}

// One KV head's attention on AMX tiles (attend_block's contract, D a multiple of 32, at most 128):
// its keys transposed and its values paired (into this thread's buffer: each head's task reads
// only its own), then its rows in blocks of 16. Tile config loaded by the caller.
SD_AMX_BF16 void attend_head_amx(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t H, int64_t D,
                                 const at::BFloat16* kp, const at::BFloat16* vp, int64_t hs, int64_t past,
                                 int64_t group, at::BFloat16* op, const std::vector<std::vector<int64_t>>& paths,
                                 int64_t kv) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int64_t S = past + T, blocks = (S + kAttPositions - 1) / kAttPositions;
  const int64_t per_head = blocks * kAttPositions * D;  // uint16 of keys (and of values)
  thread_local std::vector<uint16_t> buffer;  // reused: a fresh one each call cost page faults
  if ((int64_t)buffer.size() < 2 * per_head + 32) buffer.resize(2 * per_head + 32);
  uint16_t* kt = (uint16_t*)(((uintptr_t)buffer.data() + 63) & ~(uintptr_t)63);  // 64-byte aligned
  uint16_t* vpairs = kt + per_head;
  int64_t slots[kAttPositions];
  for (int64_t j = 0; j < blocks; ++j) {  // keys transposed, values paired: 32 slots at a time
    const int64_t s0 = j * kAttPositions;
    for (int half = 0; half < 2; ++half) {
      const int64_t j0 = s0 + 16 * half;
      __m512i* dst = (__m512i*)(kt + j0 * D);  // D/2 rows of 64 bytes
      transpose_keys(kp + kv * hs + j0 * D, D, std::max<int64_t>(0, std::min<int64_t>(16, S - j0)), D, dst);
    }
    for (int i = 0; i < kAttPositions; ++i) slots[i] = s0 + i;
    value_pairs(vp + kv * hs, D, slots, std::min<int64_t>(kAttPositions, S - s0), D / 16, vpairs + j * kAttPositions * D);
  }
  const int64_t row_blocks = (T * group + kAttRows - 1) / kAttRows;
  for (int64_t b = 0; b < row_blocks; ++b) {
    const int64_t first = b * kAttRows;
    attend_rows_amx(qp, qs, T, D, kt, vpairs, vp + kv * hs, S, past, kv, group, first,
                    (int)std::min<int64_t>(kAttRows, T * group - first), scale, H, op, paths);
  }
}

// (SeqAttention, one sequence's attention in a layer: common.h)

bool tiles_fit(bool tiles, int64_t D) { return tiles && D % 32 == 0 && D <= 128; }

// Several sequences' attention (a batched forward's layer) in ONE parallel region, one task a
// (sequence, KV head): each row computed exactly as attend() computes it for its sequence alone
// (the same per-head functions, the same row arithmetic), without a parallel region, buffers and
// a 2:1 split of 3 heads over 2 threads for every sequence (10 sequences of 1-4 rows: one call a
// sequence cost ~20 us each, a third of a batched forward). On AMX tiles attend() runs one
// sequence through it too. (Tasks of (head, row block) after a parallel preparation balanced 3
// heads better on 2 threads but ran slower: 30 vs 26 us at T=17 on the embedded model's shapes.)
SD_AMX_BF16 void attend_many_amx(const std::vector<SeqAttention>& seqs, int64_t H, int64_t D, int64_t group) {
  const int64_t kv_heads = H / group;
  at::parallel_for(0, (int64_t)seqs.size() * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    load_tile_config_bf16(kAttRows);
    for (int64_t i = begin; i < end; ++i) {
      const SeqAttention& a = seqs[i / kv_heads];
      attend_head_amx(a.q, a.qs, a.T, H, D, a.k, a.v, a.hs, a.past, group, a.out, a.paths, i % kv_heads);
    }
    release_tiles();
  });
}

void attend_many(const std::vector<SeqAttention>& seqs, int64_t H, int64_t D, int64_t group, bool tiles) {
  if (!glue_avx512()) {
    attend_many_avx2(seqs, H, D, group);
    return;
  }
  if (tiles_fit(tiles, D)) {
    TORCH_CHECK(amx_permitted(), "specdecode attention: Linux refused this process the AMX tile state (kernel 5.16+ needed)");
    attend_many_amx(seqs, H, D, group);
    return;
  }
  const int64_t kv_heads = H / group;
  at::parallel_for(0, (int64_t)seqs.size() * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    for (int64_t i = begin; i < end; ++i) {
      const SeqAttention& a = seqs[i / kv_heads];
      attend_head(a.q, a.qs, a.T, H, D, a.k, a.v, a.hs, a.past, group, a.out, a.paths, i % kv_heads);
    }
  });
}

// attend_block on AMX tiles where asked (`tiles`: the amx kernel) and the head size fits.
void attend(const at::BFloat16* qp, int64_t qs, int64_t T, int64_t H, int64_t D, const at::BFloat16* kp,
            const at::BFloat16* vp, int64_t hs, int64_t past, int64_t group, at::BFloat16* op, const int64_t* parents,
            bool tiles) {
  if (tiles_fit(tiles, D) || !glue_avx512())
    attend_many({SeqAttention{qp, qs, T, kp, vp, hs, past, op, tree_paths(parents, T)}}, H, D, group, tiles);
  else
    attend_block(qp, qs, T, H, D, kp, vp, hs, past, group, op, parents);
}

// q [T, H, D] bf16 (any row stride, heads and dims contiguous); k, v [Hkv, L, D] bf16 (one
// layer of the cache, slots [0, past + T) valid); returns [T, H * D] bf16. `past` comes as a
// 0-d int64 tensor: a plain int would be a constant in a torch.compile graph (one graph each step).
// A tree's parents ([T] int64, parents[t] in [-1, t)) as a pointer, or nullptr for a chain.
const int64_t* tree_parents(const c10::optional<at::Tensor>& parents, int64_t T, at::Tensor& holder) {
  if (!parents.has_value()) return nullptr;
  holder = parents->contiguous();
  TORCH_CHECK(holder.scalar_type() == at::kLong && holder.dim() == 1 && holder.size(0) == T,
              "specdecode attention: parents must be [T] int64, one per new row");
  const int64_t* p = holder.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(p[t] >= -1 && p[t] < t, "specdecode attention: parents[", t, "] = ", p[t], " (each row extends -1 or an earlier row)");
  return p;
}

at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& past_t,
                       const c10::optional<at::Tensor>& parents, bool tiles) {
  TORCH_CHECK(past_t.numel() == 1 && past_t.scalar_type() == at::kLong, "specdecode attend_rows: past must be a 0-d int64 tensor");
  const int64_t past = past_t.item<int64_t>();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "specdecode attend_rows: q [T, H, D], k/v [Hkv, L, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "specdecode attend_rows: bf16 only");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0);
  TORCH_CHECK(D % 16 == 0 && D <= 256 && H % Hkv == 0, "specdecode attend_rows: head_dim must be a multiple of 16 (<= 256)");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == D &&
                  v.stride(1) == D && k.stride(0) == v.stride(0),
              "specdecode attend_rows: unexpected strides");
  TORCH_CHECK(past + T <= k.size(1), "specdecode attend_rows: cache too short");
  at::Tensor out = at::empty({T, H * D}, q.options()), holder;
  attend(q.data_ptr<at::BFloat16>(), q.stride(0), T, H, D, k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
         k.stride(0), past, H / Hkv, out.data_ptr<at::BFloat16>(), tree_parents(parents, T, holder), tiles);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The glue between a step's matmuls, one call each instead of a dozen small ATen ops (a decode
// step of the 30-layer embedded model ran ~4,000 of them, a quarter of its time). Each row is
// computed on its own in a fixed order: batch invariant like the matmuls. Eager path only (no
// fakes: torch.compile keeps the ATen ops, which it fuses itself).

SD_TARGET inline void store_bf16x16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
}

// y[t] = bf16(x[t] * rsqrt(mean(x[t]^2) + eps) * w): x the fp32 residual stream [T, H], w [H].
SD_TARGET void rms_norm_rows(const float* xp, const float* wp, at::BFloat16* yp, int64_t T, int64_t H, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const float* r = xp + t * H;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
      const __m512 v = _mm512_loadu_ps(r + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 s = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / (float)H + eps));
    for (int64_t i = 0; i < H; i += 16)
      store_bf16x16(yp + t * H + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(r + i), s), _mm512_loadu_ps(wp + i)));
  }
}

at::Tensor rms_norm_bf16(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  const FlushDenormals flush;
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "specdecode rms_norm: x must be [T, H] fp32");
  const at::Tensor x = x_in.contiguous(), w = w_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.numel() == H && H % 16 == 0, "specdecode rms_norm: weight [H], H a multiple of 16");
  at::Tensor y = at::empty({T, H}, x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  (glue_avx512() ? rms_norm_rows : rms_norm_rows_avx2)(xp, wp, yp, T, H, (float)eps);
  return y;
}

// One layer's attention for T new tokens after `past` cached ones: rotate the q and k heads of
// qkv [T, (H + 2 Hkv) D] bf16 (RoPE on pairs (2j, 2j+1): the q/k rows are stored in pair order;
// rope [T, D/2, 2] fp32 cos/sin; each product in fp32, rounded to bf16), write k and v into the
// cache (cache_k/v [layers, 1, Hkv, L, D] bf16) at slots past..past+T-1, then attend row by row
// as attend_rows. Returns [T, H * D] bf16.
// rope_attend's first half: q rotated into a new [T, H, D] tensor, k rotated and v copied into
// the cache layer at slots past..past+T-1.
// One head row of RoPE: pairs (a, b) of x -> (a c - b s, b c + a s), rope (cos, sin) of pair j at
// rope[2j], rope[2j + 1]; each in fp32, rounded to bf16.
SD_TARGET void rotate_row(const at::BFloat16* x, const float* rope, at::BFloat16* y, int64_t D) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi64(0x0000000080000000LL));  // negate even lanes
  for (int64_t i = 0; i < D; i += 16) {  // 8 pairs (a, b): (a c - b s, b c + a s)
    const __m512 ab = bf16x16_to_ps(x + i), rs = _mm512_loadu_ps(rope + i);
    const __m512 c = _mm512_moveldup_ps(rs), sn = _mm512_xor_ps(_mm512_movehdup_ps(rs), sign);  // (c, c), (-s, s)
    const __m512 ba = _mm512_permute_ps(ab, 0xB1);
    store_bf16x16(y + i, _mm512_fmadd_ps(ba, sn, _mm512_mul_ps(ab, c)));
  }
}

using RotateFn = void (*)(const at::BFloat16*, const float*, at::BFloat16*, int64_t);

// Head h of one qkv row (heads q 0..H-1, then k, then v; D each) with its rope row: a q head
// rotated into q_row ([H, D]), a k head rotated and a v head copied into the cache layer's slot
// (kl, vl: [Hkv, L, D], head stride hs).
void rotate_head(RotateFn rotate, const at::BFloat16* row, const float* rope, int64_t h, int64_t H, int64_t Hkv,
                 int64_t D, at::BFloat16* q_row, at::BFloat16* kl, at::BFloat16* vl, int64_t hs, int64_t slot) {
  if (h < H) rotate(row + h * D, rope, q_row + h * D, D);
  else if (h < H + Hkv) rotate(row + h * D, rope, kl + (h - H) * hs + slot * D, D);
  else std::memcpy(vl + (h - H - Hkv) * hs + slot * D, row + h * D, D * sizeof(at::BFloat16));
}

at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k, at::Tensor& cache_v,
                             int64_t layer, int64_t past, int64_t n_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(), "specdecode rope_attend: qkv must be [T, n] bf16");
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == at::kBFloat16 &&
                  cache_v.scalar_type() == at::kBFloat16 && cache_k.strides() == cache_v.strides(),
              "specdecode rope_attend: caches must be [layers, 1, Hkv, L, D] bf16 alike");
  const int64_t T = qkv.size(0), Hkv = cache_k.size(2), L = cache_k.size(3), D = cache_k.size(4), H = n_heads;
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && D % 16 == 0 && D <= 256 && H % Hkv == 0,
              "specdecode rope_attend: qkv has ", qkv.size(1), " columns, expected (H + 2 Hkv) * D");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == T * D, "specdecode rope_attend: rope must be [T, D/2, 2] fp32");
  TORCH_CHECK(cache_k.stride(4) == 1 && cache_k.stride(3) == D && layer >= 0 && layer < cache_k.size(0) && past + T <= L,
              "specdecode rope_attend: bad cache layout, layer or length");
  const int64_t hs = cache_k.stride(2), ls = cache_k.stride(0), width = qkv.size(1);
  at::Tensor q = at::empty({T, H, D}, qkv.options());
  const auto* src = qkv.data_ptr<at::BFloat16>();
  const float* cs = rope.data_ptr<float>();
  auto* qp = q.data_ptr<at::BFloat16>();
  auto* kl = cache_k.data_ptr<at::BFloat16>() + layer * ls;
  auto* vl = cache_v.data_ptr<at::BFloat16>() + layer * ls;
  const auto rotate = glue_avx512() ? rotate_row : rotate_row_avx2;
  for (int64_t t = 0; t < T; ++t)  // (rope row t: (cos, sin) of pair j at 2j, 2j + 1)
    for (int64_t h = 0; h < H + 2 * Hkv; ++h)
      rotate_head(rotate, src + t * width, cs + t * D, h, H, Hkv, D, qp + t * H * D, kl, vl, hs, past + t);
  return q;
}

// One layer's attention for T new tokens after `past` cached ones: rotate the q and k heads of
// qkv [T, (H + 2 Hkv) D] bf16 (RoPE on pairs (2j, 2j+1): the q/k rows are stored in pair order;
// rope [T, D/2, 2] fp32 cos/sin; each product in fp32, rounded to bf16), write k and v into the
// cache (cache_k/v [layers, 1, Hkv, L, D] bf16) at slots past..past+T-1, then attend row by row
// as attend_rows. Returns [T, H * D] bf16.
at::Tensor rope_attend(const at::Tensor& qkv_in, const at::Tensor& rope_in, at::Tensor cache_k,
                                 at::Tensor cache_v, int64_t layer, int64_t past, int64_t n_heads,
                                 const c10::optional<at::Tensor>& parents, bool tiles) {
  const FlushDenormals flush;
  const at::Tensor qkv = qkv_in.contiguous(), rope = rope_in.contiguous();
  const at::Tensor q = rotate_into_cache(qkv, rope, cache_k, cache_v, layer, past, n_heads);
  const int64_t T = q.size(0), H = n_heads, D = q.size(2);
  at::Tensor out = at::empty({T, H * D}, qkv.options());
  at::Tensor holder;
  attend(q.data_ptr<at::BFloat16>(), H * D, T, H, D, cache_k.data_ptr<at::BFloat16>() + layer * cache_k.stride(0),
         cache_v.data_ptr<at::BFloat16>() + layer * cache_v.stride(0), cache_k.stride(2), past, H / cache_k.size(2),
         out.data_ptr<at::BFloat16>(), tree_parents(parents, T, holder), tiles);
  return out;
}

// rope_attend for several sequences (rows[s] rows each, one after another in qkv and rope),
// each with its own cache; their attention in one parallel region (attend_many). Returns
// [rows, H * D] bf16: each row bitwise what rope_attend gives it for its sequence alone.
at::Tensor rope_attend_many(const at::Tensor& qkv_in, const at::Tensor& rope_in, at::TensorList caches_k,
                                      at::TensorList caches_v, int64_t layer, at::IntArrayRef pasts, at::IntArrayRef rows,
                                      const c10::List<c10::optional<at::Tensor>>& parents, int64_t n_heads, bool tiles) {
  const FlushDenormals flush;
  const at::Tensor qkv = qkv_in.contiguous(), rope = rope_in.contiguous();
  const int64_t H = n_heads, D = caches_k[0].size(4), group = H / caches_k[0].size(2);
  at::Tensor out = at::empty({qkv.size(0), H * D}, qkv.options());
  std::vector<at::Tensor> qs;  // (kept alive while attend_many reads them)
  std::vector<SeqAttention> seqs;
  int64_t lo = 0;
  for (size_t s = 0; s < rows.size(); ++s) {
    at::Tensor ck = caches_k[s], cv = caches_v[s];
    TORCH_CHECK(ck.size(4) == D && ck.size(2) * group == H, "specdecode rope_attend_many: every cache must have the same heads");
    qs.push_back(rotate_into_cache(qkv.narrow(0, lo, rows[s]), rope.narrow(0, lo, rows[s]), ck, cv, layer, pasts[s], H));
    at::Tensor holder;
    const int64_t* p = tree_parents(parents.get(s), rows[s], holder);
    seqs.push_back(SeqAttention{qs.back().data_ptr<at::BFloat16>(), H * D, rows[s], ck.data_ptr<at::BFloat16>() + layer * ck.stride(0),
                                cv.data_ptr<at::BFloat16>() + layer * cv.stride(0), ck.stride(2), pasts[s],
                                out.data_ptr<at::BFloat16>() + lo * H * D, tree_paths(p, rows[s])});
    lo += rows[s];
  }
  attend_many(seqs, H, D, group, tiles);
  return out;
}

// gate_up [T, 2F] bf16 = [gate | up] -> bf16(bf16(silu(gate)) * up), what F.silu(gate) * up
// gives in bf16 (silu in fp32 with a sigmoid from exp(-|g|) <= 1, rounded, then the product).
// Vectors [begin, end) of the output (16 values each; F / 16 a row).
SD_TARGET void silu_mul_vectors(const at::BFloat16* src, at::BFloat16* yp, int64_t F, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t v = begin; v < end; ++v) {
    const int64_t t = v / (F / 16), i = v % (F / 16) * 16;
    const __m512 g = bf16x16_to_ps(src + t * 2 * F + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_and_ps(g, absmask)));  // exp(-|g|)
    const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, e, inv);  // g < 0: e / (1 + e)
    const __m512 silu = _mm512_mul_ps(g, sig);
    // round silu to bf16 (as F.silu's bf16 output) before the product
    const __m512 silu16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(silu)), 16));
    store_bf16x16(yp + t * F + i, _mm512_mul_ps(silu16, bf16x16_to_ps(src + t * 2 * F + F + i)));
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gu = gate_up_in.contiguous();
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kBFloat16 && gu.size(1) % 32 == 0,
              "specdecode silu_mul: gate_up must be [T, 2F] bf16, F a multiple of 16");
  const int64_t T = gu.size(0), F = gu.size(1) / 2;
  at::Tensor y = at::empty({T, F}, gu.options());
  const auto* src = gu.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  // over the threads from 192 vectors on (a forward of 9 rows spent 0.25 ms here on one thread:
  // the division alone is ~16 cycles a vector); one row of the embedded model's 1536 stays on one
  const auto vectors = glue_avx512() ? silu_mul_vectors : silu_mul_vectors_avx2;
  at::parallel_for(0, T * F / 16, 192, [&](int64_t begin, int64_t end) { vectors(src, yp, F, begin, end); });
  return y;
}

// x [T, n] fp32 (the residual stream) += y [T, n] bf16 (a layer's output), in place: what
// x.add_(y) gives, without ATen's conversion copy of y.
SD_TARGET void add_residual_rows(float* xp, const at::BFloat16* yp, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(xp + i, _mm512_add_ps(_mm512_loadu_ps(xp + i), bf16x16_to_ps(yp + i)));
}

void add_residual(at::Tensor x, const at::Tensor& y_in) {
  const at::Tensor y = y_in.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && y.scalar_type() == at::kBFloat16 &&
                  x.sizes() == y.sizes() && x.numel() % 16 == 0,
              "specdecode add_residual: x [T, n] fp32 contiguous, y [T, n] bf16, n a multiple of 16");
  (glue_avx512() ? add_residual_rows : add_residual_avx2)(x.data_ptr<float>(), y.data_ptr<at::BFloat16>(), x.numel());
}


// ---------------------------------------------------------------------------------------------
// GGUF Q4 nibble bytes [N, G, 16] (byte j: input j low, j + 16 high) -> our int4 tiles: the bytes
// quant.py's pack_q4_nibbles gives (its docstring describes both layouts), moved as words
// without unpacking a code. Why here: its torch byte shuffles were a fifth of a load's time.
// vnni: [N/16, G, 4, 64] as words [N/16, G, 4, 16]: word 2p, 2p+1 (p < 2) of a row's 16 bytes give
// quad register p (low nibbles) and p + 2 (high nibbles), lane = the row within its tile.
// bf16: [N/16, G, 8, 32] as half-words [N/16, G, 8, 16]: half-words 2p, 2p+1 (p < 4) of a row give
// pair registers p (low nibbles) and 4 + p (high nibbles).
at::Tensor pack_q4_nibbles(const at::Tensor& qs_in, bool vnni) {
  TORCH_CHECK(qs_in.scalar_type() == at::kByte && qs_in.dim() == 3 && qs_in.size(2) == 16 && qs_in.size(0) % kTile == 0,
              "specdecode pack_q4_nibbles: nibbles must be uint8 [N, G, 16], N a multiple of 16");
  const at::Tensor qs = qs_in.contiguous();
  const int64_t tiles = qs.size(0) / kTile, G = qs.size(1);
  at::Tensor out = vnni ? at::empty({tiles, G, 4, 64}, qs.options()) : at::empty({tiles, G, 8, 32}, qs.options());
  const uint8_t* src = qs.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* tile = dst + (t * G + g) * 256;
        for (int i = 0; i < kTile; ++i) {
          const uint8_t* row = src + ((t * kTile + i) * G + g) * 16;
          if (vnni) {
            uint32_t w[4];
            std::memcpy(w, row, sizeof(w));
            for (int p = 0; p < 2; ++p) {
              const uint32_t a = w[2 * p], b = w[2 * p + 1];
              const uint32_t low = (a & 0x0F0F0F0Fu) | ((b & 0x0F0F0F0Fu) << 4), high = ((a >> 4) & 0x0F0F0F0Fu) | (b & 0xF0F0F0F0u);
              std::memcpy(tile + (p * kTile + i) * 4, &low, 4);
              std::memcpy(tile + ((p + 2) * kTile + i) * 4, &high, 4);
            }
          } else {
            uint16_t h[8];
            std::memcpy(h, row, sizeof(h));
            for (int p = 0; p < 4; ++p) {
              const uint32_t a = h[2 * p], b = h[2 * p + 1];
              const uint16_t low = (uint16_t)((a & 0x0F0Fu) | ((b << 4) & 0xF0F0u)), high = (uint16_t)(((a >> 4) & 0x0F0Fu) | (b & 0xF0F0u));
              std::memcpy(tile + (p * kTile + i) * 2, &low, 2);
              std::memcpy(tile + ((p + 4) * kTile + i) * 2, &high, 2);
            }
          }
        }
      }
  });
  return out;
}


// int8 codes [N, K] -> our int8 tiles, the bytes quant.py's quad_int8 (vnni: [N/16, G, 8, 64], a
// register of 4 inputs x 16 outputs) or tile_int8 ([N/16, G, 16, 32], 2 inputs x 16 outputs)
// gives: register p of tile t, group g holds row i's inputs 32g + width p .. + width - 1 at bytes
// width i ... Why here: those torch permutes (and the block sums below) were most of packing a
// requantized output head.
at::Tensor pack_int8(const at::Tensor& q_in, bool vnni) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2 && q_in.size(0) % kTile == 0 && q_in.size(1) % kGroup == 0,
              "specdecode pack_int8: codes must be int8 [N, K], N a multiple of 16, K of 32");
  const at::Tensor q = q_in.contiguous();
  const int64_t tiles = q.size(0) / kTile, K = q.size(1), G = K / kGroup, width = vnni ? 4 : 2;
  at::Tensor out = at::empty({tiles, G, kGroup / width, kTile * width}, q.options());
  const int8_t* src = q.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t g = 0; g < G; ++g) {
        int8_t* tile = dst + (t * G + g) * kGroup * kTile;
        for (int i = 0; i < kTile; ++i) {
          const int8_t* row = src + (t * kTile + i) * K + g * kGroup;
          for (int p = 0; p < kGroup / width; ++p) std::memcpy(tile + (p * kTile + i) * width, row + p * width, width);
        }
      }
  });
  return out;
}

// int8 codes [N, K] -> int16 [N, K/32]: each group's sum (quant.py's _block_sums, exact).
at::Tensor int8_block_sums(const at::Tensor& q_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2 && q_in.size(1) % kGroup == 0,
              "specdecode int8_block_sums: codes must be int8 [N, K], K a multiple of 32");
  const at::Tensor q = q_in.contiguous();
  const int64_t N = q.size(0), G = q.size(1) / kGroup;
  at::Tensor out = at::empty({N, G}, q.options().dtype(at::kShort));
  const int8_t* src = q.data_ptr<int8_t>();
  int16_t* dst = out.data_ptr<int16_t>();
  at::parallel_for(0, N * G, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int sum = 0;
      for (int i = 0; i < kGroup; ++i) sum += src[b * kGroup + i];
      dst[b] = (int16_t)sum;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// A forward's decoder layers in ONE call (the eager path of LlamaModel._step and forward_batch).
// Per layer: rms_norm -> qkv -> rope_attend (each sequence of a batch with its own cache, its
// rows and its tree) -> o -> residual, rms_norm -> gate_up -> silu_mul -> down -> residual: the
// functions the Python loop called one op at a time, in the same order on the same tensors, so
// the results are bitwise the same. Why: a custom op called from Python costs ~3 us of dispatch
// (an ATen op ~1 us), and a 30-layer step made ~300 such calls (embedded int4, T=1: 4.77 ms op by
// op, 4.35 ms in one call);
// and one call takes the GIL once a forward instead of ~300 times (a batching server's request
// threads run their Python meanwhile).

// Which linear a stack runs (specdecode/models/quant.py: _TiledStack.fused_kind); its weights
// come as three tensors: packed codes, d, and m (int4) / wsum (int8 on avx512-vnni) / unused.
enum LinearKind : int64_t {
  kInt4Bf16 = 0, kInt8Bf16 = 1, kInt4Vnni = 2, kInt8Vnni = 3, kInt4Amx = 4, kInt8Amx = 5, kInt4AmxInt8 = 6, kInt8AmxInt8 = 7,
  kInt4Avx2 = 8, kInt8Avx2 = 9
};

at::Tensor run_linear(int64_t kind, const at::Tensor& x, const at::Tensor* w, const c10::optional<at::Tensor>& bias) {
  at::Tensor y;
  switch (kind) {
    case kInt4Bf16: y = int4_linear(x, w[0], w[1], w[2]); break;
    case kInt8Bf16: y = int8_linear(x, w[0], w[1]); break;
    case kInt4Vnni: y = int4_linear_vnni(x, w[0], w[1], w[2]); break;
    case kInt8Vnni: y = int8_linear_vnni(x, w[0], w[1], w[2]); break;
    case kInt4Amx: y = int4_linear_amx(x, w[0], w[1], w[2]); break;
    case kInt8Amx: y = int8_linear_amx(x, w[0], w[1]); break;
    case kInt4AmxInt8: y = qlinear_vnni<true>(x, w[0], w[1], w[2], amx_int8_rows(true)); break;
    case kInt8AmxInt8: y = qlinear_vnni<false>(x, w[0], w[1], w[2], amx_int8_rows(false)); break;
    case kInt4Avx2: y = int4_linear_avx2(x, w[0], w[1], w[2]); break;
    case kInt8Avx2: y = int8_linear_avx2(x, w[0], w[1]); break;
    default: TORCH_CHECK(false, "specdecode decoder_layers: unknown linear kind ", kind);
  }
  return bias.has_value() ? y + *bias : y;  // what the stack's `y + b` gives (ATen's bf16 add)
}

// ---------------------------------------------------------------------------------------------
// decoder_layers as ONE parallel region (the "team" path). Op by op, every linear, attention
// and silu opens its own parallel region (at::parallel_for: ~2.7 us to fork and join on 2
// threads, ~7 regions a layer), and the glue between them (norms, RoPE, the rows' int8
// quantization, residuals, biases) runs on the calling thread while the others wait: in a 9-row
// step of the embedded model on Zen 4 the second thread idled a third of the time. Here the
// threads enter one region for all layers and meet at a barrier between phases; every phase
// splits its work over them (rows, groups of 32 inputs, tiles, attention tasks). Each value is
// computed by the same function on the same inputs as op by op, so the results are bitwise
// those (tests/test_kernels.py compares the two). Taken for the avx512-vnni and avx2 linears
// with the AVX-512 or avx2.cpp glue (not AMX tiles: their tile state is set up per region, and
// their attention is its own); every other case runs op by op.

// One linear of a layer as the team runs it (the vnni or avx2 kernels' weights, checked before the region).
struct TeamLinear {
  bool int4, avx2;  // avx2: avx2.cpp's kernel (else avx512-vnni's)
  const uint8_t* w;
  const at::Half* d;
  const at::Half* m;
  const int16_t* ws;
  const at::BFloat16* bias;
  int64_t K, G, N, tiles;

  template <bool INT4>
  VnniCall<INT4> call(const int8_t* q, const float* dx, const float* sq, int64_t T, at::BFloat16* y) const {
    return VnniCall<INT4>{w, K * kTile / (INT4 ? 2 : 1), d, m, ws, q, dx, sq, T, K, G, N, y, bias};
  }
  int64_t step(int64_t T, int64_t threads) const {
    if (avx2) return linear_step_avx2(T, tiles, threads);
    return int4 ? VnniCall<true>::step(T, tiles, threads) : VnniCall<false>::step(T, tiles, threads);
  }
  void run(const int8_t* q, const float* dx, const float* sq, int64_t T, at::BFloat16* y, int64_t begin, int64_t end) const {
    if (avx2) {
      linear_tiles_avx2(int4, w, d, m, q, dx, sq, T, K, N, y, begin, end);
      if (bias) add_bias(y, N, T, bias, begin * kTile, end * kTile);
    } else if (int4) {
      call<true>(q, dx, sq, T, y).run(begin, end);
    } else {
      call<false>(q, dx, sq, T, y).run(begin, end);
    }
  }
};

// The linear of `kind` with weights w[0..2] and an optional bias for K inputs into `out`, or
// false where the team cannot run it (another kernel, another layout).
bool team_linear(int64_t kind, const at::Tensor* w, const c10::optional<at::Tensor>& bias, int64_t K, TeamLinear& out) {
  if (kind != kInt4Vnni && kind != kInt8Vnni && kind != kInt4Avx2 && kind != kInt8Avx2) return false;
  const bool int4 = kind == kInt4Vnni || kind == kInt4Avx2, avx2 = kind == kInt4Avx2 || kind == kInt8Avx2;
  const at::Tensor& packed = w[0];
  const at::Tensor& d = w[1];
  const at::Tensor& aux = w[2];
  if (!(d.scalar_type() == at::kHalf && d.dim() == 3 && d.size(2) == kTile && d.is_contiguous() && d.size(1) * kGroup == K))
    return false;
  const int64_t N = d.size(0) * kTile;
  if (!(packed.is_contiguous() && packed.numel() == N * K / (int4 ? 2 : 1))) return false;
  if (!(avx2 && !int4) &&  // (avx2's int8 takes no code sums)
      !(aux.sizes() == d.sizes() && aux.is_contiguous() && aux.scalar_type() == (int4 ? at::kHalf : at::kShort)))
    return false;
  const at::BFloat16* b = nullptr;
  if (bias.has_value()) {
    if (!(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N)) return false;
    b = bias->data_ptr<at::BFloat16>();
  }
  out = TeamLinear{int4, avx2, (const uint8_t*)packed.data_ptr(), d.data_ptr<at::Half>(),
                   int4 ? aux.data_ptr<at::Half>() : nullptr, int4 || avx2 ? nullptr : aux.data_ptr<int16_t>(), b,
                   K, K / kGroup, N, d.size(0)};
  return true;
}

// One sequence of the batch as the team attends it.
struct TeamSeq {
  int64_t lo, T, past;     // its first row, its rows, its cached slots
  at::BFloat16* k;         // its caches (layer 0): [layers, 1, Hkv, L, D]
  at::BFloat16* v;
  int64_t ls, hs;          // layer and head strides of the caches
  std::vector<std::vector<int64_t>> paths;  // a tree's paths (empty: a chain)
  int64_t blocks, width;   // key blocks of 16, a score row's width
  int64_t value_rows, tasks_per_head;  // rows per values task (attend_block's rule), tasks per KV head
  float* scores;           // [H, T, width]
};

// SPECDECODE_TEAM=0: op by op (for A/B timings; read at every call, so one process can alternate)
bool team_disabled() {
  const char* v = std::getenv("SPECDECODE_TEAM");
  return v != nullptr && v[0] == '0';
}

std::atomic<int64_t> team_calls{0};  // forwards the team ran (tests check that it runs where it should)
int64_t decoder_team_calls() { return team_calls.load(); }

// Tests only: the glue ops run avx2.cpp's code on this AVX-512 CPU too (common.h); returns the old setting.
bool force_avx2_glue(bool force) { return avx2_glue_forced().exchange(force); }

// decoder_layers on the team, or false (nothing done) where a linear, the attention path or a
// tensor is not what the team takes.
bool decoder_layers_team(at::Tensor& x, const at::Tensor& rope_in, at::TensorList caches_k, at::TensorList caches_v,
                         at::IntArrayRef pasts, at::IntArrayRef rows, const c10::List<c10::optional<at::Tensor>>& parents,
                         int64_t H, bool tiles, double eps, at::IntArrayRef layers, at::IntArrayRef kinds,
                         at::TensorList norms, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases) {
  if (team_disabled() || layers.empty() || x.size(0) == 0) return false;
  const at::Tensor& ck0 = caches_k[0];
  if (ck0.dim() != 5) return false;
  const int64_t Hkv = ck0.size(2), D = ck0.size(4), hidden = x.size(1), R = x.size(0);
  if (tiles_fit(tiles, D) || D % 16 != 0 || D > 256 || Hkv <= 0 || H % Hkv != 0 || hidden % kGroup != 0) return false;
  const int64_t group = H / Hkv, HD = H * D, W = (H + 2 * Hkv) * D;
  const at::Tensor rope = rope_in.contiguous();
  if (!(rope.scalar_type() == at::kFloat && rope.numel() == R * D)) return false;
  // the linears of every layer run, checked before any work
  std::vector<TeamLinear> lin(layers.size() * 4);
  int64_t F = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t li = layers[i];
    const at::Tensor* w = weights.data() + li * 12;
    if (!team_linear(kinds[0], w, biases.get(li * 4), hidden, lin[4 * i]) || lin[4 * i].N != W) return false;
    if (!team_linear(kinds[1], w + 3, biases.get(li * 4 + 1), HD, lin[4 * i + 1]) || lin[4 * i + 1].N != hidden) return false;
    if (!team_linear(kinds[2], w + 6, biases.get(li * 4 + 2), hidden, lin[4 * i + 2])) return false;
    F = lin[4 * i + 2].N / 2;
    if (F % kGroup != 0 || !team_linear(kinds[3], w + 9, biases.get(li * 4 + 3), F, lin[4 * i + 3]) ||
        lin[4 * i + 3].N != hidden)
      return false;
  }
  std::vector<at::Tensor> norm_w;  // fp32 copies (what rms_norm_bf16 converts each call)
  for (const at::Tensor& n : norms) {
    norm_w.push_back(n.to(at::kFloat).contiguous());
    if (norm_w.back().numel() != hidden) return false;
  }
  // the sequences: their caches as rotate_into_cache checks them
  const int64_t threads = at::get_num_threads();
  std::vector<TeamSeq> seqs(rows.size());
  std::vector<int64_t> seq_of(R);
  std::vector<at::Tensor> holders(rows.size());
  int64_t lo = 0, score_floats = 0;
  for (size_t s = 0; s < rows.size(); ++s) {
    const at::Tensor &ck = caches_k[s], &cv = caches_v[s];
    TORCH_CHECK(ck.dim() == 5 && ck.sizes() == cv.sizes() && ck.scalar_type() == at::kBFloat16 &&
                    cv.scalar_type() == at::kBFloat16 && ck.strides() == cv.strides(),
                "specdecode rope_attend: caches must be [layers, 1, Hkv, L, D] bf16 alike");
    TORCH_CHECK(ck.size(2) == Hkv && ck.size(4) == D, "specdecode rope_attend_many: every cache must have the same heads");
    const int64_t T = rows[s], past = pasts[s];
    TORCH_CHECK(ck.stride(4) == 1 && ck.stride(3) == D && past >= 0 && past + T <= ck.size(3),
                "specdecode rope_attend: bad cache layout, layer or length");
    for (const int64_t li : layers) TORCH_CHECK(li < ck.size(0), "specdecode rope_attend: bad cache layout, layer or length");
    TeamSeq& q = seqs[s];
    q.lo = lo, q.T = T, q.past = past;
    q.k = ck.data_ptr<at::BFloat16>(), q.v = cv.data_ptr<at::BFloat16>(), q.ls = ck.stride(0), q.hs = ck.stride(2);
    q.paths = tree_paths(tree_parents(parents.get(s), T, holders[s]), T);
    q.blocks = (past + T + 15) / 16, q.width = q.blocks * 16;
    const int64_t per_head = T * group;
    q.value_rows = value_task_rows(D, per_head, Hkv * (int64_t)pasts.size(), threads);
    q.tasks_per_head = (per_head + q.value_rows - 1) / q.value_rows;
    score_floats += H * T * q.width;
    for (int64_t t = 0; t < T; ++t) seq_of[lo + t] = (int64_t)s;
    lo += T;
  }
  // the tasks of the two attention phases, sequence after sequence
  std::vector<int64_t> score_first(seqs.size() + 1, 0), value_first(seqs.size() + 1, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    score_first[s + 1] = score_first[s] + Hkv * seqs[s].blocks;
    value_first[s + 1] = value_first[s] + Hkv * seqs[s].tasks_per_head;
  }
  // Attention tasks in runs of consecutive ones (a run reads one stretch of a head's cache: the
  // prefetchers follow it), about 4 runs a thread: one task a take made the threads bounce the
  // counter's cache line ~20k times a batched forward (12 sequences: attention 1.5x slower).
  const int64_t score_step = std::max<int64_t>(1, score_first.back() / (4 * threads));
  const int64_t value_step = std::max<int64_t>(1, value_first.back() / (4 * threads));
  // work buffers (uninitialised: every value is written before it is read)
  const auto bf16 = x.options().dtype(at::kBFloat16);
  const int64_t Kmax = std::max({hidden, HD, F});
  at::Tensor normed = at::empty({R, hidden}, bf16), qkv = at::empty({R, W}, bf16), qrot = at::empty({R, HD}, bf16),
             att = at::empty({R, HD}, bf16), out = at::empty({R, hidden}, bf16), gu = at::empty({R, 2 * F}, bf16),
             act = at::empty({R, F}, bf16), codes = at::empty({R * Kmax}, x.options().dtype(at::kChar)),
             scales = at::empty({2 * R * (Kmax / kGroup)}, x.options()), scores = at::empty({score_floats}, x.options());
  float* sp = scores.data_ptr<float>();
  for (TeamSeq& q : seqs) q.scores = sp, sp += H * q.T * q.width;
  float* xp = x.data_ptr<float>();
  const float* rp = rope.data_ptr<float>();
  auto *np = normed.data_ptr<at::BFloat16>(), *qkvp = qkv.data_ptr<at::BFloat16>(), *qp = qrot.data_ptr<at::BFloat16>(),
       *ap = att.data_ptr<at::BFloat16>(), *op = out.data_ptr<at::BFloat16>(), *gp = gu.data_ptr<at::BFloat16>(),
       *actp = act.data_ptr<at::BFloat16>();
  int8_t* cq = codes.data_ptr<int8_t>();
  float* dx = scales.data_ptr<float>();
  float* sq = dx + R * (Kmax / kGroup);
  // a fresh counter for each phase whose tasks the threads take as they finish
  constexpr int kDynamic = 2;  // the attention's scores and values
  std::unique_ptr<std::atomic<int64_t>[]> counters(new std::atomic<int64_t>[layers.size() * kDynamic]);
  for (size_t i = 0; i < layers.size() * kDynamic; ++i) counters[i].store(0, std::memory_order_relaxed);
  // the linears: each thread through its own share of the tiles first (common.h take_shares)
  std::unique_ptr<ShareCounter[]> share_counters(new ShareCounter[lin.size() * threads]);
  for (size_t j = 0; j < lin.size(); ++j)
    for (int u = 0; u < threads; ++u)
      share_counters[j * threads + u].next.store(share_start(lin[j].tiles, lin[j].step(R, threads), (int)threads, u),
                                                 std::memory_order_relaxed);
  auto share_of = [&](size_t i, int j) { return &share_counters[(4 * i + j) * threads]; };
  // the glue's code: AVX-512 (qmatmul.cpp) or avx2.cpp's, as the op-by-op path picks it
  const bool wide = glue_avx512();
  const auto norm_fn = wide ? rms_norm_rows : rms_norm_rows_avx2;
  const auto rotate_fn = wide ? rotate_row : rotate_row_avx2;
  const auto silu_fn = wide ? silu_mul_vectors : silu_mul_vectors_avx2;
  const auto residual_fn = wide ? add_residual_rows : add_residual_avx2;
  const auto quantize_fn = wide ? quantize_groups : quantize_groups_avx2;  // (the same codes)
  // avx2.cpp's attention: one task per row and head, in one phase (attend_many_avx2's)
  std::vector<SeqAttention> avx2_seqs;
  std::vector<int64_t> avx2_first;
  int64_t avx2_step = 1;
  if (!wide) {
    for (const TeamSeq& q : seqs)
      avx2_seqs.push_back(SeqAttention{qp + q.lo * HD, HD, q.T, nullptr, nullptr, q.hs, q.past, ap + q.lo * HD, q.paths});
    avx2_first = attend_task_starts_avx2(avx2_seqs, H);
    avx2_step = attend_step_avx2(H);
  }
  const float scale = 1.0f / std::sqrt((float)D);
  const float feps = (float)eps;
  const int64_t Gh = hidden / kGroup;
  team_calls.fetch_add(1);

#pragma omp parallel num_threads(threads)
  {
    const FlushDenormals flush;
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    auto split = [&](int64_t n, const auto& fn) {  // a fixed share each (cheap, equal work)
      const int64_t a = n * tid / nt, b = n * (tid + 1) / nt;
      if (a < b) fn(a, b);
    };
    auto take = [&](std::atomic<int64_t>& next, int64_t n, int64_t step, const auto& fn) {  // as they finish
      for (int64_t b = next.fetch_add(step); b < n; b = next.fetch_add(step)) fn(b, std::min(n, b + step));
    };
    auto linear = [&](const TeamLinear& L, at::BFloat16* y, ShareCounter* shares) {
      take_shares(shares, (int)threads, tid, L.tiles, L.step(R, threads), [&](int64_t b, int64_t e) { L.run(cq, dx, sq, R, y, b, e); });
    };
    // rows [a, b) of x: normed by norm weight w, quantized for the next linear
    auto norm_rows = [&](const float* w, int64_t a, int64_t b) {
      norm_fn(xp + a * hidden, w, np + a * hidden, b - a, hidden, feps);
      quantize_fn(np, a * Gh, b * Gh, cq, dx, sq);
    };
    split(R, [&](int64_t a, int64_t b) { norm_rows(norm_w[2 * layers[0]].data_ptr<float>(), a, b); });
#pragma omp barrier
    for (size_t i = 0; i < layers.size(); ++i) {
      const int64_t li = layers[i];
      const TeamLinear* L = &lin[4 * i];
      std::atomic<int64_t>* next = &counters[i * kDynamic];
      linear(L[0], qkvp, share_of(i, 0));
#pragma omp barrier
      // RoPE: q heads into qrot, k heads and v into the cache layer (rotate_into_cache's work)
      if (!wide && tid == 0)  // (read by the attention after the barrier below)
        for (size_t s = 0; s < seqs.size(); ++s)
          avx2_seqs[s].k = seqs[s].k + li * seqs[s].ls, avx2_seqs[s].v = seqs[s].v + li * seqs[s].ls;
      split(R * (H + 2 * Hkv), [&](int64_t a, int64_t b) {
        for (int64_t j = a; j < b; ++j) {
          const int64_t r = j / (H + 2 * Hkv), h = j % (H + 2 * Hkv);
          const TeamSeq& q = seqs[seq_of[r]];
          rotate_head(rotate_fn, qkvp + r * W, rp + r * D, h, H, Hkv, D, qp + r * HD, q.k + li * q.ls, q.v + li * q.ls,
                      q.hs, q.past + r - q.lo);
        }
      });
#pragma omp barrier
      if (!wide) {  // avx2.cpp's attention: each row x head on its own
        take(next[0], avx2_first.back(), avx2_step, [&](int64_t a, int64_t b) {
          attend_tasks_avx2(avx2_seqs, avx2_first, H, D, group, a, b);
        });
      } else {
        take(next[0], score_first.back(), score_step, [&](int64_t a, int64_t b) {  // attend_block's first pass
          for (int64_t j = a; j < b; ++j) {
            const size_t s = std::upper_bound(score_first.begin(), score_first.end(), j) - score_first.begin() - 1;
            const TeamSeq& q = seqs[s];
            const int64_t task = j - score_first[s], kv = task / q.blocks;
            score_block(qp + q.lo * HD, HD, q.T, D, q.k + li * q.ls + kv * q.hs, q.past + q.T, q.past, kv, group,
                        (task % q.blocks) * 16, scale, q.scores, q.width);
          }
        });
#pragma omp barrier
        take(next[1], value_first.back(), value_step, [&](int64_t a, int64_t b) {  // and its second
          for (int64_t j = a; j < b; ++j) {
            const size_t s = std::upper_bound(value_first.begin(), value_first.end(), j) - value_first.begin() - 1;
            const TeamSeq& q = seqs[s];
            const int64_t task = j - value_first[s], kv = task / q.tasks_per_head;
            const int64_t first = (task % q.tasks_per_head) * q.value_rows;
            head_values(q.T, H, D, q.v + li * q.ls + kv * q.hs, q.past, group, ap + q.lo * HD, q.paths, q.scores, q.width,
                        kv, first, (int)std::min(q.value_rows, q.T * group - first));
          }
        });
      }
#pragma omp barrier
      split(R * HD / kGroup, [&](int64_t a, int64_t b) { quantize_fn(ap, a, b, cq, dx, sq); });
#pragma omp barrier
      linear(L[1], op, share_of(i, 1));
#pragma omp barrier
      split(R, [&](int64_t a, int64_t b) {
        residual_fn(xp + a * hidden, op + a * hidden, (b - a) * hidden);
        norm_rows(norm_w[2 * li + 1].data_ptr<float>(), a, b);
      });
#pragma omp barrier
      linear(L[2], gp, share_of(i, 2));
#pragma omp barrier
      split(R * F / kGroup, [&](int64_t a, int64_t b) {  // silu(gate) * up, group by group
        silu_fn(gp, actp, F, 2 * a, 2 * b);
        quantize_fn(actp, a, b, cq, dx, sq);
      });
#pragma omp barrier
      linear(L[3], op, share_of(i, 3));
#pragma omp barrier
      split(R, [&](int64_t a, int64_t b) {
        residual_fn(xp + a * hidden, op + a * hidden, (b - a) * hidden);
        if (i + 1 < layers.size()) norm_rows(norm_w[2 * layers[i + 1]].data_ptr<float>(), a, b);
      });
#pragma omp barrier
    }
  }
  return true;
}

// x [rows, hidden] fp32, the residual stream of every sequence's new rows one after another
// (rows[s] of sequence s), updated in place; rope [rows, D/2, 2]; sequence s attends with
// caches_k/v[s] after pasts[s] cached slots (its rows a tree where parents[s] is given).
// layers: the model's layer indices to run, in order; kinds: the four stacks' LinearKind (qkv,
// o, gate_up, down); norms [2 per layer of the model] (input, post-attention); weights [3 per
// stack per layer: (layer * 4 + stack) * 3 + j]; biases [one per stack per layer, or None].
void decoder_layers(at::Tensor x, const at::Tensor& rope, at::TensorList caches_k, at::TensorList caches_v,
                    at::IntArrayRef pasts, at::IntArrayRef rows, const c10::List<c10::optional<at::Tensor>>& parents,
                    int64_t n_heads, bool tiles, double eps, at::IntArrayRef layers, at::IntArrayRef kinds,
                    at::TensorList norms, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases) {
  const int64_t seqs = (int64_t)rows.size();
  TORCH_CHECK(seqs >= 1 && (int64_t)caches_k.size() == seqs && (int64_t)caches_v.size() == seqs &&
                  (int64_t)pasts.size() == seqs && (int64_t)parents.size() == seqs,
              "specdecode decoder_layers: one cache pair, past, row count and parents entry per sequence");
  TORCH_CHECK(kinds.size() == 4 && weights.size() == norms.size() * 6 && biases.size() == norms.size() * 2,
              "specdecode decoder_layers: 4 kinds, 2 norms, 12 weight tensors and 4 biases per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "specdecode decoder_layers: x must be [rows, hidden] fp32");
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  TORCH_CHECK(total == x.size(0), "specdecode decoder_layers: the sequences' rows must add up to x's");
  const int64_t n_layers = (int64_t)norms.size() / 2;
  for (const int64_t li : layers) TORCH_CHECK(li >= 0 && li < n_layers, "specdecode decoder_layers: layer ", li, " out of range");
  if (decoder_layers_team(x, rope, caches_k, caches_v, pasts, rows, parents, n_heads, tiles, eps, layers, kinds, norms,
                          weights, biases))
    return;
  for (const int64_t li : layers) {
    const at::Tensor* w = weights.data() + li * 12;
    const at::Tensor qkv = run_linear(kinds[0], rms_norm_bf16(x, norms[2 * li], eps), w, biases.get(li * 4));
    const at::Tensor attended = seqs == 1
        ? rope_attend(qkv, rope, caches_k[0], caches_v[0], li, pasts[0], n_heads, parents.get(0), tiles)
        : rope_attend_many(qkv, rope, caches_k, caches_v, li, pasts, rows, parents, n_heads, tiles);
    add_residual(x, run_linear(kinds[1], attended, w + 3, biases.get(li * 4 + 1)));
    const at::Tensor gate_up = run_linear(kinds[2], rms_norm_bf16(x, norms[2 * li + 1], eps), w + 6, biases.get(li * 4 + 2));
    add_residual(x, run_linear(kinds[3], silu_mul(gate_up), w + 9, biases.get(li * 4 + 3)));
  }
}

// The index of each row's maximum of float32 scores [..., V] -> int64 [...]: what ATen's
// `max(-1).indices` gives (the first maximum on ties, -0 and +0 alike; a row holding NaN: its
// first NaN), without its per-call cost: greedy decoding asks this of every scored row (a 49k
// vocabulary: ~90 us for ATen's reduction right after a forward, a few here). Two passes, both
// vectorized: the maximum and whether a NaN is there, then the first index holding it.
__attribute__((target("avx2"))) int64_t argmax_row(const float* p, int64_t V) {
  int64_t i = 0;
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    best = _mm256_max_ps(best, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float m = lanes[0];
  for (int j = 1; j < 8; ++j) m = std::max(m, lanes[j]);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < V; ++j) {
    has_nan = has_nan || std::isnan(p[j]);
    if (p[j] > m) m = p[j];
  }
  if (has_nan) {
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(p[j])) return j;
  }
  const __m256 target = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= V; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + i), target, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(mask);
  }
  for (; i < V; ++i)
    if (p[i] == m) return i;
  return 0;  // (V == 0 is refused by the caller)
}

at::Tensor argmax_rows(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() >= 1 && scores.scalar_type() == at::kFloat && scores.size(-1) > 0,
              "specdecode argmax_rows: scores must be float32 [..., V], V > 0");
  const at::Tensor x = scores.contiguous();
  const int64_t V = x.size(-1), rows = x.numel() / V;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) o[r] = argmax_row(p + r * V, V);
  return out;
}

// A greedy draft's token and how sure the drafter was of it: (argmax of one row of float32
// scores, max of softmax(scores)), i.e. argmax_rows and drafters/base.py's draft_probability
// (the same ATen softmax and max) in one call returning plain numbers.
std::tuple<int64_t, double> greedy_pick(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat && scores.size(0) > 0,
              "specdecode greedy_pick: scores must be one float32 row [V], V > 0");
  const at::Tensor x = scores.contiguous();
  const int64_t index = argmax_row(x.data_ptr<float>(), x.size(0));
  return {index, (double)at::softmax(x, -1).max().item<float>()};
}

// An EAGLE head's step for T rows in one call (drafters/eagle.py: EagleHead.forward on our
// kernels): x = fc(rms_norm(feature) ⊕ rms_norm(embedding)) (+ its bias), then the head's one
// decoder layer over x as decoder_layers runs it; returns x [T, hidden] fp32. The same functions
// on the same inputs as the op-by-op path (the norms' bf16 rows, fc's kernel and its `y + b`,
// the bf16 -> fp32 widening), so the result is bitwise that path's; one dispatch instead of
// ~8 (each ~10 us right after a target forward has left the caches cold).
at::Tensor eagle_layer(const at::Tensor& features, const at::Tensor& embeddings, const at::Tensor& feature_norm,
                       const at::Tensor& embed_norm, double norm_eps, int64_t fc_kind, at::TensorList fc_weights,
                       const c10::optional<at::Tensor>& fc_bias, const at::Tensor& rope, at::Tensor cache_k,
                       at::Tensor cache_v, int64_t past, const c10::optional<at::Tensor>& parents, int64_t n_heads,
                       bool tiles, double eps, at::IntArrayRef kinds, at::TensorList norms, at::TensorList weights,
                       const c10::List<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(features.dim() == 2 && embeddings.sizes() == features.sizes() && fc_weights.size() == 3,
              "specdecode eagle_layer: features and embeddings [T, hidden], three fc weight tensors");
  const at::Tensor mixed = at::cat({rms_norm_bf16(features.to(at::kFloat), feature_norm, norm_eps),
                                    rms_norm_bf16(embeddings.to(at::kFloat), embed_norm, norm_eps)}, -1);
  at::Tensor x = run_linear(fc_kind, mixed, fc_weights.data(), fc_bias).to(at::kFloat).contiguous();
  c10::List<c10::optional<at::Tensor>> tree;
  tree.push_back(parents);
  const std::vector<at::Tensor> ks{cache_k}, vs{cache_v};
  const std::vector<int64_t> pasts{past}, rows{x.size(0)}, layers{0};
  decoder_layers(x, rope, ks, vs, pasts, rows, tree, n_heads, tiles, eps, layers, kinds, norms, weights, biases);
  return x;
}

// An EAGLE head's greedy draft step in one call (drafters/eagle.py: EagleDrafter._step): eagle_layer
// over the T rows, then the last row in the features' dtype (the feature the head hands on), the
// draft LM head over it (kind `lm_kind`, no bias) widened to fp32, and greedy_pick; returns (that
// row [1, hidden], the picked index, its top probability). The same functions on the same inputs
// as the op-by-op path (head, LM head, greedy_pick): one dispatch instead of ~10.
std::tuple<at::Tensor, int64_t, double> eagle_draft(
    const at::Tensor& features, const at::Tensor& embeddings, const at::Tensor& feature_norm, const at::Tensor& embed_norm,
    double norm_eps, int64_t fc_kind, at::TensorList fc_weights, const c10::optional<at::Tensor>& fc_bias,
    const at::Tensor& rope, at::Tensor cache_k, at::Tensor cache_v, int64_t past, int64_t n_heads, bool tiles,
    double eps, at::IntArrayRef kinds, at::TensorList norms, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, int64_t lm_kind, at::TensorList lm_weights) {
  TORCH_CHECK(lm_weights.size() == 3, "specdecode eagle_draft: three LM-head weight tensors");
  const at::Tensor x = eagle_layer(features, embeddings, feature_norm, embed_norm, norm_eps, fc_kind, fc_weights, fc_bias,
                                   rope, cache_k, cache_v, past, c10::nullopt, n_heads, tiles, eps, kinds, norms, weights,
                                   biases);
  const at::Tensor h = x.narrow(0, x.size(0) - 1, 1).to(features.scalar_type());
  const at::Tensor logits = run_linear(lm_kind, h, lm_weights.data(), c10::nullopt).to(at::kFloat);
  const auto picked = greedy_pick(logits.select(0, 0));
  return {h, std::get<0>(picked), std::get<1>(picked)};
}

}  // namespace

TORCH_LIBRARY(specdecode, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor d) -> Tensor");
  m.def("int4_linear_vnni(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  m.def("int8_linear_vnni(Tensor x, Tensor packed, Tensor d, Tensor wsum) -> Tensor");
  m.def("int4_linear_amx(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  m.def("int8_linear_amx(Tensor x, Tensor packed, Tensor d) -> Tensor");
  m.def("int4_linear_amx_int8(Tensor x, Tensor packed, Tensor d, Tensor m, int amx_rows) -> Tensor");
  m.def("int8_linear_amx_int8(Tensor x, Tensor packed, Tensor d, Tensor wsum, int amx_rows) -> Tensor");
  m.def("amx_int8_rows(bool int4) -> int", &amx_int8_rows);  // no tensors: one kernel for every dispatch key
  m.def("amx_ready() -> bool", &amx_ready);  // no tensors: one kernel for every dispatch key
  m.def("set_thread_count(int threads) -> int", &set_thread_count);  // no tensors: likewise
  m.def("decoder_team_calls() -> int", &decoder_team_calls);  // no tensors: likewise
  m.def("force_avx2_glue(bool force) -> bool", &force_avx2_glue);  // no tensors: likewise (tests only)
  m.def("attend_rows(Tensor q, Tensor k, Tensor v, Tensor past, Tensor? parents=None, bool tiles=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("argmax_rows(Tensor scores) -> Tensor");
  m.def("greedy_pick(Tensor scores) -> (int, float)");
  m.def("rope_attend(Tensor qkv, Tensor rope, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, int past, int n_heads, Tensor? parents=None, bool tiles=False) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("add_residual(Tensor(a!) x, Tensor y) -> ()");
  m.def("decoder_layers(Tensor(a!) x, Tensor rope, Tensor(b!)[] caches_k, Tensor(c!)[] caches_v, int[] pasts, int[] rows, "
        "Tensor?[] parents, int n_heads, bool tiles, float eps, int[] layers, int[] kinds, Tensor[] norms, Tensor[] weights, "
        "Tensor?[] biases) -> ()");
  m.def("eagle_layer(Tensor features, Tensor embeddings, Tensor feature_norm, Tensor embed_norm, float norm_eps, "
        "int fc_kind, Tensor[] fc_weights, Tensor? fc_bias, Tensor rope, Tensor(a!) cache_k, Tensor(b!) cache_v, int past, "
        "Tensor? parents, int n_heads, bool tiles, float eps, int[] kinds, Tensor[] norms, Tensor[] weights, "
        "Tensor?[] biases) -> Tensor");
  m.def("eagle_draft(Tensor features, Tensor embeddings, Tensor feature_norm, Tensor embed_norm, float norm_eps, "
        "int fc_kind, Tensor[] fc_weights, Tensor? fc_bias, Tensor rope, Tensor(a!) cache_k, Tensor(b!) cache_v, int past, "
        "int n_heads, bool tiles, float eps, int[] kinds, Tensor[] norms, Tensor[] weights, Tensor?[] biases, "
        "int lm_kind, Tensor[] lm_weights) -> (Tensor, int, float)");
  m.def("pack_q4_nibbles(Tensor nibbles, bool vnni) -> Tensor");
  m.def("pack_int8(Tensor codes, bool vnni) -> Tensor");
  m.def("int8_block_sums(Tensor codes) -> Tensor");
}

TORCH_LIBRARY_IMPL(specdecode, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear_vnni", &int4_linear_vnni);
  m.impl("int8_linear_vnni", &int8_linear_vnni);
  m.impl("int4_linear_amx", &int4_linear_amx);
  m.impl("int8_linear_amx", &int8_linear_amx);
  m.impl("int4_linear_amx_int8", &int4_linear_amx_int8);
  m.impl("int8_linear_amx_int8", &int8_linear_amx_int8);
  m.impl("attend_rows", &attend_rows);
  m.impl("rms_norm", &rms_norm_bf16);
  m.impl("eagle_layer", &eagle_layer);
  m.impl("eagle_draft", &eagle_draft);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("greedy_pick", &greedy_pick);
  m.impl("rope_attend", &rope_attend);
  m.impl("silu_mul", &silu_mul);
  m.impl("add_residual", &add_residual);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("pack_q4_nibbles", &pack_q4_nibbles);
  m.impl("pack_int8", &pack_int8);
  m.impl("int8_block_sums", &int8_block_sums);
}
