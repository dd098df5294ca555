// x @ W^T (+ bias) for the few rows of a decode step, on AMX tiles, bfloat16: the weight streamed
// once from memory per 64 rows of x, in the order the tiles read it.
//
// A decode step multiplies 1-64 rows by every weight of the model, so it is bound by how fast the
// weights stream from DRAM. oneDNN's prepacked matmul (packed_linear.py) read SmolLM2's layer
// weights at ~12 GB/s with 32 rows on this project's 2-core Xeon, where a plain sum streams
// ~25 GB/s (bench/decode_matmuls.py, docs/benchmarks.md). Here the weight is packed once (amx_pack) into 1 KB B tiles in
// the exact order they are consumed: each thread streams a contiguous range of it, ahead of which
// it prefetches, while the tiles' arithmetic (16 x 16 x 32 per instruction) stays far below the
// memory time.
// Layout of the packed weight [N/16, K/32, 16, 32]: for 16 outputs and 32 inputs, a B tile of 16
// rows (pairs of inputs) x 16 outputs x 2. Built by cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>
#include "amx.h"

#ifdef ALIGNEDSERVE_AMX
namespace {
using namespace amx;

constexpr int64_t ROWS = 64;     // rows of x per pass over the weight: four C tiles
constexpr int64_t AHEAD = 8192;  // bytes of the weight stream prefetched ahead of use

template <int MT>  // C tiles (16 rows each) in use: 1-4
void gemm_pass(const uint16_t* xb, int64_t K, const uint16_t* w, int64_t n_lo, int64_t n_hi, float* cbuf,
               const float* bias, uint16_t* out, float* out_f, int64_t o_row, int64_t rows) {
  const int64_t kb_count = K / 32;
  for (int64_t nb = n_lo; nb < n_hi; ++nb) {
    const uint16_t* wb = w + nb * kb_count * 512;
    _tile_zero(0);
    if (MT > 1) _tile_zero(1);
    if (MT > 2) _tile_zero(2);
    if (MT > 3) _tile_zero(3);
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const char* next = reinterpret_cast<const char*>(wb + kb * 512) + AHEAD;
      for (int b = 0; b < 1024; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      _tile_loadd(5, wb + kb * 512, 64);
      const uint16_t* xa = xb + kb * 32;
      _tile_loadd(4, xa, K * 2);
      _tile_dpbf16ps(0, 4, 5);
      if (MT > 1) { _tile_loadd(6, xa + 16 * K, K * 2); _tile_dpbf16ps(1, 6, 5); }
      if (MT > 2) { _tile_loadd(4, xa + 32 * K, K * 2); _tile_dpbf16ps(2, 4, 5); }
      if (MT > 3) { _tile_loadd(6, xa + 48 * K, K * 2); _tile_dpbf16ps(3, 6, 5); }
    }
    _tile_stored(0, cbuf, 64);
    if (MT > 1) _tile_stored(1, cbuf + 256, 64);
    if (MT > 2) _tile_stored(2, cbuf + 512, 64);
    if (MT > 3) _tile_stored(3, cbuf + 768, 64);
    const __m512 b = bias ? _mm512_loadu_ps(bias + nb * 16) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 y = _mm512_add_ps(_mm512_load_ps(cbuf + r * 16), b);
      if (out_f) _mm512_storeu_ps(out_f + r * o_row + nb * 16, y);  // float32 out: the sums unrounded
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * o_row + nb * 16), (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

}  // namespace
#endif

// Whether amx_linear runs here (AMX-BF16 built and granted).
bool amx_gemm_available() {
#ifdef ALIGNEDSERVE_AMX
  return amx::permitted();
#else
  return false;
#endif
}

// w [N, K] bfloat16, N a multiple of 16 and K of 32 -> the packed weight (header comment).
at::Tensor amx_pack(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "amx_pack: w [N, K] bfloat16");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "amx_pack: N must be a multiple of 16 and K of 32, got ", N, " x ", K);
  w = w.contiguous();
  auto packed = at::empty({N / 16, K / 32, 16, 32}, w.options());
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());  // pairs of inputs
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t nb = lo; nb < hi; ++nb)
      for (int64_t kb = 0; kb < K / 32; ++kb)
        for (int64_t p = 0; p < 16; ++p)
          for (int64_t n = 0; n < 16; ++n)
            dst[((nb * (K / 32) + kb) * 16 + p) * 16 + n] = src[(nb * 16 + n) * (K / 2) + kb * 16 + p];
  });
  return packed;
}

// x [M, K] bfloat16 (rows contiguous), packed from amx_pack, bias [N] or an empty tensor -> [M, N],
// bfloat16, or float32 with float_out (the float32 sums not rounded to bfloat16: logits).
at::Tensor amx_linear(at::Tensor x, at::Tensor packed, at::Tensor bias, bool float_out) {
  TORCH_CHECK(amx_gemm_available(), "amx_linear: this build or CPU has no AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
              packed.scalar_type() == at::kBFloat16, "amx_linear: x [M, K] and a packed weight, bfloat16");
  const int64_t M = x.size(0), K = packed.size(1) * 32, N = packed.size(0) * 16;
  TORCH_CHECK(x.size(1) == K, "amx_linear: x has ", x.size(1), " inputs, the weight ", K);
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || bias.numel() == N, "amx_linear: bias of ", N);
  auto out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
#ifdef ALIGNEDSERVE_AMX
  x = x.contiguous();
  at::Tensor bias_f = bias.defined() && bias.numel() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  // x in blocks of 64 rows, zero-padded to whole tiles of 16 (tile loads read 16 rows).
  thread_local std::vector<uint16_t> xbuf;  // the calling thread's; the workers read it through xp
  if (static_cast<int64_t>(xbuf.size()) < ROWS * K) xbuf.resize(ROWS * K);
  uint16_t* xp = xbuf.data();
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* o = float_out ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* of = float_out ? out.data_ptr<float>() : nullptr;
  const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
    const int64_t rows = std::min(ROWS, M - m0), tiles = (rows + 15) / 16;
    std::memcpy(xp, xs + m0 * K, rows * K * 2);
    std::memset(xp + rows * K, 0, (tiles * 16 - rows) * K * 2);
    at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
      configure();
      alignas(64) float cbuf[ROWS * 16];
      auto pass = tiles == 1 ? gemm_pass<1> : tiles == 2 ? gemm_pass<2> : tiles == 3 ? gemm_pass<3> : gemm_pass<4>;
      pass(xp, K, w, lo, hi, cbuf, bp, o ? o + m0 * N : nullptr, of ? of + m0 * N : nullptr, N, rows);
      _tile_release();
    });
  }
#endif
  return out;
}
