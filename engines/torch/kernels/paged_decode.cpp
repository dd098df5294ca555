// Decode attention straight from the paged KV cache, on CPU: each query row (one decode token)
// attends to the first kv_lens[row] tokens of its sequence, read block by block through its
// block table, without gathering them into a padded tensor first. One task per row (rows differ
// in length: handed out from a counter), each token's K and V rows read once for every head;
// scores and sums in float32. Built by cpu_kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

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

// q [rows, heads, hd]; kv_blocks [2, num_blocks, block_size, kv_heads, hd] (K then V);
// block_tables [rows, max_blocks] int64; kv_lens [rows] int64 (each >= 1). Returns [rows, heads, hd].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_blocks, torch::Tensor block_tables,
                           torch::Tensor kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_blocks.dim() == 5 && kv_blocks.size(0) == 2, "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == kv_blocks.scalar_type(), "paged_decode: q and kv_blocks differ in dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && kv_lens.scalar_type() == torch::kLong,
              "paged_decode: block_tables and kv_lens must be int64");
  q = q.contiguous();
  kv_blocks = kv_blocks.contiguous();
  block_tables = block_tables.contiguous();
  kv_lens = kv_lens.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t num_blocks = kv_blocks.size(1), bs = kv_blocks.size(2), kvh = kv_blocks.size(3);
  TORCH_CHECK(kv_blocks.size(4) == hd && heads % kvh == 0, "paged_decode: head layout mismatch");
  TORCH_CHECK(block_tables.size(0) == rows && kv_lens.size(0) == rows, "paged_decode: one table and length per row");
  auto out = torch::empty_like(q);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t half = num_blocks * bs * kvh * hd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* kv = kv_blocks.data_ptr<scalar_t>();
    auto run = hd == 64 ? decode_impl<scalar_t, 64> : hd == 128 ? decode_impl<scalar_t, 128>
                                                                 : decode_impl<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), kv, kv + half, block_tables.data_ptr<int64_t>(), kv_lens.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), rows, heads, kvh, hd, bs, max_blocks, static_cast<float>(scale));
  });
  return out;
}
