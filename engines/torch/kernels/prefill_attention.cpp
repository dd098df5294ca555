// Causal attention of a prompt (or of a chunk continuing cached KV) in bfloat16, on a CPU with AMX
// or with AVX512-BF16:
// query row i, at position offset + i (offset = keys - rows), sees keys 0..offset + i. The
// matrix products run on AMX tiles, the softmax in AVX-512, taken online over chunks of 64 keys
// (FlashAttention's rescaling), so no row's scores are ever held whole.
//
// - Everything is transposed (keys x query rows), so that the softmax runs across 16 query rows
//   per vector: running maxima and sums are vectors, no horizontal reductions. S^T = K Q^T with
//   K's rows read straight as A tiles and Q^T (pairs of head dimensions) as the B tile; O^T =
//   V^T P^T with V^T as A tiles and the weights P^T interleaved in pairs of keys as the B tile.
// - K and V^T of each KV head are packed once per call (zero-padded to whole chunks) and shared
//   by the query heads of the group (GQA without repeating K/V).
// - A task is 16 query rows of one head; tasks are handed out from a counter, the costliest
//   (latest rows: most keys) first, over torch's pool.
// - The next chunk's scores are issued to the tiles before this chunk's softmax, so the two
//   overlap; the output is rescaled only when a row's maximum outgrows the reference by more than
//   2^8 (softmax::advance). The weights are rounded to bfloat16 before multiplying V, as torch's CPU
//   flash attention does for bfloat16 inputs.
// - Without AMX (AMD Zen 4, Intel Cooper Lake), attend_avx512 does the same with AVX512-BF16 dot
//   products (vdpbf16ps) in place of the tiles: the same layouts, the same softmax.
// Measured (bench/prefill_attention.py, docs/benchmarks.md): ~2x torch's CPU flash attention on
// SmolLM2's 512- and 1,500-token prompts (9 query heads, 3 KV heads, head size 64, 30 layers) on
// AMX tiles (a Xeon), 3.0-4.0x with AVX512-BF16 (an AMD EPYC).
// Built by cpu_kernels.py; `prefill_attention_impl()` says which one this build and CPU run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#include "amx.h"

#if defined(__AVX512BF16__)
namespace {

constexpr int64_t KB = 16;     // keys per K tile
constexpr int64_t VB = 32;     // keys per V^T tile
constexpr int64_t CHUNK = 64;  // keys per softmax chunk: 4 score tiles
constexpr int64_t QB = 16;     // query rows per task: one A tile

// K of one KV head, contiguous rows of D, keys padded with zeros to whole tiles of 16: the A
// operand of S^T = K Q^T, read straight as tiles.
void pack_k(const uint16_t* k, int64_t k_row, uint16_t* dst, int64_t keys, int64_t padded, int64_t D) {
  for (int64_t key = 0; key < padded; ++key) {
    if (key < keys) std::memcpy(dst + key * D, k + key * k_row, D * 2);
    else std::memset(dst + key * D, 0, D * 2);
  }
}

// V of one KV head transposed, [D][padded keys], zeros past the end: the A operand of
// O^T = V^T P^T (16 dimensions x 32 keys a tile).
void pack_vt(const uint16_t* v, int64_t v_row, uint16_t* dst, int64_t keys, int64_t padded, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    uint16_t* row = dst + d * padded;
    for (int64_t key = 0; key < keys; ++key) row[key] = v[key * v_row + d];
    std::fill(row + keys, row + padded, 0);
  }
}

