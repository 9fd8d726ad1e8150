// GGUF blocks -> float32 weights, and float32 groups -> our Q4_1 / Q8_0 blocks: the code of one
// instruction set. No include guard: gguf.cpp includes this file twice, in namespace gguf_avx512
// with SD_GGUF the AVX-512 target and SD_GGUF_WIDTH 512, and in gguf_avx2 with the AVX2 target and
// 256, so a file loads as fast as the CPU allows on every x86-64 machine with AVX2 (the block
// decoders are plain loops GCC vectorizes for the target; the group helpers are written per width).
// Both give the same bits: every weight is the same float32 operations in the same order.

SD_GGUF inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// Q4_0 (18 bytes: f16 d, 16 bytes of nibbles): w[j] = d * (low nibble j - 8), w[j + 16] the high.
SD_GGUF void q4_0_block(const uint8_t* b, float* w) {
  const float d = f16_at(b);
  for (int j = 0; j < 16; ++j) {
    w[j] = d * (float)((b[2 + j] & 0x0F) - 8);
    w[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
  }
}

// Q4_1 (20 bytes: f16 d, f16 m, 16 bytes of nibbles): w = (d * q) + m.
SD_GGUF void q4_1_block(const uint8_t* b, float* w) {
  const float d = f16_at(b), m = f16_at(b + 2);
  for (int j = 0; j < 16; ++j) {
    w[j] = d * (float)(b[4 + j] & 0x0F) + m;
    w[j + 16] = d * (float)(b[4 + j] >> 4) + m;
  }
}

// The 5-bit codes of a Q5_0 / Q5_1 block: nibbles as Q4's, bit i of the little-endian word qh
// the fifth bit of weight i.
SD_GGUF inline void q5_codes(const uint8_t* qh_bytes, const uint8_t* qs, int q[32]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, sizeof(qh));
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
  }
}

// Q5_0 (22 bytes: f16 d, 4 bytes qh, 16 of nibbles): w = d * (q - 16).
SD_GGUF void q5_0_block(const uint8_t* b, float* w) {
  const float d = f16_at(b);
  int q[32];
  q5_codes(b + 2, b + 6, q);
  for (int i = 0; i < 32; ++i) w[i] = d * (float)(q[i] - 16);
}

// Q5_1 (24 bytes: f16 d, f16 m, 4 bytes qh, 16 of nibbles): w = (d * q) + m.
SD_GGUF void q5_1_block(const uint8_t* b, float* w) {
  const float d = f16_at(b), m = f16_at(b + 2);
  int q[32];
  q5_codes(b + 4, b + 8, q);
  for (int i = 0; i < 32; ++i) w[i] = d * (float)q[i] + m;
}

// Q8_0 (34 bytes: f16 d, 32 int8 codes): w = q * d.
SD_GGUF void q8_0_block(const uint8_t* b, float* w) {
  const float d = f16_at(b);
  for (int i = 0; i < 32; ++i) w[i] = (float)(int8_t)b[2 + i] * d;
}

// Q2_K (84 bytes: 16 scale bytes, 64 bytes of 2-bit codes, f16 d, f16 dmin), 16 sub-blocks of 16.
// Scale byte s: low nibble times d scales sub-block s, high nibble times dmin is its offset.
// Code of weight 128 h + 32 k + l: bits 2k, 2k+1 of byte 32 h + l.
SD_GGUF void q2_k_block(const uint8_t* b, float* w) {
  const uint8_t *scales = b, *qs = b + 16;
  const float d = f16_at(b + 80), dmin = f16_at(b + 82);
  for (int sub = 0; sub < 16; ++sub) {
    const float scale = d * (float)(scales[sub] & 0x0F), offset = dmin * (float)(scales[sub] >> 4);
    const uint8_t* src = qs + 32 * (sub / 8) + 16 * (sub % 2);  // sub = 8 h + 2 k + (which half of the 32)
    const int shift = 2 * ((sub / 2) % 4);
    for (int l = 0; l < 16; ++l) w[16 * sub + l] = scale * (float)((src[l] >> shift) & 3) - offset;
  }
}

