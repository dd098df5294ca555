// A decoder layer's attention input on CPU, in one pass per row: the rotary embedding of the
// q and k heads (in place in the fused qkv projection's output) and the store of the row's k and
// v into its slot of the paged KV cache. It replaces apply_rotary's five tensor ops and the two
// index_copy_ calls of models/layers.py, with their rounding: transformers computes
// (x * cos) + (rotate_half(x) * sin) in x's dtype, each product rounded to it before the sum.
// And the greedy pick of the sampler: the first maximal logit of each row. Built by cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

template <typename T>
static inline float f(T v) { return static_cast<float>(v); }

// x [hd] rotated in place by cos/sin [hd]; prod [hd] scratch. The two products are rounded to T
// and stored before the sum, so the compiler cannot fuse them into one multiply-add.
template <typename T>
static void rotate(T* x, const T* c, const T* s, int64_t hd, float* prod) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) {
    const float rot = d < half ? -f(x[d + half]) : f(x[d - half]);
    prod[d] = f(static_cast<T>(f(x[d]) * f(c[d])));
    prod[hd + d] = f(static_cast<T>(rot * f(s[d])));
  }
  for (int64_t d = 0; d < hd; ++d) x[d] = static_cast<T>(prod[d] + prod[hd + d]);
}

// qkv [rows, heads + 2 * kv_heads, hd] (contiguous; q heads, then k, then v); cos, sin [rows, hd];
// kv_layer [2, blocks, block_size, kv_heads, hd] (contiguous: K then V); slots [rows] int64, the
// cache slot (block * block_size + offset) of each row. Rotates q and k in place and writes k
// and v to the rows' slots.
void rope_cache_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, at::Tensor kv_layer,
                 at::Tensor slots) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "rope_cache_: qkv [rows, heads + 2 * kv_heads, hd], contiguous");
  TORCH_CHECK(kv_layer.dim() == 5 && kv_layer.size(0) == 2 && kv_layer.is_contiguous(),
              "rope_cache_: kv_layer [2, blocks, block_size, kv_heads, hd], contiguous (it is written in place)");
  const int64_t rows = qkv.size(0), hd = qkv.size(2), kvh = kv_layer.size(3);
  TORCH_CHECK(qkv.size(1) == heads + 2 * kvh && kv_layer.size(4) == hd && hd % 2 == 0, "rope_cache_: head layout mismatch");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == rows && cos.size(1) == hd,
              "rope_cache_: cos and sin [rows, hd]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
              kv_layer.scalar_type() == qkv.scalar_type(), "rope_cache_: qkv, cos, sin and kv_layer differ in dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == rows,
              "rope_cache_: slots [rows] int64");
  cos = cos.contiguous();
  sin = sin.contiguous();
  slots = slots.contiguous();
  const int64_t capacity = kv_layer.size(1) * kv_layer.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < capacity, "rope_cache_: slot ", sp[r], " outside the cache's ", capacity);
  const int64_t width = (heads + 2 * kvh) * hd, kv_width = kvh * hd, half = capacity * kv_width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_cache_", [&] {
    scalar_t* x = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* snp = sin.data_ptr<scalar_t>();
    scalar_t* cache = kv_layer.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
      std::vector<float> prod(2 * hd);
      for (int64_t r = b; r < e; ++r) {
        scalar_t* row = x + r * width;
        for (int64_t h = 0; h < heads + kvh; ++h) rotate(row + h * hd, cp + r * hd, snp + r * hd, hd, prod.data());
        std::memcpy(cache + sp[r] * kv_width, row + heads * hd, kv_width * sizeof(scalar_t));
        std::memcpy(cache + half + sp[r] * kv_width, row + (heads + kvh) * hd, kv_width * sizeof(scalar_t));
      }
    });
  });
}

// The index of each row's first maximum of logits [rows, vocab] float32, as torch.argmax (a NaN
// counts as the maximum; its first one is taken). The NaN test reads the bits: -ffast-math lets
// the compiler assume a float comparison never sees one.
at::Tensor argmax_rows(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_rows: logits [rows, vocab] float32");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: an empty vocabulary");
  auto out = at::empty({rows}, at::kLong);
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* x = lp + r * V;
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
      float m = -std::numeric_limits<float>::infinity();
      uint32_t magnitude = 0;  // the largest |x| bit pattern: above infinity's only for a NaN
      for (int64_t i = 0; i < V; ++i) {  // both reductions vectorize
        m = x[i] > m ? x[i] : m;
        magnitude = std::max(magnitude, bits[i] & 0x7fffffffu);
      }
      int64_t pick = 0;
      if (magnitude > 0x7f800000u) {
        while ((bits[pick] & 0x7fffffffu) <= 0x7f800000u) ++pick;  // the first NaN
      } else {
        while (pick < V - 1 && x[pick] != m) ++pick;  // the first one equal to the maximum
      }
      op[r] = pick;
    }
  });
  return out;
}
