// GGUF k-quants: 256-weight super-blocks of 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks, each with
// its own scale. Consumed from the file's bytes. The float operations follow the order of
// gguf.quants.dequantize ((d * sc) * q - dmin * m) so both give identical floats.
#pragma once

#include <cstdint>

#include "half.h"

namespace tandem {

inline constexpr int QK_K = 256;

struct block_q4_k {
  uint16_t d;     // fp16 super-block scale of the sub-block scales
  uint16_t dmin;  // fp16 super-block scale of the sub-block mins
  uint8_t scales[12];  // 8 x (6-bit scale, 6-bit min), packed
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q4_k) == 144, "Q4_K block is 144 bytes");

struct block_q5_k {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[QK_K / 8];  // 5th bit: bit j of qh[l] belongs to sub-block j, element l
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q5_k) == 176, "Q5_K block is 176 bytes");

struct block_q6_k {
  uint8_t ql[QK_K / 2];  // low 4 bits
  uint8_t qh[QK_K / 4];  // high 2 bits
  int8_t scales[QK_K / 16];
  uint16_t d;  // fp16
};
static_assert(sizeof(block_q6_k) == 210, "Q6_K block is 210 bytes");

// Sub-block j's 6-bit scale and min from the 12 packed bytes: bytes 0-3 hold scales 0-3 (low 6
// bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for mins; bytes 8-11 the low 4 bits
// of scales 4-7 (low nibble) and mins 4-7 (high nibble).
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

struct Q4_K {
  static constexpr const char* name = "Q4_K";
  using block = block_q4_k;
  static constexpr int block_elems = QK_K;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = false;

  // Sub-blocks 2i and 2i+1 are the low and high nibbles of qs[32i .. 32i+31].
  static void dequant_block(const block& b, float* y) {
    const float d = fp16_to_f32(b.d), dmin = fp16_to_f32(b.dmin);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      k_scale_min(b.scales, j, sc, m);
      const float ds = d * float(sc), dm = dmin * float(m);
      const uint8_t* q = b.qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) y[32 * j + l] = ds * float((q[l] >> shift) & 0x0f) - dm;
    }
  }
};

struct Q5_K {
  static constexpr const char* name = "Q5_K";
  using block = block_q5_k;
  static constexpr int block_elems = QK_K;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = false;

  static void dequant_block(const block& b, float* y) {
    const float d = fp16_to_f32(b.d), dmin = fp16_to_f32(b.dmin);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      k_scale_min(b.scales, j, sc, m);
      const float ds = d * float(sc), dm = dmin * float(m);
      const uint8_t* q = b.qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) {
        const int v = ((q[l] >> shift) & 0x0f) | (((b.qh[l] >> j) & 1) << 4);
        y[32 * j + l] = ds * float(v) - dm;
      }
    }
  }
};

struct Q6_K {
  static constexpr const char* name = "Q6_K";
  using block = block_q6_k;
  static constexpr int block_elems = QK_K;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = false;

  // Each 128-weight half n uses ql[64n ..], qh[32n ..]: weights l, l+32, l+64, l+96 take the low
  // nibble of ql[l], of ql[l+32], the high nibble of ql[l], of ql[l+32], and bit pairs 0-1, 2-3,
  // 4-5, 6-7 of qh[l]. Every 16 consecutive weights share one int8 scale.
  static void dequant_block(const block& b, float* y) {
    const float d = fp16_to_f32(b.d);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = b.ql + 64 * n;
      const uint8_t* qh = b.qh + 32 * n;
      float* yn = y + 128 * n;
      for (int l = 0; l < 32; ++l) {
        const int q[4] = {
            int((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32,
            int((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32,
            int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32,
            int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32,
        };
        for (int s = 0; s < 4; ++s) {
          const int idx = 32 * s + l;
          yn[idx] = (d * float(b.scales[8 * n + idx / 16])) * float(q[s]);
        }
      }
    }
  }
};

}  // namespace tandem