// Q3_K (110 bytes: 32 bytes hmask, 64 of 2-bit codes, 12 of 6-bit scales, f16 d), 16 sub-blocks
// of 16. Scale s: 4 low bits from byte s (low nibble, s < 8) or s - 8 (high nibble), 2 high bits
// from byte 8 + s % 4 at bit 2 (s / 4), minus 32. Weight 128 h + 32 k + l: 2-bit code as Q2_K,
// minus 4 where bit (4 h + k) of hmask[l] is clear.
SD_GGUF void q3_k_block(const uint8_t* b, float* w) {
  const uint8_t *hmask = b, *qs = b + 32, *packed = b + 96;
  const float d = f16_at(b + 108);
  for (int sub = 0; sub < 16; ++sub) {
    const int low = sub < 8 ? packed[sub] & 0x0F : packed[sub - 8] >> 4;
    const int high = (packed[8 + sub % 4] >> (2 * (sub / 4))) & 3;
    const float scale = d * (float)((low | (high << 4)) - 32);
    const int half = 16 * (sub % 2), shift = 2 * ((sub / 2) % 4), bit = sub / 2;
    const uint8_t* src = qs + 32 * (sub / 8) + half;
    for (int l = 0; l < 16; ++l) {
      const int q = ((src[l] >> shift) & 3) - (((hmask[half + l] >> bit) & 1) ^ 1) * 4;
      w[16 * sub + l] = scale * (float)q;
    }
  }
}

// Q4_K / Q5_K: the 6-bit scales and mins of 8 sub-blocks packed in 12 bytes. Sub-blocks 0-3: low
// 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7: a nibble of byte 8 + i (low: scale, high:
// min) under the top 2 bits of byte i (scale) or 4 + i (min).
SD_GGUF inline void k_scales_mins(const uint8_t* p, int scale[8], int min[8]) {
  for (int i = 0; i < 4; ++i) {
    scale[i] = p[i] & 0x3F;
    min[i] = p[4 + i] & 0x3F;
    scale[4 + i] = (p[8 + i] & 0x0F) | ((p[i] >> 2) & 0x30);
    min[4 + i] = (p[8 + i] >> 4) | ((p[4 + i] >> 2) & 0x30);
  }
}

// Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of scales/mins, 128 of nibbles), 8 sub-blocks of 32:
// sub-block 2j in the low nibbles of bytes 32j..32j+31, 2j+1 in the high. With QH (Q5_K: 176
// bytes, 32 bytes qh before the nibbles) bit s of qh[l] is the fifth bit of sub-block s's weight l.
// w = (d * scale) * q - (dmin * min).
template <bool QH>
SD_GGUF void q45_k_block(const uint8_t* b, float* w) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  int scale[8], min[8];
  k_scales_mins(b + 4, scale, min);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (QH ? 48 : 16);
  for (int sub = 0; sub < 8; ++sub) {
    const float dl = d * (float)scale[sub], ml = dmin * (float)min[sub];
    const uint8_t* src = qs + 32 * (sub / 2);
    const int shift = 4 * (sub % 2);
    for (int l = 0; l < 32; ++l) {
      int q = (src[l] >> shift) & 0x0F;
      if (QH) q |= ((qh[l] >> sub) & 1) << 4;
      w[32 * sub + l] = dl * (float)q - ml;
    }
  }
}

// Q6_K (210 bytes: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, f16 d), 16
// sub-blocks of 16. Weight 128 h + 32 k + l: nibble of byte 64 h + 32 (k % 2) + l (low for k < 2,
// high after), high bits 2k, 2k+1 of byte 64 + 32 h + l; w = (d * scale) * (code - 32).
SD_GGUF void q6_k_block(const uint8_t* b, float* w) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* scales = (const int8_t*)(b + 192);
  const float d = f16_at(b + 208);
  for (int sub = 0; sub < 16; ++sub) {
    const float scale = d * (float)scales[sub];
    const int h = sub / 8, k = (sub / 2) % 4, half = 16 * (sub % 2);
    const uint8_t* low = ql + 64 * h + 32 * (k % 2) + half;
    const uint8_t* high = qh + 32 * h + half;
    for (int l = 0; l < 16; ++l) {
      const int q = ((low[l] >> (4 * (k / 2))) & 0x0F) | (((high[l] >> (2 * k)) & 3) << 4);
      w[16 * sub + l] = scale * (float)(q - 32);
    }
  }
}

