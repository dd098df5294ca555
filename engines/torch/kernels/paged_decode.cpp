// Decode attention straight from the paged KV cache, on CPU: each query row (one decode token)
// attends to the first kv_lens[row] tokens of its sequence, read block by block through its
// block table, without gathering them into a padded tensor first. Scores and sums in float32.
// One task per row, longest rows first, handed out from a counter on torch's pool; each token's
// K and V rows read once for every head. Two implementations of the same arithmetic here, and a
// third, with the scores on AMX tiles, in paged_decode_amx.cpp (bfloat16 on a CPU with AMX-BF16:
// what `impl="auto"` takes first where it applies):
// - decode_avx512 (a CPU with AVX-512; float32, bfloat16 or float16; head size 64 or 128; up to
//   8 query heads per KV head): 16-wide float32 FMAs, a vectorized exp (exp16), and the softmax
//   taken online over chunks of CHUNK_TOKENS tokens (FlashDecoding's rescaling), so a chunk's
//   scores stay in L1 whatever the sequence's length;
// - decode_impl (any other case): two passes over the whole sequence, loops the compiler
//   vectorizes as it can.
// Measured (bench/attention_paths.py, docs/benchmarks.md): decode_avx512 is 5-15% faster; both
// read the KV at 10-16 GB/s of the ~25 GB/s two cores stream, the rest is the scores' compute
// (about 10 ms of a 32-row step with every block in cache) not overlapping the loads.
// Built by cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>
#include "simd.h"

bool decode_amx_applies(int64_t heads, int64_t kvh, int64_t hd, int64_t bs);
void decode_amx(const at::BFloat16* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache, const int64_t* tables,
                const int64_t* lens, at::BFloat16* out, int64_t rows, int64_t heads, int64_t kvh, int64_t hd, int64_t bs,
                int64_t max_blocks, float scale);

template <typename T, int64_t HD>
static void decode_impl(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                        const int64_t* lens, T* out, int64_t rows, int64_t heads, int64_t kvh,
                        int64_t hd_runtime, int64_t bs, int64_t max_blocks, float scale) {
  // HD > 0: the head size as a compile-time constant (fully unrolled, vectorized loops).
  const int64_t hd = HD > 0 ? HD : hd_runtime;
  const int64_t G = heads / kvh;
  const int64_t block_stride = bs * kvh * hd;
  const int64_t token_stride = kvh * hd;
  // One task per row: a token's K (or V) row of every KV head is read once, contiguously. Tasks
  // are handed out one at a time from a counter (rows differ in length), on torch's own pool.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> qf(heads * hd), acc(heads * hd), kf(hd), scores;
    for (int64_t r = next++; r < rows; r = next++) {
      const int64_t L = lens[r];
      const int64_t* table = tables + r * max_blocks;
      scores.resize(heads * L);
      for (int64_t i = 0; i < heads * hd; ++i) qf[i] = static_cast<float>(q[r * heads * hd + i]) * scale;
      for (int64_t t = 0; t < L; ++t) {
        const T* krow = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        for (int64_t h = 0; h < kvh; ++h) {
          for (int64_t d = 0; d < hd; ++d) kf[d] = static_cast<float>(krow[h * hd + d]);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + (h * G + g) * hd;
            float dot = 0.f;
            for (int64_t d = 0; d < hd; ++d) dot += qg[d] * kf[d];
            scores[(h * G + g) * L + t] = dot;
          }
        }
      }
      std::vector<float> inv(heads);
      for (int64_t i = 0; i < heads; ++i) {
        float* s = scores.data() + i * L;
        const float m = *std::max_element(s, s + L);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
        inv[i] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* vrow = v_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        for (int64_t h = 0; h < kvh; ++h) {
          for (int64_t d = 0; d < hd; ++d) kf[d] = static_cast<float>(vrow[h * hd + d]);
          for (int64_t g = 0; g < G; ++g) {
            const float w = scores[(h * G + g) * L + t];
            float* a = acc.data() + (h * G + g) * hd;
            for (int64_t d = 0; d < hd; ++d) a[d] += w * kf[d];
          }
        }
      }
      for (int64_t i = 0; i < heads; ++i)
        for (int64_t d = 0; d < hd; ++d)
          out[(r * heads + i) * hd + d] = static_cast<T>(acc[i * hd + d] * inv[i]);
    }
  });
}


#if defined(__AVX512F__)
// Tokens per chunk of the online softmax: 9 heads' scores of 256 tokens are 9 KB, well inside L1;
// 64-512 measured within noise of each other on this project's Xeon.
constexpr int64_t CHUNK_TOKENS = 256;

