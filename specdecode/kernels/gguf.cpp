// GGUF blocks -> float32 weights, and straight on to our Q4_1 / Q8_0 blocks, for loading a file
// (specdecode/models/gguf_file.py, direct.py); the file's own codes split out of their blocks.
//
// Why: the gguf package's numpy dequantization (~12 ns a weight) and our torch requantization
// after it were most of a k-quant file's load. The weights must stay bitwise the gguf package's
// (the float loader and the direct loader give the same model): every weight is computed with
// the float32 operations of its numpy code in the same order (Q4_K: (d * scale) * q - (dmin * min),
// each product rounded on its own), f16 scales widened exactly (F16C: subnormals, inf and NaN
// included), and fp-contract=off keeps GCC from fusing a * b - c into one FMA (rounded once).
// Denormals are not flushed here (no FlushDenormals): no product of these formats is a float32
// denormal, and numpy would not flush one either.
//
// The arithmetic lives in gguf_blocks.h, compiled twice: for AVX-512 and for AVX2 (CPUs without
// AVX-512: AMD Zen 1-3, older Intel); every op picks the copy this CPU runs (cpu_has_avx512).

#include "common.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sdk {

namespace gguf_avx512 {
#define SD_GGUF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c"), optimize("fp-contract=off")))
#define SD_GGUF_WIDTH 512
#include "gguf_blocks.h"
#undef SD_GGUF
#undef SD_GGUF_WIDTH
}  // namespace gguf_avx512

namespace gguf_avx2 {
#define SD_GGUF __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off")))
#define SD_GGUF_WIDTH 256
#include "gguf_blocks.h"
#undef SD_GGUF
#undef SD_GGUF_WIDTH
}  // namespace gguf_avx2

namespace {

using gguf_avx2::GGUFRowFn;
using GGUFType = gguf_avx2::GGUFType;  // (its sizes; this CPU's row decoder: row_decoder)

// One instruction set's copy of gguf_blocks.h.
struct GGUFCode {
  void (*q4_1_group)(const float* w, uint8_t* nibbles, uint16_t* d_bits, uint16_t* m_bits);
  void (*q8_0_group)(const float* w, int8_t* q, uint16_t* d_bits);
  bool (*split_q4_k_blocks)(const uint8_t* src, int64_t begin, int64_t end, uint8_t* nib, uint16_t* dp, uint16_t* mp);
};

const GGUFCode& code() {
  static const GGUFCode avx512{gguf_avx512::q4_1_group, gguf_avx512::q8_0_group, gguf_avx512::split_q4_k_blocks};
  static const GGUFCode avx2{gguf_avx2::q4_1_group, gguf_avx2::q8_0_group, gguf_avx2::split_q4_k_blocks};
  return cpu_has_avx512() ? avx512 : avx2;
}

const GGUFType* find_gguf_type(int64_t ggml_type) {
  for (const GGUFType& t : gguf_avx2::kGGUFTypes)
    if (t.ggml_type == ggml_type) return &t;
  return nullptr;
}

// This CPU's row decoder of type t (t one of gguf_avx2::kGGUFTypes).
GGUFRowFn row_decoder(const GGUFType& t) {
  const size_t i = &t - gguf_avx2::kGGUFTypes;
  return cpu_has_avx512() ? gguf_avx512::kGGUFTypes[i].row : gguf_avx2::kGGUFTypes[i].row;
}

bool gguf_supported(int64_t ggml_type) { return find_gguf_type(ggml_type) != nullptr; }

const GGUFType& gguf_type(int64_t ggml_type) {
  const GGUFType* t = find_gguf_type(ggml_type);
  TORCH_CHECK(t != nullptr, "specdecode: GGML type ", ggml_type, " has no native dequantization");
  return *t;
}

// A tensor's rows as stored: uint8 [rows, bytes a row] (or [bytes]: one row), each row whole blocks.
struct GGUFRows {
  at::Tensor raw;
  const GGUFType* type;
  GGUFRowFn row;  // this CPU's decoder of one row
  int64_t rows, blocks, K;
};

GGUFRows gguf_rows(const at::Tensor& raw_in, int64_t ggml_type) {
  TORCH_CHECK(raw_in.scalar_type() == at::kByte && (raw_in.dim() == 1 || raw_in.dim() == 2),
              "specdecode: GGUF data must be uint8 [rows, bytes a row] or [bytes]");
  const GGUFType& t = gguf_type(ggml_type);
  const int64_t row_bytes = raw_in.size(-1);
  TORCH_CHECK(row_bytes % t.block_bytes == 0, "specdecode: a row of ", row_bytes, " bytes is not whole blocks of ",
              t.block_bytes, " (GGML type ", ggml_type, ")");
  const int64_t blocks = row_bytes / t.block_bytes;
  return {raw_in.contiguous(), &t, row_decoder(t), raw_in.dim() == 2 ? raw_in.size(0) : 1, blocks,
          blocks * t.block_weights};
}

// Rows a task: at least ~64k weights, so that threads are not woken for a few blocks.
int64_t gguf_grain(int64_t K) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)); }