// Unquantized types, one weight a "block": F32 copied, F16 widened, BF16 the high half of a float32.
SD_GGUF void f32_block(const uint8_t* b, float* w) { std::memcpy(w, b, sizeof(float)); }
// F16 as numpy widens it: a NaN keeps its payload bits as they are (F16C would set the quiet bit;
// in the quantized types a NaN scale is multiplied, which sets it either way).
SD_GGUF void f16_block(const uint8_t* b, float* w) {
  uint16_t h;
  std::memcpy(&h, b, sizeof(h));
  if ((h & 0x7C00) != 0x7C00 || (h & 0x03FF) == 0) {
    *w = _cvtsh_ss(h);
    return;
  }
  const uint32_t bits = ((uint32_t)(h & 0x8000) << 16) | 0x7F800000u | ((uint32_t)(h & 0x03FF) << 13);
  std::memcpy(w, &bits, sizeof(bits));
}
SD_GGUF void bf16_block(const uint8_t* b, float* w) {
  uint16_t h;
  std::memcpy(&h, b, sizeof(h));
  const uint32_t bits = (uint32_t)h << 16;
  std::memcpy(w, &bits, sizeof(bits));
}

using GGUFRowFn = void (*)(const uint8_t* src, int64_t blocks, float* w);

template <int BYTES, int WEIGHTS, void (*BLOCK)(const uint8_t*, float*)>
SD_GGUF void gguf_row(const uint8_t* src, int64_t blocks, float* w) {
  for (int64_t i = 0; i < blocks; ++i) BLOCK(src + i * BYTES, w + i * WEIGHTS);
}

struct GGUFType {
  int64_t ggml_type, block_bytes, block_weights;
  GGUFRowFn row;
};

template <int BYTES, int WEIGHTS, void (*BLOCK)(const uint8_t*, float*)>
constexpr GGUFType gguf_type_of(int64_t ggml_type) {
  return {ggml_type, BYTES, WEIGHTS, gguf_row<BYTES, WEIGHTS, BLOCK>};
}

// The types we decode, by GGML type number (ggml.h's enum ggml_type); both copies list them in
// this order (gguf.cpp takes the sizes from one and the row decoder from the CPU's).
constexpr GGUFType kGGUFTypes[] = {
    gguf_type_of<4, 1, f32_block>(0),           gguf_type_of<2, 1, f16_block>(1),
    gguf_type_of<18, 32, q4_0_block>(2),        gguf_type_of<20, 32, q4_1_block>(3),
    gguf_type_of<22, 32, q5_0_block>(6),        gguf_type_of<24, 32, q5_1_block>(7),
    gguf_type_of<34, 32, q8_0_block>(8),        gguf_type_of<84, 256, q2_k_block>(10),
    gguf_type_of<110, 256, q3_k_block>(11),     gguf_type_of<144, 256, q45_k_block<false>>(12),
    gguf_type_of<176, 256, q45_k_block<true>>(13), gguf_type_of<210, 256, q6_k_block>(14),
    gguf_type_of<2, 1, bf16_block>(30),
};

