// Filling the tiled layout (tiled.h) from rows in the format's row layout, once at load.
// Plain scalar C++ in the baseline translation unit: the ISA tables point at these functions.
// Each row is decoded block by block into codes and scales, which are then scattered into the
// group's planes.
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "tiled.h"

namespace tandem {

namespace {

using namespace tiled;

template <int R>
struct Put {
  // k counts from the start of the plane's chunk.
  static void int8(uint8_t* plane, int n, int k, uint8_t code) {
    plane[size_t(k / 4) * tr(R) + size_t(n) * 4 + size_t(k % 4)] = code;
  }
  static void nibble(uint8_t* plane, int n, int k, int code) {
    const int g = k / 4;
    plane[size_t(g / 2) * tr(R) + size_t(n) * 4 + size_t(k % 4)] |= uint8_t((code & 15) << (4 * (g % 2)));
  }
  static void bit(uint8_t* plane, int n, int k, int b) {
    const int g = k / 4;
    plane[size_t(g / 8) * tr(R) + size_t(n) * 4 + size_t(k % 4)] |= uint8_t((b & 1) << (g % 8));
  }
  static void crumb(uint8_t* plane, int n, int k, int c) {
    const int g = k / 4;
    plane[size_t(g / 4) * tr(R) + size_t(n) * 4 + size_t(k % 4)] |= uint8_t((c & 3) << (2 * (g % 4)));
  }
  static void u16(uint8_t* at, int n, uint16_t v) { std::memcpy(at + 2 * size_t(n), &v, 2); }
  static void f32(uint8_t* at, int n, float v) { std::memcpy(at + 4 * size_t(n), &v, 4); }
};

template <class B>
B block_at(const uint8_t* row, int i) {
  B b;
  std::memcpy(&b, row + size_t(i) * sizeof(B), sizeof(B));  // rows are packed: no alignment promise
  return b;
}

// One row n of the group, per format.
template <class Fmt, int R>
void pack_row(const uint8_t* row, int n, int K, uint8_t* g) {
  using P = Put<R>;
  if constexpr (std::is_same_v<Fmt, BF16>) {
    for (int k = 0; k < K; ++k) {
      uint16_t v;
      std::memcpy(&v, row + 2 * size_t(k), 2);
      P::u16(g + size_t(k / 2) * tr(R), 2 * n + k % 2, v);
    }
  } else if constexpr (std::is_same_v<Fmt, INT8>) {
    float scale;
    std::memcpy(&scale, row, 4);
    P::f32(g, n, scale);
    const auto* q = reinterpret_cast<const int8_t*>(row + INT8::row_header);
    for (int k = 0; k < K; ++k) P::int8(g + int8_codes(R), n, k, uint8_t(q[k] + 128));
    for (int k = K; k < int8_kp(K); ++k) P::int8(g + int8_codes(R), n, k, 128);  // q = 0
  } else if constexpr (std::is_same_v<Fmt, INT4>) {
    for (int i = 0; i < K / 64; ++i) {
      const auto b = block_at<block_int4>(row, i);
      uint8_t* c = g + size_t(i) * int4_chunk(R);
      P::f32(c, n, b.d);
      for (int j = 0; j < 32; ++j) {
        P::nibble(c + 4 * size_t(R), n, j, b.qs[j] & 15);
        P::nibble(c + 4 * size_t(R), n, j + 32, b.qs[j] >> 4);
      }
    }
  } else if constexpr (std::is_same_v<Fmt, Q8_0>) {
    for (int i = 0; i < K / 32; ++i) {
      const auto b = block_at<block_q8_0>(row, i);
      P::u16(g + q8_0_dplane(R, K) + size_t(i) * 2 * R, n, b.d);
      for (int j = 0; j < 32; ++j) P::int8(g + size_t(i) * q8_0_chunk(R), n, j, uint8_t(b.qs[j] + 128));
    }
  } else if constexpr (std::is_same_v<Fmt, Q5_0>) {
    for (int i = 0; i < K / 32; ++i) {
      const auto b = block_at<block_q5_0>(row, i);
      P::u16(g + q5_0_dplane(R, K) + size_t(i) * 2 * R, n, b.d);
      uint32_t qh;
      std::memcpy(&qh, b.qh, 4);
      uint8_t* c = g + size_t(i) * q5_0_chunk(R);
      for (int j = 0; j < 32; ++j) {
        P::nibble(c, n, j, j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4);
        P::bit(c + q5_0_bits(R), n, j, int((qh >> j) & 1u));
      }
    }
  } else if constexpr (std::is_same_v<Fmt, Q4_K> || std::is_same_v<Fmt, Q5_K>) {
    constexpr bool five = std::is_same_v<Fmt, Q5_K>;
    using B = typename Fmt::block;
    for (int i = 0; i < K / 256; ++i) {
      const auto b = block_at<B>(row, i);
      uint8_t* c = g + size_t(i) * (five ? q5_k_chunk(R) : q4_k_chunk(R));
      P::u16(c, n, b.d);
      P::u16(c + qk_dmin(R), n, b.dmin);
      for (int s = 0; s < 12; ++s) c[qk_scales(R) + size_t(s) * R + size_t(n)] = b.scales[s];
      for (int e = 0; e < 256; ++e) {
        const int j = e / 32, l = e % 32;
        P::nibble(c + qk_nibbles(R), n, e, b.qs[32 * (j / 2) + l] >> (4 * (j % 2)));
        if constexpr (five) P::bit(c + q5_k_bits(R), n, e, (b.qh[l] >> j) & 1);
      }
    }
  } else if constexpr (std::is_same_v<Fmt, Q6_K>) {
    for (int i = 0; i < K / 256; ++i) {
      const auto b = block_at<block_q6_k>(row, i);
      uint8_t* c = g + size_t(i) * q6_k_chunk(R);
      P::u16(g + q6_k_dplane(R, K) + size_t(i) * 2 * R, n, b.d);
      for (int s = 0; s < 16; ++s) c[size_t(s) * R + size_t(n)] = uint8_t(b.scales[s]);
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b.ql + 64 * h;
        const uint8_t* qh = b.qh + 32 * h;
        for (int l = 0; l < 32; ++l) {
          const int q[4] = {
              (ql[l] & 15) | ((qh[l] & 3) << 4),
              (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
              (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
              (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
          };
          for (int s = 0; s < 4; ++s) {
            const int e = 128 * h + 32 * s + l;
            P::nibble(c + q6_k_nibbles(R), n, e, q[s]);
            P::crumb(c + q6_k_crumbs(R), n, e, q[s] >> 4);
          }
        }
      }
    }
  }
}

template <class Fmt, int R>
size_t group_bytes(int K) {
  if constexpr (std::is_same_v<Fmt, BF16>) return bf16_group(R, K);
  else if constexpr (std::is_same_v<Fmt, INT8>) return int8_group(R, K);
  else if constexpr (std::is_same_v<Fmt, INT4>) return int4_group(R, K);
  else if constexpr (std::is_same_v<Fmt, Q8_0>) return q8_0_group(R, K);
  else if constexpr (std::is_same_v<Fmt, Q5_0>) return q5_0_group(R, K);
  else if constexpr (std::is_same_v<Fmt, Q4_K>) return q4_k_group(R, K);
  else if constexpr (std::is_same_v<Fmt, Q5_K>) return q5_k_group(R, K);
  else return q6_k_group(R, K);
}

template <class Fmt, int R>
void pack(const uint8_t* const* rows, int n, int K, uint8_t* g) {
  std::memset(g, 0, group_bytes<Fmt, R>(K));  // padding rows: zero scales, so zero weights
  for (int i = 0; i < n; ++i) pack_row<Fmt, R>(rows[i], i, K, g);
}

template <int R>
FormatKernels layout_for(Format f) {
  FormatKernels k{};
  k.row_group = R;
  visit_format(f, [&](auto fmt) {
    using F = decltype(fmt);
    k.group_bytes = &group_bytes<F, R>;
    k.pack = &pack<F, R>;
  });
  return k;
}

}  // namespace

FormatKernels tiled_layout(Format f, int R) { return R == 8 ? layout_for<8>(f) : layout_for<16>(f); }

}  // namespace tandem