// One chunk's step of the online softmax, over S^T (key j's 16 query rows at s[j * 16], its first
// nk keys used): keys past some row's position (the diagonal chunk, unused keys past the last
// one) are masked; m and l (the rows' reference maximum, base 2, and running sum) move on; the
// weights 2^(s - m) <= 2^RESCALE (no overflow in float32) go to pt as P^T in pairs of keys (two
// keys' 16 weights interleaved, 32 bfloat16 a pair, zeros past nk up to the whole chunk). Returns
// whether the running output must be multiplied by alpha first (softmax::advance).
inline bool softmax_chunk(const float* s, int64_t c0, int64_t nk, int64_t first_pos, __m512i pos, __m512 scale_v,
                          __m512& m, __m512& l, __m512& alpha, uint16_t* pt) {
  alignas(64) static constexpr int16_t PAIRS[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(PAIRS);  // interleaves two keys' 16 weights
  const bool masked = c0 + CHUNK - 1 > first_pos;
  __mmask16 valid[CHUNK];
  __m512 cm[4] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY),
                  _mm512_set1_ps(-INFINITY)};  // four chains, not one 64 maxima long
  for (int64_t j = 0; j < nk; ++j) {
    valid[j] = masked ? _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int>(c0 + j)), pos) : 0xFFFF;
    cm[j % 4] = _mm512_mask_max_ps(cm[j % 4], valid[j], cm[j % 4], _mm512_load_ps(s + j * 16));
  }
  const __m512 cmax = _mm512_max_ps(_mm512_max_ps(cm[0], cm[1]), _mm512_max_ps(cm[2], cm[3]));
  alpha = _mm512_set1_ps(1.f);
  const bool rescale = softmax::advance(m, _mm512_mul_ps(cmax, scale_v), alpha);
  __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t j = 0; j < CHUNK; j += 2) {
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    if (j < nk) {
      p0 = _mm512_maskz_mov_ps(valid[j], softmax::exp2_16(_mm512_fmsub_ps(_mm512_load_ps(s + j * 16), scale_v, m)));
      p1 = _mm512_maskz_mov_ps(valid[j + 1],
                               softmax::exp2_16(_mm512_fmsub_ps(_mm512_load_ps(s + (j + 1) * 16), scale_v, m)));
      sums[0] = _mm512_add_ps(sums[0], p0);
      sums[1] = _mm512_add_ps(sums[1], p1);
    }
    _mm512_store_si512(pt + j * 16, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
  }
  l = _mm512_fmadd_ps(l, alpha, _mm512_add_ps(sums[0], sums[1]));
  return rescale;
}

// Q^T of 16 query rows of one head, in pairs of dimensions: pair p of row n at qt[p * 16 + n].
// Lane n reads row n; pad rows past nr repeat the last row (their output is not written).
template <int D>
inline void gather_qt(const uint16_t* q, int64_t q_row, int64_t r0, int64_t nr, int64_t h, uint32_t* qt) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row = _mm512_mullo_epi32(_mm512_min_epi32(lane, _mm512_set1_epi32(static_cast<int>(nr - 1))),
                                         _mm512_set1_epi32(static_cast<int>(q_row / 2)));
  const int* base = reinterpret_cast<const int*>(q + r0 * q_row + h * D);
  for (int p = 0; p < D / 2; ++p) _mm512_store_si512(qt + p * 16, _mm512_i32gather_epi32(row, base + p, 4));
}

