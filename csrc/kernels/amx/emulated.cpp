// The AMX kernels built once more on software tiles (emulate.h), compiled with the AVX-512
// flags only: the "amx-emu" ISA, which TANDEM_ISA or a test must name (never picked by itself).
// Their code is the real kernels' code, in a namespace of its own so both builds link together.
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#define TANDEM_AMX_EMULATE
#define amx amx_emulated_kernels_ns  // tandem::amx -> its own namespace in this translation unit
#include "tiles.cpp"
#include "dequant.cpp"
#undef amx