SD_GGUF inline uint16_t to_f16_bits(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
SD_GGUF inline float from_f16_bits(uint16_t h) { return _cvtsh_ss(h); }

// Smallest and largest of a group of 32 weights, as torch's aminmax gives them: a scan that keeps
// the first of equal values, which only shows where the extreme is a zero of both signs (then
// the first zero's sign). Vector min/max then that fix-up: a scalar scan was most of a
// requantization's time (a 32-long chain of dependent minss).
// codes_q4 / codes_q8: a group's codes as quant.py computes them, clamp(round_half_even((w - m) / d),
// lo, hi), each step rounded as torch's (a true division: no reciprocal; nearbyint's rounding;
// clamp = min(max)): Q4 as 16 nibble bytes (byte j: code j low, code j + 16 high), Q8 as 32 bytes.
#if SD_GGUF_WIDTH == 512
// The first zero of a group of 32 weights whose smallest (or largest) is a zero: +0 or -0.
SD_GGUF inline float first_zero(const float* w, __m512 a, __m512 b) {
  const __m512 zero = _mm512_setzero_ps();
  const uint32_t zeros = (uint32_t)_mm512_cmp_ps_mask(a, zero, _CMP_EQ_OQ) |
                         ((uint32_t)_mm512_cmp_ps_mask(b, zero, _CMP_EQ_OQ) << 16);
  return w[__builtin_ctz(zeros)];
}

SD_GGUF inline void group_range(const float* w, float* lo, float* hi) {
  const __m512 a = _mm512_loadu_ps(w), b = _mm512_loadu_ps(w + 16);
  *lo = _mm512_reduce_min_ps(_mm512_min_ps(a, b));
  *hi = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
  if (*lo == 0.0f) *lo = first_zero(w, a, b);
  if (*hi == 0.0f) *hi = first_zero(w, a, b);
}

SD_GGUF inline __m512i codes16(const float* w, float m, float d, float lo, float hi) {
  const __m512 x = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(w), _mm512_set1_ps(m)), _mm512_set1_ps(d)),
                                        _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi)));
}

SD_GGUF inline void codes_q4(const float* w, float m, float d, uint8_t* nibbles) {
  const __m512i first = codes16(w, m, d, 0.0f, 15.0f), second = codes16(w + 16, m, d, 0.0f, 15.0f);
  _mm_storeu_si128((__m128i*)nibbles, _mm512_cvtepi32_epi8(_mm512_or_si512(first, _mm512_slli_epi32(second, 4))));
}

SD_GGUF inline void codes_q8(const float* w, float d, int8_t* q) {
  for (int half = 0; half < 2; ++half)
    _mm_storeu_si128((__m128i*)(q + 16 * half), _mm512_cvtepi32_epi8(codes16(w + 16 * half, 0.0f, d, -127.0f, 127.0f)));
}
#else
SD_GGUF inline float first_zero(const float* w, const __m256 v[4]) {
  uint32_t zeros = 0;
  for (int i = 0; i < 4; ++i)
    zeros |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[i], _mm256_setzero_ps(), _CMP_EQ_OQ)) << (8 * i);
  return w[__builtin_ctz(zeros)];
}

SD_GGUF inline void group_range(const float* w, float* lo, float* hi) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(w + 8 * i);
  __m256 mn = _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3]));
  __m256 mx = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
  __m128 a = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
  a = _mm_min_ps(a, _mm_movehl_ps(a, a));
  *lo = _mm_cvtss_f32(_mm_min_ss(a, _mm_movehdup_ps(a)));
  __m128 b = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  *hi = _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
  if (*lo == 0.0f) *lo = first_zero(w, v);
  if (*hi == 0.0f) *hi = first_zero(w, v);
}

// The 32 codes as int32, four vectors of 8 in order.
SD_GGUF inline void codes32(const float* w, float m, float d, float lo, float hi, __m256i c[4]) {
  const __m256 mv = _mm256_set1_ps(m), dv = _mm256_set1_ps(d), lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi);
  for (int i = 0; i < 4; ++i) {
    const __m256 x = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(w + 8 * i), mv), dv), _MM_FROUND_CUR_DIRECTION);
    c[i] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(x, lov), hiv));
  }
}