// The same computation as attend_amx below (read its comments), with AVX512-BF16 dot products
// (vdpbf16ps: 16 float32 lanes, each += two bfloat16 products) in place of the tiles, for CPUs
// with AVX512-BF16 and no AMX (AMD Zen 4, Intel Cooper Lake). Lanes are query rows: S^T of one
// key is Q^T's pairs of dimensions times that key's pairs (broadcast); O^T of one dimension is
// P^T's pairs of keys times that dimension's values of the two keys (broadcast from V^T).
template <int D>
void attend_avx512(const uint16_t* q, int64_t q_row, const uint16_t* kp, const uint16_t* vt, uint16_t* out,
                   int64_t o_row, int64_t rows, int64_t keys, int64_t padded, int64_t heads, int64_t kvh, float scale) {
  const int64_t offset = keys - rows, G = heads / kvh;
  const int64_t q_blocks = (rows + QB - 1) / QB, tasks = q_blocks * heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    alignas(64) uint32_t qt[D / 2 * 16];
    alignas(64) float s[CHUNK * QB];        // S^T of a chunk: key j's 16 rows at s[j * 16]
    alignas(64) uint16_t pt[CHUNK * QB];    // P^T in pairs of keys: pair i of row n at pt[(i * 16 + n) * 2]
    alignas(64) float ot[D * QB];           // the running O^T, unnormalized
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 scale_v = _mm512_set1_ps(scale * 1.44269504088896341f);
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t qb = q_blocks - 1 - task / heads, h = task % heads, kh = h / G;
      const int64_t r0 = qb * QB, nr = std::min(QB, rows - r0);
      gather_qt<D>(q, q_row, r0, nr, h, qt);
      const __m512i pos = _mm512_add_epi32(_mm512_min_epi32(lane, _mm512_set1_epi32(static_cast<int>(nr - 1))),
                                           _mm512_set1_epi32(static_cast<int>(offset + r0)));
      const int64_t first_pos = offset + r0, last_key = offset + r0 + nr - 1;
      std::fill(ot, ot + D * QB, 0.f);
      __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
      // Key j's pair of dimensions p at kh_p[j * D / 2 + p].
      const uint32_t* kh_p = reinterpret_cast<const uint32_t*>(kp + kh * padded * D);
      const uint16_t* vh_t = vt + kh * padded * D;
      for (int64_t c0 = 0; c0 <= last_key; c0 += CHUNK) {
        const int64_t nk = std::min<int64_t>(CHUNK / KB, (last_key - c0) / KB + 1) * KB;  // whole groups of 16
        for (int64_t j = 0; j < nk; j += 8) {  // eight keys at a time: eight chains of products
          __m512 acc[8];
          for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
          const uint32_t* kj = kh_p + (c0 + j) * (D / 2);
          for (int p = 0; p < D / 2; ++p) {
            const __m512bh qv = (__m512bh)_mm512_load_si512(qt + p * 16);
            for (int t = 0; t < 8; ++t)
              acc[t] = _mm512_dpbf16_ps(acc[t], qv, (__m512bh)_mm512_set1_epi32(static_cast<int>(kj[t * (D / 2) + p])));
          }
          for (int t = 0; t < 8; ++t) _mm512_store_ps(s + (j + t) * 16, acc[t]);
        }
        __m512 alpha;
        const bool rescale = softmax_chunk(s, c0, nk, first_pos, pos, scale_v, m, l, alpha, pt);
        // O^T += V^T P^T, sixteen dimensions at a time (sixteen accumulators).
        for (int d0 = 0; d0 < D; d0 += 16) {
          __m512 o[16];
          for (int t = 0; t < 16; ++t) {
            o[t] = _mm512_load_ps(ot + (d0 + t) * 16);
            if (rescale) o[t] = _mm512_mul_ps(o[t], alpha);
          }
          for (int64_t i = 0; i < nk / 2; ++i) {
            const __m512bh pv = (__m512bh)_mm512_load_si512(pt + i * 32);
            const uint16_t* vk = vh_t + c0 + 2 * i;  // dimension d's two keys at vk[d * padded]
            for (int t = 0; t < 16; ++t)
              o[t] = _mm512_dpbf16_ps(o[t], pv, (__m512bh)_mm512_set1_epi32(
                                                    *reinterpret_cast<const int*>(vk + (d0 + t) * padded)));
          }
          for (int t = 0; t < 16; ++t) _mm512_store_ps(ot + (d0 + t) * 16, o[t]);
        }
      }
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
      const __m512i col = _mm512_mullo_epi32(lane, _mm512_set1_epi32(16));
      for (int d = 0; d < D; ++d) _mm512_store_ps(ot + d * 16, _mm512_mul_ps(_mm512_load_ps(ot + d * 16), inv));
      for (int64_t n = 0; n < nr; ++n) {
        uint16_t* dst = out + (r0 + n) * o_row + h * D;
        for (int d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(col, ot + d * 16 + n, 4)));
      }
    }
  });
}

}  // namespace
#endif

