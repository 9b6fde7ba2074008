// The CUDA kernels of csrc/logprobs_cuda_kernels.cuh run by the CPU emulation (cuda_emu.h), with
// the interface of the ops extension's stats/grad/epilogue on CPU tensors. Built by
// tests/test_ops_cuda_emulated.py with torch.utils.cpp_extension.
#include <torch/extension.h>

#include "cuda_emu.h"
// the kernels' own text, unchanged:
#include "logprobs_cuda_kernels.cuh"

namespace {

at::Tensor stats(const at::Tensor& logits, const at::Tensor& targets, double inv_temp, bool with_entropy) {
  return rlrt::cuda_impl::stats_launch(logits, targets, inv_temp, with_entropy, cuda_emu::Launch{});
}

at::Tensor grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& norm, const at::Tensor& g_lp,
                const c10::optional<at::Tensor>& g_ent, const c10::optional<at::Tensor>& entropy, double inv_temp,
                at::Tensor out) {
  rlrt::cuda_impl::grad_launch(logits, targets, norm, g_lp, g_ent, entropy, inv_temp, out, cuda_emu::Launch{});
  return out;
}

at::Tensor epilogue(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv, const at::Tensor& gate,
                    const at::Tensor& mask, double lam, double eps_w, bool inverse, int64_t max_blocks) {
  return rlrt::cuda_impl::epilogue_launch(student, teacher, adv, gate, mask, lam, eps_w, inverse, cuda_emu::Launch{},
                                          max_blocks);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc CUDA kernels under a CPU emulation of the CUDA thread model (tests only)";
  m.def("stats", &stats, py::arg("logits"), py::arg("local_targets"), py::arg("inv_temp"), py::arg("with_entropy"));
  m.def("grad", &grad, py::arg("logits"), py::arg("local_targets"), py::arg("norm"), py::arg("g_lp"),
        py::arg("g_ent"), py::arg("entropy"), py::arg("inv_temp"), py::arg("out"));
  m.def("epilogue", &epilogue, py::arg("student"), py::arg("teacher"), py::arg("adv"), py::arg("gate"),
        py::arg("mask"), py::arg("lam"), py::arg("eps_w"), py::arg("inverse"),
        py::arg("max_blocks") = rlrt::cuda_impl::kEpilogueMaxBlocks);
}
