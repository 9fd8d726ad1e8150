// What the kernel sources share (qmatmul.cpp: the AVX-512 and AMX kernels; avx2.cpp): GGUF's
// block size, the tile of outputs, the denormal guard and the shape checks of every linear.
#pragma once

#include <immintrin.h>
#include <torch/torch.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace sdk {

constexpr int kGroup = 32;  // inputs per block of scales (GGUF's)
constexpr int kTile = 16;   // outputs per tile of the packed layouts

// Denormal floats flushed to zero while one of our kernels runs on this thread (MXCSR's FTZ and
// DAZ bits, restored on exit). Intel cores take a microcode assist (~100 cycles) for every
// denormal operand or result: softmax tails (exp of scores far below the maximum) times values
// make them by the thousand, and attention ran 5x slower on a real model's activations than on
// random ones (AMD's cores show no such penalty). Every path sets it, so results stay batch
// invariant.
struct FlushDenormals {
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// fn(begin, end) over [0, n) in chunks of `step` that the threads take in turn as they finish
// (an atomic counter) rather than one fixed half each: a thread slowed by its caches, the other
// process on its core or unequal tasks no longer leaves the other spinning at the region's end
// (Zen 3, embedded model, a 9-row step: the second thread waited a third of the time). Each
// chunk is computed alike whichever thread takes it.
template <class F>
void parallel_chunks(int64_t n, int64_t step, const F& fn) {
  if (n <= 0) return;
  const int64_t chunks = (n + step - 1) / step;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(step); b < n; b = next.fetch_add(step)) fn(b, std::min(n, b + step));
  });
}

// A counter on a cache line of its own (the threads' counters of `take_shares`).
struct alignas(64) ShareCounter {
  std::atomic<int64_t> next{0};
};

// Work [0, n) cut into one contiguous share a thread (boundaries multiples of `step`), each share
// taken in chunks of `step` from its own counter (shares[u].next starts at share u's first index,
// `share_start`). The thread whose place is `first` goes through share `first` in order (its
// chunks follow one another: the prefetchers' streams go on across them), then takes what is
// left of the others' shares, so that a thread slowed by memory or by the other process on its
// core does not leave the other spinning at the end. (Chunks from one shared counter made each
// thread's stream jump at every chunk: a 5-9-row step 0.91-0.93x the time with shares, Zen 4.)
// Each chunk is computed alike whoever takes it.
inline int64_t share_start(int64_t n, int64_t step, int parts, int u) {
  return u >= parts ? n : std::min(n, (n * u / parts) / step * step);
}

template <class F>
void take_shares(ShareCounter* shares, int parts, int first, int64_t n, int64_t step, const F& fn) {
  for (int k = 0; k < parts; ++k) {
    const int u = (first + k) % parts;
    const int64_t end = share_start(n, step, parts, u + 1);
    for (int64_t b = shares[u].next.fetch_add(step); b < end; b = shares[u].next.fetch_add(step)) fn(b, std::min(end, b + step));
  }
}

// fn(begin, end) over [0, n) as `take_shares` runs it, in a parallel region of its own.
template <class F>
void parallel_shares(int64_t n, int64_t step, const F& fn) {
  if (n <= 0) return;
  const int parts = (int)std::min<int64_t>(at::get_num_threads(), (n + step - 1) / step);
  std::unique_ptr<ShareCounter[]> shares(new ShareCounter[parts]);
  for (int u = 0; u < parts; ++u) shares[u].next.store(share_start(n, step, parts, u), std::memory_order_relaxed);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t) { take_shares(shares.get(), parts, (int)b, n, step, fn); });
}

// A thread's buffers for a call's rows quantized to int8 (the vnni and avx2 kernels), kept
// between calls (growing only): allocating and zeroing them for every linear was a few % of a
// step, on the calling thread while the others waited.
struct QuantRows {
  std::unique_ptr<int8_t[]> q;  // [T, K]
  std::unique_ptr<float[]> dx;  // [T, G]
  std::unique_ptr<float[]> sq;  // [T, G] sum of the row's codes per group (exact in fp32)
  int64_t q_size = 0, g_size = 0;
  void reserve(int64_t n, int64_t groups) {
    if (n > q_size) q.reset(new int8_t[n]), q_size = n;  // (uninitialised: every code is written)
    if (groups > g_size) dx.reset(new float[groups]), sq.reset(new float[groups]), g_size = groups;
  }
};

