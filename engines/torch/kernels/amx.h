// What the AMX kernels share: whether this build has AMX-BF16 (ALIGNEDSERVE_AMX), the tile
// configuration, the process's permission to use the tiles, and (from simd.h) the online
// softmax's base-2 exp and rescaling step.
#pragma once
#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define ALIGNEDSERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

namespace amx {

// The online softmax's helpers (simd.h), shared with the AVX512-BF16 kernels.
using softmax::RESCALE;
using softmax::exp2_16;
using softmax::advance;

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

// All eight tiles as 16 rows of 64 bytes (what every kernel here uses), loaded on this thread.
inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

}  // namespace amx
#endif
