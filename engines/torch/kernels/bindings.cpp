// The Python module of the CPU kernels (engines/torch/cpu_kernels.py builds it).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_blocks, torch::Tensor block_tables,
                           torch::Tensor kv_lens, double scale, const std::string& impl);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor h, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope_cache_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads, torch::Tensor kv_layer,
                 torch::Tensor slots);
torch::Tensor argmax_rows(torch::Tensor logits);
bool amx_gemm_available();
torch::Tensor amx_pack(torch::Tensor w);
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, bool float_out);
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor h, const std::vector<torch::Tensor>& weights,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor kv, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor kv_lens, int64_t heads, double eps);
bool prefill_attention_available();
std::string prefill_attention_impl();
void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, double scale,
                       const std::string& impl);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache", py::arg("q"), py::arg("kv_blocks"),
        py::arg("block_tables"), py::arg("kv_lens"), py::arg("scale"), py::arg("impl") = "auto");
  m.def("rms_norm", &rms_norm, "weight * RMSNorm(x) over the last dimension");
  m.def("add_rms_norm_", &add_rms_norm_, "x += h in place; returns weight * RMSNorm(x)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [rows, 2 * intermediate]");
  m.def("rope_cache_", &rope_cache_, "rotate q and k of qkv in place; write k and v to the rows' cache slots");
  m.def("prefill_attention_available", &prefill_attention_available,
        "whether prefill_attention runs here (AMX-BF16 or AVX512-BF16)");
  m.def("prefill_attention_impl", &prefill_attention_impl, "what prefill_attention takes by default: amx, avx512 or ''");
  m.def("prefill_attention", &prefill_attention, "causal attention of a prompt or chunk into out (bfloat16)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("scale"), py::arg("impl") = "auto");
  m.def("decode_layers", &decode_layers, "every decoder layer of a pure decode step (packed bfloat16 weights, paged path)",
        py::call_guard<py::gil_scoped_release>());
  m.def("amx_gemm_available", &amx_gemm_available, "whether amx_linear runs here (AMX-BF16)");
  m.def("amx_pack", &amx_pack, "a bfloat16 weight [N, K] in amx_linear's tile order");
  m.def("amx_linear", &amx_linear, "x @ W^T + bias with W from amx_pack (few rows: decode steps)", py::arg("x"),
        py::arg("packed"), py::arg("bias"), py::arg("float_out") = false);
  m.def("argmax_rows", &argmax_rows, "the first maximal index of each row of float32 logits");
}