// raw uint8 [rows, bytes a row] -> float32 [rows, K] (or [bytes] -> [K]), bitwise the gguf
// package's dequantize.
at::Tensor dequantize_gguf(const at::Tensor& raw_in, int64_t ggml_type) {
  const GGUFRows in = gguf_rows(raw_in, ggml_type);
  at::Tensor out = raw_in.dim() == 2 ? at::empty({in.rows, in.K}, raw_in.options().dtype(at::kFloat))
                                     : at::empty({in.K}, raw_in.options().dtype(at::kFloat));
  const uint8_t* src = in.raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t row_bytes = in.blocks * in.type->block_bytes;
  at::parallel_for(0, in.rows, gguf_grain(in.K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) in.row(src + r * row_bytes, in.blocks, dst + r * in.K);
  });
  return out;
}

// Calls group(row of floats, row index) for each row of a GGUF tensor, dequantized one row at a
// time into a buffer that stays in cache (no float32 copy of the tensor is written).
template <typename F>
void for_each_gguf_row(const GGUFRows& in, const F& group) {
  const uint8_t* src = in.raw.data_ptr<uint8_t>();
  const int64_t row_bytes = in.blocks * in.type->block_bytes;
  at::parallel_for(0, in.rows, gguf_grain(in.K), [&](int64_t begin, int64_t end) {
    std::vector<float> w(in.K);
    for (int64_t r = begin; r < end; ++r) {
      in.row(src + r * row_bytes, in.blocks, w.data());
      group(w.data(), r);
    }
  });
}

// The rows a requantization reads: [rows, bytes a row], rows of whole groups of 32 weights.
GGUFRows requantized_rows(const at::Tensor& raw_in, int64_t ggml_type) {
  TORCH_CHECK(raw_in.dim() == 2, "specdecode: GGUF rows to requantize must be [rows, bytes a row]");
  const GGUFRows in = gguf_rows(raw_in, ggml_type);
  TORCH_CHECK(in.K % kGroup == 0, "specdecode: rows to requantize must be whole groups of 32 weights");
  return in;
}

