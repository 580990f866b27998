// Declarations shared by the AVX2 translation units (compiled with -mavx2 -mfma -mf16c).
#pragma once

#include <cstdint>

namespace tandem::avx2 {

void prep_f32(const float* x, int K, uint8_t* dst);
void prep_q8_32(const float* x, int K, uint8_t* dst);
void prep_q8_k(const float* x, int K, uint8_t* dst);
void swiglu(float* h, const float* up, int n);

}  // namespace tandem::avx2
