// Every decoder layer of one decode step in C++: the same calls models/layers.py makes for a pure
// decode step on the "paged" path with prepacked bfloat16 weights (fused norms, the prepacked
// oneDNN matmuls, rope + KV store, the paged decode kernel, silu * up), without going back to
// Python between them. A 32-row decode step of SmolLM2 makes about 300 such calls; from Python
// each cost tens of microseconds on this project's 2-core Xeon while the other core's OpenMP
// worker spun waiting (bench/profile_step.py and docs/benchmarks.md have the figures).
// Built by cpu_kernels.py; layers.py's CausalLM.forward calls it where it applies.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <string>
#include <vector>

at::Tensor add_rms_norm_(at::Tensor x, at::Tensor h, at::Tensor weight, double eps);
at::Tensor silu_mul(at::Tensor gate_up);
void rope_cache_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, at::Tensor kv_layer,
                 at::Tensor slots);
at::Tensor paged_decode(at::Tensor q, at::Tensor kv_blocks, at::Tensor block_tables,
                           at::Tensor kv_lens, double scale, const std::string& impl);
at::Tensor amx_linear(at::Tensor x, at::Tensor packed, at::Tensor bias, bool float_out);

namespace {

// x @ W^T + b with W prepacked, as packed_linear.py's `project` does for few rows: 4-D, packed for
// amx_linear (kernels/small_gemm.cpp), else for oneDNN. b may be an empty tensor (no bias).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias) {
  if (packed.dim() == 4) return amx_linear(x, packed, bias, false);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.defined() && bias.numel() ? c10::IValue(bias) : c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue(std::string(""))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

constexpr int64_t PER_LAYER = 10;  // the tensors each layer passes, in decode_layers' order

}  // namespace

// x [rows, hidden] (the residual stream, updated in place) and h = the first layer's input norm
// of x; per layer, in `weights`: qkv packed, qkv bias, o packed, o bias, post-attention norm
// weight, gate_up packed, gate_up bias, down packed, down bias, the next norm's weight (the next
// layer's input norm, or the final norm after the last layer); empty tensors for absent biases. kv [layers, 2, blocks,
// block_size, kv_heads, hd]; cos, sin, slots as rope_cache_ takes them; block_tables and kv_lens
// of the rows in order, as paged_decode takes them. Returns the final norm of x.
at::Tensor decode_layers(at::Tensor x, at::Tensor h, const std::vector<at::Tensor>& weights,
                            at::Tensor cos, at::Tensor sin, at::Tensor kv, at::Tensor slots,
                            at::Tensor block_tables, at::Tensor kv_lens, int64_t heads, double eps) {
  TORCH_CHECK(weights.size() % PER_LAYER == 0 && static_cast<int64_t>(weights.size()) / PER_LAYER == kv.size(0),
              "decode_layers: ", PER_LAYER, " tensors per layer, one layer per KV cache layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && kv.dim() == 6, "decode_layers: x [rows, hidden], kv [layers, ...]");
  const int64_t rows = x.size(0), kvh = kv.size(4), hd = kv.size(5);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (int64_t i = 0; i < kv.size(0); ++i) {
    const at::Tensor* w = weights.data() + i * PER_LAYER;
    const at::Tensor kv_layer = kv.select(0, i);
    at::Tensor qkv = linear(h, w[0], w[1]).view({rows, heads + 2 * kvh, hd});
    rope_cache_(qkv, cos, sin, heads, kv_layer, slots);
    at::Tensor attn = paged_decode(qkv.narrow(1, 0, heads), kv_layer, block_tables, kv_lens, scale, "auto");
    h = add_rms_norm_(x, linear(attn.view({rows, heads * hd}), w[2], w[3]), w[4], eps);
    h = add_rms_norm_(x, linear(silu_mul(linear(h, w[5], w[6])), w[7], w[8]), w[9], eps);
  }
  return h;
}