// An output of gguf_to_q4_1 / gguf_to_q8_0: contiguous, of this dtype and shape (often rows of a
// larger tensor: the direct loader has each chunk written where it belongs, no copy after).
void check_output(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(), "specdecode: an output must be ",
              "contiguous ", dtype, " ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

// raw uint8 [rows, bytes a row] -> nibbles uint8 [rows, K/32, 16], d f16 [rows, K/32], m f16
// (written into them): what quantize_q4_1 + to_nibbles give for dequantize_gguf's weights, in one pass.
void gguf_to_q4_1(const at::Tensor& raw_in, int64_t ggml_type, at::Tensor nibbles, at::Tensor d, at::Tensor m) {
  const GGUFRows in = requantized_rows(raw_in, ggml_type);
  const int64_t G = in.K / kGroup;
  check_output(nibbles, at::kByte, {in.rows, G, 16});
  check_output(d, at::kHalf, {in.rows, G});
  check_output(m, at::kHalf, {in.rows, G});
  uint8_t* np = nibbles.data_ptr<uint8_t>();
  auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
  auto* mp = reinterpret_cast<uint16_t*>(m.data_ptr<at::Half>());
  const auto group = code().q4_1_group;
  for_each_gguf_row(in, [&](const float* w, int64_t r) {
    for (int64_t g = 0; g < G; ++g) group(w + g * kGroup, np + (r * G + g) * 16, dp + r * G + g, mp + r * G + g);
  });
}

// raw uint8 [rows, bytes a row] -> codes int8 [rows, K], d f16 [rows, K/32] (written into them):
// what quantize_q8_0 gives for dequantize_gguf's weights, in one pass.
void gguf_to_q8_0(const at::Tensor& raw_in, int64_t ggml_type, at::Tensor q, at::Tensor d) {
  const GGUFRows in = requantized_rows(raw_in, ggml_type);
  const int64_t G = in.K / kGroup;
  check_output(q, at::kChar, {in.rows, in.K});
  check_output(d, at::kHalf, {in.rows, G});
  int8_t* qp = q.data_ptr<int8_t>();
  auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
  const auto group = code().q8_0_group;
  for_each_gguf_row(in, [&](const float* w, int64_t r) {
    for (int64_t g = 0; g < G; ++g) group(w + g * kGroup, qp + r * in.K + g * kGroup, dp + r * G + g);
  });
}

// A Q4_0 / Q4_1 / Q8_0 tensor's blocks split into their fields, as our stacks take them (the
// file's own codes: no float round trip), written into codes and d (and m, Q4_1's): Q4_0 and Q4_1
// nibbles uint8 [N, G, 16], Q8_0 codes int8 [N, K]; d, m f16 [N, G]. Often rows of a larger
// tensor (q, k and v of one fused matrix: no concatenation after). Why here: numpy's strided
// copies of 2-byte fields every 18 bytes took ~1 s of a 1.5B Q4_0 load.
void split_gguf_blocks(const at::Tensor& raw_in, int64_t ggml_type, at::Tensor codes_out, at::Tensor d,
                       const c10::optional<at::Tensor>& m) {
  TORCH_CHECK(raw_in.dim() == 2 && (ggml_type == 2 || ggml_type == 3 || ggml_type == 8),
              "specdecode split_gguf_blocks: raw [rows, bytes a row] of Q4_0, Q4_1 or Q8_0");
  TORCH_CHECK(m.has_value() == (ggml_type == 3), "specdecode split_gguf_blocks: m is Q4_1's (and only its) output");
  const GGUFRows in = gguf_rows(raw_in, ggml_type);
  const int64_t N = in.rows, G = in.blocks, bytes = in.type->block_bytes;
  const int64_t scales = ggml_type == 3 ? 2 : 1, code_bytes = bytes - 2 * scales;  // f16 fields first, then codes
  if (ggml_type == 8)
    check_output(codes_out, at::kChar, {N, G * code_bytes});
  else
    check_output(codes_out, at::kByte, {N, G, code_bytes});
  check_output(d, at::kHalf, {N, G});
  if (m) check_output(*m, at::kHalf, {N, G});
  const uint8_t* src = in.raw.data_ptr<uint8_t>();
  auto* codes = static_cast<uint8_t*>(codes_out.data_ptr());
  std::vector<uint16_t*> fields{reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>())};
  if (m) fields.push_back(reinterpret_cast<uint16_t*>(m->data_ptr<at::Half>()));
  at::parallel_for(0, N * G, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = src + b * bytes;
      for (int64_t f = 0; f < scales; ++f) std::memcpy(fields[f] + b, block + 2 * f, 2);
      std::memcpy(codes + b * code_bytes, block + 2 * scales, code_bytes);
    }
  });
}