#ifdef ALIGNEDSERVE_AMX
namespace {
using namespace amx;

// The whole computation is transposed (keys x query rows) so that the softmax runs across 16
// query rows per vector: running maxima and sums are vectors, no horizontal reductions.
template <int D>
void attend_amx(const uint16_t* q, int64_t q_row, const uint16_t* kp, const uint16_t* vt, uint16_t* out,
                int64_t o_row, int64_t rows, int64_t keys, int64_t padded, int64_t heads, int64_t kvh, float scale) {
  constexpr int HALVES = D / 32, PARTS = D / 16;
  const int64_t offset = keys - rows, G = heads / kvh;
  const int64_t q_blocks = (rows + QB - 1) / QB, tasks = q_blocks * heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    configure();
    alignas(64) uint32_t qt[HALVES][16 * 16];  // Q^T in pairs of dimensions: the B operand of S^T
    alignas(64) float sbuf[2][CHUNK * QB];     // two chunks' S^T: one vector of 16 query rows per key
    alignas(64) uint16_t pt[CHUNK * QB];       // its weights P^T in pairs of keys (two B tiles)
    alignas(64) float ot[D * QB];              // the running O^T, unnormalized
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 scale_v = _mm512_set1_ps(scale * 1.44269504088896341f);  // scores in base-2 units
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t qb = q_blocks - 1 - task / heads, h = task % heads, kh = h / G;
      const int64_t r0 = qb * QB, nr = std::min(QB, rows - r0);
      {  // Q^T of the task's rows, gathered: lane n reads row n (pad rows repeat the last)
        const __m512i row = _mm512_mullo_epi32(_mm512_min_epi32(lane, _mm512_set1_epi32(static_cast<int>(nr - 1))),
                                               _mm512_set1_epi32(static_cast<int>(q_row / 2)));
        const int* base = reinterpret_cast<const int*>(q + r0 * q_row + h * D);
        for (int hf = 0; hf < HALVES; ++hf)
          for (int p = 0; p < 16; ++p)
            _mm512_store_si512(qt[hf] + p * 16, _mm512_i32gather_epi32(row, base + hf * 16 + p, 4));
      }
      // Row n's position; pad rows repeat the last row (their output is not written).
      const __m512i pos = _mm512_add_epi32(_mm512_min_epi32(lane, _mm512_set1_epi32(static_cast<int>(nr - 1))),
                                           _mm512_set1_epi32(static_cast<int>(offset + r0)));
      const int64_t first_pos = offset + r0, last_key = offset + r0 + nr - 1;
      std::fill(ot, ot + D * QB, 0.f);
      __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();  // scaled running max, sum
      const uint16_t* kh_p = kp + kh * padded * D;
      const uint16_t* vh_t = vt + kh * padded * D;
      // S^T of the chunk at c0 (keys c0.. up to last_key) into dst: four tiles of 16 keys.
      auto scores = [&](int64_t c0, float* dst) {
        const int64_t nkb = std::min<int64_t>(CHUNK / KB, (last_key - c0) / KB + 1);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const uint16_t* kc = kh_p + c0 * D;
        for (int hf = 0; hf < HALVES; ++hf) {
          _tile_loadd(4, qt[hf], 64);
          _tile_loadd(5, kc + hf * 32, D * 2);
          _tile_dpbf16ps(0, 5, 4);
          if (nkb > 1) { _tile_loadd(6, kc + 16 * D + hf * 32, D * 2); _tile_dpbf16ps(1, 6, 4); }
          if (nkb > 2) { _tile_loadd(5, kc + 32 * D + hf * 32, D * 2); _tile_dpbf16ps(2, 5, 4); }
          if (nkb > 3) { _tile_loadd(6, kc + 48 * D + hf * 32, D * 2); _tile_dpbf16ps(3, 6, 4); }
        }
        _tile_stored(0, dst, 64);
        _tile_stored(1, dst + 256, 64);
        _tile_stored(2, dst + 512, 64);
        _tile_stored(3, dst + 768, 64);
      };
      scores(0, sbuf[0]);
      for (int64_t c0 = 0, i = 0; c0 <= last_key; c0 += CHUNK, ++i) {
        const int64_t nkb = std::min<int64_t>(CHUNK / KB, (last_key - c0) / KB + 1), nk = nkb * KB;
        const float* s = sbuf[i & 1];
        // The next chunk's scores first: the tiles compute them while the vector units take
        // this chunk's softmax.
        if (c0 + CHUNK <= last_key) scores(c0 + CHUNK, sbuf[(i + 1) & 1]);
        __m512 alpha;
        const bool rescale = softmax_chunk(s, c0, nk, first_pos, pos, scale_v, m, l, alpha, pt);
        if (rescale)
          for (int d = 0; d < D; ++d) _mm512_store_ps(ot + d * 16, _mm512_mul_ps(_mm512_load_ps(ot + d * 16), alpha));
        // O^T (D x 16) += V^T (D x keys) P^T (keys x 16), four tiles of 16 dimensions at a time.
        const int64_t nvb = (nk + VB - 1) / VB;
        for (int g = 0; g < PARTS; g += 4) {
          _tile_loadd(0, ot + g * 256, 64);
          _tile_loadd(1, ot + (g + 1) * 256, 64);
          _tile_loadd(2, ot + (g + 2) * 256, 64);
          _tile_loadd(3, ot + (g + 3) * 256, 64);
          for (int64_t b = 0; b < nvb; ++b) {
            _tile_loadd(4, pt + b * 512, 64);
            const uint16_t* va = vh_t + g * 16 * padded + c0 + b * VB;
            _tile_loadd(5, va, padded * 2);
            _tile_dpbf16ps(0, 5, 4);
            _tile_loadd(6, va + 16 * padded, padded * 2);
            _tile_dpbf16ps(1, 6, 4);
            _tile_loadd(5, va + 32 * padded, padded * 2);
            _tile_dpbf16ps(2, 5, 4);
            _tile_loadd(6, va + 48 * padded, padded * 2);
            _tile_dpbf16ps(3, 6, 4);
          }
          _tile_stored(0, ot + g * 256, 64);
          _tile_stored(1, ot + (g + 1) * 256, 64);
          _tile_stored(2, ot + (g + 2) * 256, 64);
          _tile_stored(3, ot + (g + 3) * 256, 64);
        }
      }
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
      for (int d = 0; d < D; ++d) _mm512_store_ps(ot + d * 16, _mm512_mul_ps(_mm512_load_ps(ot + d * 16), inv));
      const __m512i col = _mm512_mullo_epi32(lane, _mm512_set1_epi32(16));
      for (int64_t n = 0; n < nr; ++n) {
        uint16_t* dst = out + (r0 + n) * o_row + h * D;
        for (int d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(col, ot + d * 16 + n, 4)));
      }
    }
    _tile_release();
  });
}

}  // namespace
#endif