// What every quantized linear takes: x [T, K] bf16, d [N/16, K/32, 16] f16 and N*K/2 (int4) or
// N*K (int8) bytes of packed weight; x comes back contiguous.
struct LinearShape {
  at::Tensor x;
  int64_t T, K, tiles, G, N;
};

inline LinearShape linear_shape(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& d, bool int4) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "specdecode qlinear: x must be [T, K] bf16");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 3 && d.size(2) == kTile, "specdecode qlinear: d must be [N/16, G, 16] f16");
  LinearShape s{x_in.contiguous(), x_in.size(0), x_in.size(1), d.size(0), d.size(1), d.size(0) * kTile};
  TORCH_CHECK(s.G * kGroup == s.K, "specdecode qlinear: x has ", s.K, " inputs, the weight ", s.G * kGroup);
  TORCH_CHECK(packed.is_contiguous() && packed.numel() == s.N * s.K / (int4 ? 2 : 1), "specdecode qlinear: packed weight of the wrong size");
  return s;
}

// Whether this CPU runs qmatmul.cpp's AVX-512 code (its glue ops take avx2.cpp's otherwise).
inline bool cpu_has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Tests only (specdecode::force_avx2_glue): the glue ops run avx2.cpp's code on an AVX-512 CPU too,
// so that machines with AVX-512 test what CPUs without it run.
inline std::atomic<bool>& avx2_glue_forced() {
  static std::atomic<bool> forced{false};
  return forced;
}

// Whether the glue ops (norms, RoPE, attention, silu, residuals) run qmatmul.cpp's AVX-512 code.
inline bool glue_avx512() { return cpu_has_avx512() && !avx2_glue_forced().load(std::memory_order_relaxed); }

// One sequence's attention in a layer: its q rows, its cache layer, its output rows.
struct SeqAttention {
  const at::BFloat16* q;  // [T, H, D], row stride qs
  int64_t qs, T;
  const at::BFloat16* k;  // [Hkv, L, D] (head stride hs)
  const at::BFloat16* v;
  int64_t hs, past;
  at::BFloat16* out;  // [T, H * D]
  std::vector<std::vector<int64_t>> paths;  // a tree's paths, root first (empty: a chain)
};

// avx2.cpp: the avx2 kernel's linears, and the glue of a forward for CPUs without AVX-512 (each
// row computed on its own in a fixed order, batch invariant as the AVX-512 versions; not their bits)
at::Tensor int4_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m);
at::Tensor int8_linear_avx2(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d);
void rms_norm_rows_avx2(const float* x, const float* w, at::BFloat16* y, int64_t T, int64_t H, float eps);
void rotate_row_avx2(const at::BFloat16* x, const float* rope, at::BFloat16* y, int64_t D);
void silu_mul_vectors_avx2(const at::BFloat16* src, at::BFloat16* y, int64_t F, int64_t begin, int64_t end);
void add_residual_avx2(float* x, const at::BFloat16* y, int64_t n);
void attend_many_avx2(const std::vector<SeqAttention>& seqs, int64_t H, int64_t D, int64_t group);
// the pieces of those for one parallel region (qmatmul.cpp's team path): attention tasks (one row
// x head each, sequence s's from starts[s], taken attend_step_avx2 at a time), the rows' int8
// groups [lo, hi), an avx2 linear's tiles [begin, end) over quantized rows and the tiles a chunk
// of its work takes
std::vector<int64_t> attend_task_starts_avx2(const std::vector<SeqAttention>& seqs, int64_t H);
int64_t attend_step_avx2(int64_t H);
void attend_tasks_avx2(const std::vector<SeqAttention>& seqs, const std::vector<int64_t>& starts, int64_t H, int64_t D,
                       int64_t group, int64_t begin, int64_t end);
void quantize_groups_avx2(const at::BFloat16* x, int64_t lo, int64_t hi, int8_t* q, float* dx, float* sq);
void linear_tiles_avx2(bool int4, const uint8_t* w, const at::Half* d, const at::Half* m, const int8_t* q, const float* dx,
                       const float* sq, int64_t T, int64_t K, int64_t N, at::BFloat16* y, int64_t begin, int64_t end);
int64_t linear_step_avx2(int64_t T, int64_t tiles, int64_t threads);

}  // namespace sdk