// The packs work within 128-bit lanes: dwords (0, 4, 1, 5, 2, 6, 3, 7) put their bytes in order.
SD_GGUF inline __m256i lanes_in_order(__m256i packed) {
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

SD_GGUF inline void codes_q4(const float* w, float m, float d, uint8_t* nibbles) {
  __m256i c[4];
  codes32(w, m, d, 0.0f, 15.0f, c);
  const __m256i words = _mm256_packs_epi32(_mm256_or_si256(c[0], _mm256_slli_epi32(c[2], 4)),
                                           _mm256_or_si256(c[1], _mm256_slli_epi32(c[3], 4)));
  _mm_storeu_si128((__m128i*)nibbles, _mm256_castsi256_si128(lanes_in_order(_mm256_packus_epi16(words, words))));
}

SD_GGUF inline void codes_q8(const float* w, float d, int8_t* q) {
  __m256i c[4];
  codes32(w, 0.0f, d, -127.0f, 127.0f, c);
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256((__m256i*)q, lanes_in_order(bytes));
}
#endif

// One group of 32 weights -> Q4_1 (nibble byte j: code j low, code j + 16 high; d, m as f16 bits)
// with quant.py quantize_q4_1's float32 operations: d = f16((max - min) / 15), m = f16(min),
// q = clamp(round_half_even((w - m) / d), 0, 15), every q 0 where d is not > 0. Equal to it for
// finite weights (NaN weights are not promised the torch code's codes).
SD_GGUF void q4_1_group(const float* w, uint8_t* nibbles, uint16_t* d_bits, uint16_t* m_bits) {
  float lo, hi;
  group_range(w, &lo, &hi);
  *d_bits = to_f16_bits((hi - lo) / 15.0f);
  *m_bits = to_f16_bits(lo);
  const float d = from_f16_bits(*d_bits), m = from_f16_bits(*m_bits);
  if (!(d > 0)) {  // quant.py: every code 0
    std::memset(nibbles, 0, 16);
    return;
  }
  codes_q4(w, m, d, nibbles);
}

// One group of 32 weights -> Q8_0 codes and d (f16 bits), with quant.py quantize_q8_0's float32
// operations: d = f16(max(max, -min) / 127), q = clamp(round_half_even(w / d), -127, 127) (d <= 0:
// divided by 1). Equal to it for finite weights.
SD_GGUF void q8_0_group(const float* w, int8_t* q, uint16_t* d_bits) {
  float lo, hi;
  group_range(w, &lo, &hi);
  *d_bits = to_f16_bits((hi > -lo ? hi : -lo) / 127.0f);
  const float d = from_f16_bits(*d_bits);
  codes_q8(w, d > 0 ? d : 1.0f, q);  // w - 0 = w: no offset
}

// Q4_K blocks [begin, end) -> Q4_1-shaped sub-blocks (gguf.cpp split_q4_k): nibbles in Q4_0/Q4_1's
// order, d = f16(d_block * scale), m = f16(-(dmin * min)). False if a factor is not finite in f16.
SD_GGUF bool split_q4_k_blocks(const uint8_t* src, int64_t begin, int64_t end, uint8_t* nib, uint16_t* dp, uint16_t* mp) {
  bool finite = true;
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* block = src + b * 144;
    const float d = f16_at(block), dmin = f16_at(block + 2);
    int scale[8], min[8];
    k_scales_mins(block + 4, scale, min);
    const uint8_t* qs = block + 16;
    for (int sub = 0; sub < 8; ++sub) {
      const int64_t g = b * 8 + sub;
      dp[g] = to_f16_bits(d * (float)scale[sub]);
      mp[g] = to_f16_bits(-(dmin * (float)min[sub]));
      finite = finite && (dp[g] & 0x7C00) != 0x7C00 && (mp[g] & 0x7C00) != 0x7C00;  // (exponent all ones: inf, NaN)
      const uint8_t* q = qs + 32 * (sub / 2);
      const int shift = 4 * (sub % 2);
      for (int i = 0; i < 16; ++i)
        nib[g * 16 + i] = (uint8_t)(((q[i] >> shift) & 0x0F) | (((q[i + 16] >> shift) & 0x0F) << 4));
    }
  }
  return finite;
}