// A Q4_K tensor as our int4 stacks take it, its codes as they are: [nibbles uint8 [N, G, 16] in
// Q4_0/Q4_1's order (byte i: weight i low, weight i + 16 high), d f16 [N, G], m f16 [N, G]] for
// G = K / 32 sub-blocks, with d = f16(d_block * scale) and m = f16(-(dmin * min)): the file's
// w = (d * scale) * q - (dmin * min) with only the two sub-block factors rounded to f16 (relative
// 2^-11), instead of requantizing the weights to new 4-bit codes; written into nibbles, d and m
// (as split_gguf_blocks). False where a factor is past f16's range (inf) or NaN: then the caller
// requantizes that tensor instead.
bool split_q4_k(const at::Tensor& raw_in, at::Tensor nibbles, at::Tensor d, at::Tensor m) {
  const GGUFRows in = gguf_rows(raw_in, 12);
  const int64_t N = in.rows, blocks = in.blocks, G = blocks * 8;
  check_output(nibbles, at::kByte, {N, G, 16});
  check_output(d, at::kHalf, {N, G});
  check_output(m, at::kHalf, {N, G});
  const uint8_t* src = in.raw.data_ptr<uint8_t>();
  uint8_t* nib = nibbles.data_ptr<uint8_t>();
  auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
  auto* mp = reinterpret_cast<uint16_t*>(m.data_ptr<at::Half>());
  const auto split = code().split_q4_k_blocks;
  std::atomic<bool> finite{true};
  at::parallel_for(0, N * blocks, 1024, [&](int64_t begin, int64_t end) {
    if (!split(src, begin, end, nib, dp, mp)) finite = false;
  });
  return finite;
}

// The rows of `tokens` (long, any shape) of an embedding stored as GGUF blocks (uint8 [V, bytes
// a row]): each dequantized bitwise as dequantize_gguf does it, then rounded to `dtype` as ATen's
// `.to()` rounds float32 -> [*tokens.shape, K]. One call for what a decode step embeds (a few
// rows): no threads woken, no per-op dispatch.
at::Tensor gguf_embed(const at::Tensor& blocks, const at::Tensor& tokens_in, int64_t ggml_type, at::ScalarType dtype) {
  TORCH_CHECK(blocks.dim() == 2, "specdecode gguf_embed: the embedding's blocks must be uint8 [rows, bytes a row]");
  TORCH_CHECK(tokens_in.scalar_type() == at::kLong, "specdecode gguf_embed: token ids must be int64");
  const GGUFRows in = gguf_rows(blocks, ggml_type);
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t n = tokens.numel();
  const int64_t* ids = tokens.data_ptr<int64_t>();
  const uint8_t* src = in.raw.data_ptr<uint8_t>();
  const int64_t row_bytes = in.blocks * in.type->block_bytes;
  at::Tensor out = at::empty({n, in.K}, blocks.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < in.rows, "specdecode gguf_embed: token id ", ids[i], " is outside the vocabulary (",
                in.rows, " rows)");
    in.row(src + ids[i] * row_bytes, in.blocks, dst + i * in.K);
  }
  std::vector<int64_t> shape(tokens.sizes().begin(), tokens.sizes().end());
  shape.push_back(in.K);
  return (dtype == at::kFloat ? out : out.to(dtype)).view(shape);
}

}  // namespace
}  // namespace sdk

TORCH_LIBRARY_FRAGMENT(specdecode, m) {
  m.def("gguf_supported(int ggml_type) -> bool", &sdk::gguf_supported);  // no tensors: one kernel for every dispatch key
  m.def("dequantize_gguf(Tensor raw, int ggml_type) -> Tensor");
  m.def("gguf_embed(Tensor blocks, Tensor tokens, int ggml_type, ScalarType dtype) -> Tensor");
  m.def("gguf_to_q4_1(Tensor raw, int ggml_type, Tensor(a!) nibbles, Tensor(b!) d, Tensor(c!) m) -> ()");
  m.def("gguf_to_q8_0(Tensor raw, int ggml_type, Tensor(a!) q, Tensor(b!) d) -> ()");
  m.def("split_gguf_blocks(Tensor raw, int ggml_type, Tensor(a!) codes, Tensor(b!) d, Tensor(c!)? m=None) -> ()");
  m.def("split_q4_k(Tensor raw, Tensor(a!) nibbles, Tensor(b!) d, Tensor(c!) m) -> bool");
}

TORCH_LIBRARY_IMPL(specdecode, CPU, m) {
  m.impl("dequantize_gguf", &sdk::dequantize_gguf);
  m.impl("gguf_embed", &sdk::gguf_embed);
  m.impl("gguf_to_q4_1", &sdk::gguf_to_q4_1);
  m.impl("gguf_to_q8_0", &sdk::gguf_to_q8_0);
  m.impl("split_gguf_blocks", &sdk::split_gguf_blocks);
  m.impl("split_q4_k", &sdk::split_q4_k);
}