// Which implementation prefill_attention takes with impl "auto": "amx" (built with AMX-BF16 and
// the kernel granted its tiles), else "avx512" (built with AVX512-BF16), else "" (none here).
std::string prefill_attention_impl() {
#ifdef ALIGNEDSERVE_AMX
  if (amx::permitted()) return "amx";
#endif
#if defined(__AVX512BF16__)
  return "avx512";
#else
  return "";
#endif
}

// Whether prefill_attention runs here (on AMX tiles or with AVX512-BF16 dot products).
bool prefill_attention_available() { return !prefill_attention_impl().empty(); }

// q [rows, heads, D], k and v [keys, kv_heads, D] (keys >= rows; the last dimension contiguous),
// bfloat16, D 64 or 128; writes the attention into out [rows, heads, D] (a view is fine).
// impl: "auto" (prefill_attention_impl()), "amx" or "avx512" (refused where not built or allowed).
void prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, double scale,
                       const std::string& impl) {
  const std::string best = prefill_attention_impl();
  TORCH_CHECK(!best.empty(), "prefill_attention: this build or CPU has neither AMX-BF16 nor AVX512-BF16");
  TORCH_CHECK(impl == "auto" || impl == "amx" || impl == "avx512",
              "prefill_attention: impl is auto, amx or avx512, not ", impl);
  TORCH_CHECK(impl != "amx" || best == "amx", "prefill_attention: no AMX-BF16 here");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.sizes() == q.sizes(), "prefill_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "prefill_attention: bfloat16 only");
  const int64_t rows = q.size(0), heads = q.size(1), D = q.size(2), keys = k.size(0), kvh = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == D && heads % kvh == 0 && keys >= rows && rows > 0,
              "prefill_attention: head layout mismatch");
  TORCH_CHECK(D == 64 || D == 128, "prefill_attention: head size 64 or 128");
  for (const auto& t : {q, k, v, out})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == D, "prefill_attention: heads must be contiguous in a row");
#if defined(__AVX512BF16__)
  const int64_t padded = (keys + CHUNK - 1) / CHUNK * CHUNK;  // whole chunks: every load in bounds
  std::vector<uint16_t> kp(kvh * padded * D), vt(kvh * padded * D);
  auto as16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  at::parallel_for(0, 2 * kvh, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t h = i / 2;
      if (i % 2 == 0) pack_k(as16(k) + h * D, k.stride(0), kp.data() + h * padded * D, keys, padded, D);
      else pack_vt(as16(v) + h * D, v.stride(0), vt.data() + h * padded * D, keys, padded, D);
    }
  });
  auto run = D == 64 ? attend_avx512<64> : attend_avx512<128>;
#ifdef ALIGNEDSERVE_AMX
  if (best == "amx" && impl != "avx512") run = D == 64 ? attend_amx<64> : attend_amx<128>;
#endif
  run(as16(q), q.stride(0), kp.data(), vt.data(), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
      out.stride(0), rows, keys, padded, heads, kvh, static_cast<float>(scale));
#endif
}
