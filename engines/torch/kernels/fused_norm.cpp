// The decoder layer's elementwise work in one pass each, on CPU, with the rounding of the unfused
// torch ops it replaces (transformers' Llama): RMSNorm normalises in float32, casts to the
// model's dtype, then multiplies by the weight in that dtype; SwiGLU's silu is rounded to the
// dtype before the product. One row per task on torch's pool. Built by cpu_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cmath>

template <typename T>
static inline float f(T v) { return static_cast<float>(v); }

template <typename T>
static void norm_row(const T* x, const T* w, T* out, int64_t H, float eps) {
  float ss = 0.f;
  for (int64_t d = 0; d < H; ++d) ss += f(x[d]) * f(x[d]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t d = 0; d < H; ++d) out[d] = static_cast<T>(f(w[d]) * f(static_cast<T>(f(x[d]) * r)));
}

static void check_rows(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), op, ": x [rows, hidden], weight [hidden]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and weight differ in dtype");
}

// weight * RMSNorm(x) over the last dimension of x [rows, hidden].
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, weight, "rms_norm");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) norm_row(xp + r * H, wp, op + r * H, H, static_cast<float>(eps));
    });
  });
  return out;
}

// x + h (rounded to the dtype, in place in x) and weight * RMSNorm(x + h): the residual add that
// ends one block and the norm that starts the next, in one pass. Returns the norm.
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor h, at::Tensor weight, double eps) {
  check_rows(x, weight, "add_rms_norm_");
  TORCH_CHECK(x.is_contiguous() && h.sizes() == x.sizes() && h.scalar_type() == x.scalar_type(),
              "add_rms_norm_: x contiguous, h of x's shape and dtype");
  h = h.contiguous();
  weight = weight.contiguous();
  auto out = at::empty_like(x);
  const int64_t rows = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* xr = xp + r * H;
        const scalar_t* hr = hp + r * H;
        for (int64_t d = 0; d < H; ++d) xr[d] = static_cast<scalar_t>(f(xr[d]) + f(hr[d]));
        norm_row(xr, wp, op + r * H, H, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// silu(gate) * up of gate_up [rows, 2 * inter] (gate first): [rows, inter].
at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up [rows, 2 * intermediate]");
  gate_up = gate_up.contiguous();
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({rows, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* g = gp + r * 2 * I;
        const scalar_t* u = g + I;
        scalar_t* o = op + r * I;
        for (int64_t d = 0; d < I; ++d) {
          const float gv = f(g[d]);
          const scalar_t s = static_cast<scalar_t>(gv / (1.f + std::exp(-gv)));
          o[d] = static_cast<scalar_t>(f(s) * f(u[d]));
        }
      }
    });
  });
  return out;
}
