// What the AMX kernels share: whether this build has AMX-BF16 (ALIGNEDSERVE_AMX), the tile
// configuration, the process's permission to use the tiles, and a base-2 exp for softmax weights
// that are rounded to bfloat16 next.
#pragma once
#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define ALIGNEDSERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

namespace amx {

// How far (base 2) a row's maximum may outgrow the softmax's reference maximum before the output
// is rescaled (FlashAttention-4's conditional rescaling): weights stay <= 2^RESCALE.
constexpr float RESCALE = 8.f;

// 2^x of 16 floats, x = n + f, |f| <= 1/2: 2^f by its Taylor polynomial of degree 4 (relative
// error <= 4e-5, a hundredth of bfloat16's rounding, which the weights take next), times 2^n.
inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.6181291e-3f), f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

struct TileConfig {  // the LDTILECFG memory layout, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX tile state only to a process that asked for it (oneDNN asks too).
inline bool permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// The online softmax's step for 16 lanes (query rows or heads): m is the reference maximum (base
// 2), cmax this chunk's maximum. The reference moves only when some lane's maximum outgrows it by
// more than RESCALE, or on the first chunk (m = -inf); then alpha is what the running output and
// sum are multiplied by, and the result is true.
inline bool advance(__m512& m, __m512 cmax, __m512& alpha) {
  if (!_mm512_cmplt_ps_mask(_mm512_add_ps(m, _mm512_set1_ps(RESCALE)), cmax)) return false;
  const __m512 mnew = _mm512_max_ps(m, cmax);
  alpha = exp2_16(_mm512_max_ps(_mm512_sub_ps(m, mnew), _mm512_set1_ps(-126.f)));  // m = -inf: 2^-126
  m = mnew;
  return true;
}

// All eight tiles as 16 rows of 64 bytes (what every kernel here uses), loaded on this thread.
inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

}  // namespace amx
#endif