template <typename T, int HD, int G>
static void decode_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                          const int64_t* lens, T* out, int64_t rows, int64_t kvh, int64_t bs,
                          int64_t max_blocks, float scale) {
  constexpr int V = HD / 16;  // 16-float vectors per head
  const int64_t heads = kvh * G;
  const int64_t block_stride = bs * kvh * HD, token_stride = kvh * HD;
  // Tokens per chunk: whole blocks, about CHUNK_TOKENS, so that a chunk's scores stay in L1.
  const int64_t chunk = std::max<int64_t>(1, CHUNK_TOKENS / bs) * bs;
  std::vector<int64_t> order(rows);  // longest rows first: the long tasks start early
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(heads * chunk), qf(heads * HD), acc(heads * HD), mx(heads), sum(heads);
    for (int64_t task = next++; task < rows; task = next++) {
      const int64_t r = order[task], L = lens[r];
      const int64_t* table = tables + r * max_blocks;
      for (int64_t i = 0; i < heads * HD; i += 16)
        _mm512_storeu_ps(qf.data() + i, _mm512_mul_ps(load16(q + r * heads * HD + i), _mm512_set1_ps(scale)));
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c0 = 0; c0 < L; c0 += chunk) {  // online softmax over chunks of the sequence
        const int64_t cn = std::min(chunk, L - c0);
        float cmax[64];  // the caller takes this path only for heads <= 64
        for (int64_t hg = 0; hg < heads; ++hg) cmax[hg] = -INFINITY;
        // Scores of the chunk: q . k for every token and head, each K row read once for its G heads.
        for (int64_t j = 0; j < cn; ++j) {
          const int64_t t = c0 + j;
          const T* krow = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
          prefetch_row(v_cache + table[t / bs] * block_stride + (t % bs) * token_stride, token_stride * sizeof(T));
          for (int64_t h = 0; h < kvh; ++h) {
            __m512 kv[V];
            for (int i = 0; i < V; ++i) kv[i] = load16(krow + h * HD + i * 16);
            for (int g = 0; g < G; ++g) {
              const float* qg = qf.data() + (h * G + g) * HD;
              __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[0]);
              for (int i = 1; i < V; ++i) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i * 16), kv[i], a);
              const float sc = _mm512_reduce_add_ps(a);
              scores[(h * G + g) * chunk + j] = sc;
              cmax[h * G + g] = std::max(cmax[h * G + g], sc);
            }
          }
        }
        // Rescale what came before to the new running max; exp of this chunk's scores.
        for (int64_t hg = 0; hg < heads; ++hg) {
          const float m = std::max(mx[hg], cmax[hg]);
          const float alpha = std::exp(mx[hg] - m);  // 0 on the first chunk (exp(-inf))
          mx[hg] = m;
          float* a = acc.data() + hg * HD;
          for (int i = 0; i < V; ++i)
            _mm512_storeu_ps(a + i * 16, _mm512_mul_ps(_mm512_loadu_ps(a + i * 16), _mm512_set1_ps(alpha)));
          float* s = scores.data() + hg * chunk;
          const __m512 mv = _mm512_set1_ps(m);
          __m512 sv = _mm512_setzero_ps();
          int64_t t = 0;
          for (; t + 16 <= cn; t += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
            _mm512_storeu_ps(s + t, e);
            sv = _mm512_add_ps(sv, e);
          }
          if (t < cn) {
            const __mmask16 k = static_cast<__mmask16>((1u << (cn - t)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), mv));
            _mm512_mask_storeu_ps(s + t, k, e);
            sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
          }
          sum[hg] = sum[hg] * alpha + _mm512_reduce_add_ps(sv);
        }
        // Weighted sum of the chunk's V, each V row read once for its G heads.
        for (int64_t t = c0 + chunk; t < std::min(L, c0 + 2 * chunk); ++t)  // the next chunk's K
          prefetch_row(k_cache + table[t / bs] * block_stride + (t % bs) * token_stride, token_stride * sizeof(T));
        for (int64_t h = 0; h < kvh; ++h) {
          __m512 ac[G][V];  // this KV head's G accumulators stay in registers over the chunk
          for (int g = 0; g < G; ++g)
            for (int i = 0; i < V; ++i) ac[g][i] = _mm512_loadu_ps(acc.data() + (h * G + g) * HD + i * 16);
          for (int64_t j = 0; j < cn; ++j) {
            const int64_t t = c0 + j;
            const T* vrow = v_cache + table[t / bs] * block_stride + (t % bs) * token_stride + h * HD;
            __m512 vv[V];
            for (int i = 0; i < V; ++i) vv[i] = load16(vrow + i * 16);
            for (int g = 0; g < G; ++g) {
              const __m512 w = _mm512_set1_ps(scores[(h * G + g) * chunk + j]);
              for (int i = 0; i < V; ++i) ac[g][i] = _mm512_fmadd_ps(w, vv[i], ac[g][i]);
            }
          }
          for (int g = 0; g < G; ++g)
            for (int i = 0; i < V; ++i) _mm512_storeu_ps(acc.data() + (h * G + g) * HD + i * 16, ac[g][i]);
        }
      }
      for (int64_t hg = 0; hg < heads; ++hg) {
        T* dst = out + (r * heads + hg) * HD;
        const float inv = 1.f / sum[hg];
        for (int d = 0; d < HD; ++d) dst[d] = static_cast<T>(acc[hg * HD + d] * inv);
      }
    }
  });
}

