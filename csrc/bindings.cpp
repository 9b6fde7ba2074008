// Python bindings: each op dispatches on the device of its inputs to the CPU or CUDA kernel.
// Called only from megatron_rlrt/ops (which validates shapes, targets and dtypes first).

#include <torch/extension.h>

#include "rlrt_ops.h"

namespace rlrt {
namespace {

at::Tensor stats(const at::Tensor& logits, const at::Tensor& local_targets, double inv_temp, bool with_entropy) {
  if (logits.is_cuda()) {
#ifdef RLRT_WITH_CUDA
    return stats_cuda(logits, local_targets, inv_temp, with_entropy);
#else
    TORCH_CHECK(false, "megatron_rlrt ops extension was built without CUDA");
#endif
  }
  return stats_cpu(logits, local_targets, inv_temp, with_entropy);
}

at::Tensor grad(const at::Tensor& logits, const at::Tensor& local_targets, const at::Tensor& norm,
                const at::Tensor& g_lp, const c10::optional<at::Tensor>& g_ent,
                const c10::optional<at::Tensor>& entropy, double inv_temp, at::Tensor out) {
  if (logits.is_cuda()) {
#ifdef RLRT_WITH_CUDA
    grad_cuda(logits, local_targets, norm, g_lp, g_ent, entropy, inv_temp, out);
    return out;
#else
    TORCH_CHECK(false, "megatron_rlrt ops extension was built without CUDA");
#endif
  }
  grad_cpu(logits, local_targets, norm, g_lp, g_ent, entropy, inv_temp, out);
  return out;
}

at::Tensor epilogue(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv,
                    const at::Tensor& gate, const at::Tensor& mask, double lam, double eps_w, bool inverse) {
  if (student.is_cuda()) {
#ifdef RLRT_WITH_CUDA
    return epilogue_cuda(student, teacher, adv, gate, mask, lam, eps_w, inverse);
#else
    TORCH_CHECK(false, "megatron_rlrt ops extension was built without CUDA");
#endif
  }
  return epilogue_cpu(student, teacher, adv, gate, mask, lam, eps_w, inverse);
}

bool with_cuda() {
#ifdef RLRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace rlrt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-rlrt fused vocab-parallel log-prob kernels (see csrc/rlrt_ops.h)";
  m.def("stats", &rlrt::stats, "per-row [max, sumexp, target logit, sum p*(x-max)] of a logits shard",
        py::arg("logits"), py::arg("local_targets"), py::arg("inv_temp"), py::arg("with_entropy"));
  m.def("grad", &rlrt::grad, "write the log-prob (and entropy) gradient of a logits shard into out",
        py::arg("logits"), py::arg("local_targets"), py::arg("norm"), py::arg("g_lp"), py::arg("g_ent"),
        py::arg("entropy"), py::arg("inv_temp"), py::arg("out"));
  m.def("epilogue", &rlrt::epilogue, "RLRT/RLSD token advantages from student/teacher log-probs",
        py::arg("student"), py::arg("teacher"), py::arg("adv"), py::arg("gate"), py::arg("mask"), py::arg("lam"),
        py::arg("eps_w"), py::arg("inverse"));
  m.def("cpu_capability", &rlrt::cpu_capability, "vector ISA the CPU kernels were compiled for");
  m.def("with_cuda", &rlrt::with_cuda, "whether the CUDA kernels are compiled in");
}
