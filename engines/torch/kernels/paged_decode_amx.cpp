// Decode attention straight from the paged KV cache with the scores on AMX tiles (bfloat16, up
// to 16 query heads, head size 64 or 128, blocks of a multiple of 16 tokens): the same contract as
// paged_decode.cpp's kernels, which take every other case.
//
// Per row (one task, longest rows first, as in paged_decode.cpp) and chunk of CHUNK tokens:
// - S^T, 16 tokens x 16 heads a tile: each KV head's 16 K rows are read from their block as an A
//   tile, times that head's queries as a B tile (its G query heads' columns, zeros elsewhere), all
//   KV heads accumulating into one tile. The vectorized kernel spent most of its time on these
//   dot products and their horizontal sums (one per token and head).
// - The online softmax runs down the tokens with the 16 heads in the lanes of one vector: one exp
//   per token for every head, maxima and sums without horizontal reductions.
// - The weighted sum of V stays in AVX-512 float32 (V rows as the cache holds them).
// - K and V rows are prefetched into L2, not L1: L1 prefetches of whole chunks stalled on the
//   fill buffers (perf put 58% of the samples on prefetcht0).
// Measured (bench/attention_paths.py, docs/benchmarks.md). Built by cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>
#include "amx.h"

#ifdef ALIGNEDSERVE_AMX
namespace {
using namespace amx;

constexpr int64_t TOKENS = 16;  // tokens per score tile
constexpr int64_t CHUNK = 256;  // tokens per chunk of the online softmax: 16 KB of scores

template <int HD, int G>
void decode(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* tables,
            const int64_t* lens, uint16_t* out, int64_t rows, int64_t kvh, int64_t bs, int64_t max_blocks, float scale) {
  constexpr int V = HD / 16, HALVES = HD / 32;
  const int64_t heads = kvh * G;
  const int64_t block_stride = bs * kvh * HD, token_stride = kvh * HD;
  std::vector<int64_t> order(rows);  // longest rows first: the long tasks start early
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  std::atomic<int64_t> next{0};
  const __m512 scale2 = _mm512_set1_ps(scale * 1.44269504088896341f);  // scores in base-2 units
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    configure();
    std::vector<uint32_t> qt(kvh * HALVES * 256);  // per KV head and 32 dimensions: a B tile of Q^T
    std::vector<float> acc(16 * HD);               // the running output, one row per head
    alignas(64) float s[CHUNK * 16];               // the chunk's S^T, then its weights
    alignas(64) float alpha_l[16];
    auto row_of = [&](const int64_t* table, const uint16_t* cache, int64_t t) {
      return cache + table[t / bs] * block_stride + (t % bs) * token_stride;
    };
    for (int64_t task = next++; task < rows; task = next++) {
      const int64_t r = order[task], L = lens[r];
      const int64_t* table = tables + r * max_blocks;
      std::fill(qt.begin(), qt.end(), 0u);
      for (int64_t h = 0; h < kvh; ++h)
        for (int hf = 0; hf < HALVES; ++hf) {
          uint32_t* tile = qt.data() + (h * HALVES + hf) * 256;
          for (int g = 0; g < G; ++g) {
            const int64_t col = h * G + g;
            const uint32_t* src = reinterpret_cast<const uint32_t*>(q + (r * heads + col) * HD) + hf * 16;
            for (int p = 0; p < 16; ++p) tile[p * 16 + col] = src[p];
          }
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
      for (int64_t t = 0; t < std::min(L, CHUNK); ++t)
        prefetch_row<_MM_HINT_T1>(row_of(table, k_cache, t), token_stride * 2);
      for (int64_t c0 = 0; c0 < L; c0 += CHUNK) {
        const int64_t n = std::min(CHUNK, L - c0);
        for (int64_t i = 0; i * TOKENS < n; ++i) {  // 16 tokens of one block (bs is a multiple of 16)
          const uint16_t* krows = row_of(table, k_cache, c0 + i * TOKENS);
          prefetch_row<_MM_HINT_T1>(row_of(table, v_cache, c0 + i * TOKENS), TOKENS * token_stride * 2);  // this chunk's V
          _tile_zero(0);
          for (int64_t h = 0; h < kvh; ++h)
            for (int hf = 0; hf < HALVES; ++hf) {
              _tile_loadd(1, krows + h * HD + hf * 32, token_stride * 2);
              _tile_loadd(2, qt.data() + (h * HALVES + hf) * 256, 64);
              _tile_dpbf16ps(0, 1, 2);
            }
          _tile_stored(0, s + i * TOKENS * 16, 64);
        }
        // Softmax down the tokens, the heads in the lanes; tokens past L (the tile's tail) unread.
        __m512 cm[4] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY),
                        _mm512_set1_ps(-INFINITY)};
        for (int64_t t = 0; t < n; ++t) cm[t % 4] = _mm512_max_ps(cm[t % 4], _mm512_load_ps(s + t * 16));
        __m512 alpha = _mm512_set1_ps(1.f);
        if (advance(m, _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(cm[0], cm[1]), _mm512_max_ps(cm[2], cm[3])), scale2),
                    alpha)) {
          l = _mm512_mul_ps(l, alpha);
          _mm512_store_ps(alpha_l, alpha);
          for (int64_t col = 0; col < heads; ++col)
            for (int i = 0; i < V; ++i)
              _mm512_storeu_ps(acc.data() + col * HD + i * 16,
                               _mm512_mul_ps(_mm512_loadu_ps(acc.data() + col * HD + i * 16), _mm512_set1_ps(alpha_l[col])));
        }
        __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t t = 0; t < n; ++t) {
          const __m512 p = exp2_16(_mm512_fmsub_ps(_mm512_load_ps(s + t * 16), scale2, m));
          _mm512_store_ps(s + t * 16, p);
          sums[t % 2] = _mm512_add_ps(sums[t % 2], p);
        }
        l = _mm512_add_ps(l, _mm512_add_ps(sums[0], sums[1]));
        for (int64_t t = c0 + CHUNK; t < std::min(L, c0 + 2 * CHUNK); ++t)  // the next chunk's K
          prefetch_row<_MM_HINT_T1>(row_of(table, k_cache, t), token_stride * 2);
        // Weighted sum of the chunk's V, each V row read once for its G heads.
        for (int64_t h = 0; h < kvh; ++h) {
          __m512 ac[G][V];
          for (int g = 0; g < G; ++g)
            for (int i = 0; i < V; ++i) ac[g][i] = _mm512_loadu_ps(acc.data() + (h * G + g) * HD + i * 16);
          for (int64_t t = 0; t < n; ++t) {
            const uint16_t* vrow = row_of(table, v_cache, c0 + t) + h * HD;
            __m512 vv[V];
            for (int i = 0; i < V; ++i) vv[i] = load16(reinterpret_cast<const c10::BFloat16*>(vrow) + i * 16);
            for (int g = 0; g < G; ++g) {
              const __m512 w = _mm512_set1_ps(s[t * 16 + h * G + g]);
              for (int i = 0; i < V; ++i) ac[g][i] = _mm512_fmadd_ps(w, vv[i], ac[g][i]);
            }
          }
          for (int g = 0; g < G; ++g)
            for (int i = 0; i < V; ++i) _mm512_storeu_ps(acc.data() + (h * G + g) * HD + i * 16, ac[g][i]);
        }
      }
      _mm512_store_ps(alpha_l, _mm512_div_ps(_mm512_set1_ps(1.f), l));
      for (int64_t col = 0; col < heads; ++col) {
        uint16_t* dst = out + (r * heads + col) * HD;
        for (int i = 0; i < V; ++i)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + col * HD + i * 16),
                                                                         _mm512_set1_ps(alpha_l[col]))));
      }
    }
    _tile_release();
  });
}