// The vectorized kernel for this head size and group, or nullptr where there is none.
template <typename T>
using DecodeFn = void (*)(const T*, const T*, const T*, const int64_t*, const int64_t*, T*, int64_t, int64_t,
                          int64_t, int64_t, float);

template <typename T, int HD>
static DecodeFn<T> pick_group(int64_t G) {
  switch (G) {
    case 1: return decode_avx512<T, HD, 1>;
    case 2: return decode_avx512<T, HD, 2>;
    case 3: return decode_avx512<T, HD, 3>;
    case 4: return decode_avx512<T, HD, 4>;
    case 5: return decode_avx512<T, HD, 5>;
    case 6: return decode_avx512<T, HD, 6>;
    case 7: return decode_avx512<T, HD, 7>;
    case 8: return decode_avx512<T, HD, 8>;
    default: return nullptr;
  }
}

template <typename T>
static DecodeFn<T> pick_avx512(int64_t hd, int64_t G) {
  if constexpr (std::is_same_v<T, double>) return nullptr;  // float64 keeps the portable loops
  else return hd == 64 ? pick_group<T, 64>(G) : hd == 128 ? pick_group<T, 128>(G) : nullptr;
}
#endif

// q [rows, heads, hd]; kv_blocks [2, num_blocks, block_size, kv_heads, hd] (K then V);
// block_tables [rows, max_blocks] int64; kv_lens [rows] int64 (each >= 1). Returns [rows, heads, hd].
// impl: "auto" (the fastest that applies: decode_amx, decode_avx512, decode_impl), or one of
// "amx", "avx512", "portable" (an error where it does not apply; the tests compare them).
at::Tensor paged_decode(at::Tensor q, at::Tensor kv_blocks, at::Tensor block_tables,
                           at::Tensor kv_lens, double scale, const std::string& impl) {
  TORCH_CHECK(q.dim() == 3 && kv_blocks.dim() == 5 && kv_blocks.size(0) == 2, "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == kv_blocks.scalar_type(), "paged_decode: q and kv_blocks differ in dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && kv_lens.scalar_type() == at::kLong,
              "paged_decode: block_tables and kv_lens must be int64");
  q = q.contiguous();
  kv_blocks = kv_blocks.contiguous();
  block_tables = block_tables.contiguous();
  kv_lens = kv_lens.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t num_blocks = kv_blocks.size(1), bs = kv_blocks.size(2), kvh = kv_blocks.size(3);
  TORCH_CHECK(kv_blocks.size(4) == hd && heads % kvh == 0, "paged_decode: head layout mismatch");
  TORCH_CHECK(block_tables.size(0) == rows && kv_lens.size(0) == rows, "paged_decode: one table and length per row");
  auto out = at::empty_like(q);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t half = num_blocks * bs * kvh * hd;
  TORCH_CHECK(impl == "auto" || impl == "amx" || impl == "avx512" || impl == "portable",
              "paged_decode: impl is auto, amx, avx512 or portable, not ", impl);
  const bool amx = q.scalar_type() == at::kBFloat16 && decode_amx_applies(heads, kvh, hd, bs);
  TORCH_CHECK(impl != "amx" || amx, "paged_decode: the amx kernel does not apply to this case");
  if (amx && (impl == "auto" || impl == "amx")) {
    const auto* kv = kv_blocks.data_ptr<at::BFloat16>();
    decode_amx(q.data_ptr<at::BFloat16>(), kv, kv + half, block_tables.data_ptr<int64_t>(), kv_lens.data_ptr<int64_t>(),
               out.data_ptr<at::BFloat16>(), rows, heads, kvh, hd, bs, max_blocks, static_cast<float>(scale));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* kv = kv_blocks.data_ptr<scalar_t>();
#if defined(__AVX512F__)
    if (impl != "portable") {
      if (auto fast = heads <= 64 ? pick_avx512<scalar_t>(hd, heads / kvh) : nullptr) {
        fast(q.data_ptr<scalar_t>(), kv, kv + half, block_tables.data_ptr<int64_t>(), kv_lens.data_ptr<int64_t>(),
             out.data_ptr<scalar_t>(), rows, kvh, bs, max_blocks, static_cast<float>(scale));
        return;
      }
    }
#endif
    TORCH_CHECK(impl != "avx512", "paged_decode: the avx512 kernel does not apply to this case");
    auto run = hd == 64 ? decode_impl<scalar_t, 64> : hd == 128 ? decode_impl<scalar_t, 128>
                                                                 : decode_impl<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), kv, kv + half, block_tables.data_ptr<int64_t>(), kv_lens.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), rows, heads, kvh, hd, bs, max_blocks, static_cast<float>(scale));
  });
  return out;
}