template <int HD>
using Fn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*, const int64_t*, uint16_t*,
                    int64_t, int64_t, int64_t, int64_t, float);

template <int HD>
Fn<HD> pick(int64_t G) {
  switch (G) {
    case 1: return decode<HD, 1>;
    case 2: return decode<HD, 2>;
    case 3: return decode<HD, 3>;
    case 4: return decode<HD, 4>;
    case 8: return decode<HD, 8>;
    default: return nullptr;
  }
}

}  // namespace
#endif

// Whether decode_amx takes this case: bfloat16 (the caller's check), AMX granted, head size 64 or
// 128, at most 16 query heads in groups of 1-4 or 8 per KV head, blocks of a multiple of 16 tokens.
bool decode_amx_applies(int64_t heads, int64_t kvh, int64_t hd, int64_t bs) {
#ifdef ALIGNEDSERVE_AMX
  const int64_t G = heads / kvh;
  return permitted() && (hd == 64 || hd == 128) && heads <= 16 && bs % TOKENS == 0 &&
         (G == 1 || G == 2 || G == 3 || G == 4 || G == 8);
#else
  return false;
#endif
}

// q [rows, heads, hd] and out contiguous; kv as paged_decode takes it. Only where decode_amx_applies.
void decode_amx(const at::BFloat16* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* tables,
                const int64_t* lens, at::BFloat16* out, int64_t rows, int64_t heads, int64_t kvh, int64_t hd, int64_t bs,
                int64_t max_blocks, float scale) {
#ifdef ALIGNEDSERVE_AMX
  auto u16 = [](const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
  const int64_t G = heads / kvh;
  auto* o = reinterpret_cast<uint16_t*>(out);
  if (hd == 64) pick<64>(G)(u16(q), u16(k_cache), u16(v_cache), tables, lens, o, rows, kvh, bs, max_blocks, scale);
  else pick<128>(G)(u16(q), u16(k_cache), u16(v_cache), tables, lens, o, rows, kvh, bs, max_blocks, scale);
#else
  TORCH_CHECK(false, "decode_amx: this build has no AMX-BF16");
#endif
}
