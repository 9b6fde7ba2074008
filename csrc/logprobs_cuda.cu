// CUDA entry points of the log-prob ops: the kernels and their launch logic are in
// logprobs_cuda_kernels.cuh (shared with the CPU emulation the test suite runs them under);
// here they are launched on the current CUDA stream.

// c10 (not ATen/cuda) headers: they need no cuBLAS/cuSPARSE headers, so the file also compiles
// with a bare nvcc (tests/gpu/compile_check.sh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "logprobs_cuda_kernels.cuh"

namespace rlrt {
namespace {

// launch(kernel, grid, block, args...): kernel<<<grid, block, 0, current stream>>>(args...)
struct StreamLaunch {
  cudaStream_t stream;
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, int64_t grid, int block, Args... args) const {
    kernel<<<static_cast<unsigned>(grid), block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

StreamLaunch on_current_stream() { return StreamLaunch{c10::cuda::getCurrentCUDAStream()}; }

}  // namespace

at::Tensor stats_cuda(const at::Tensor& logits, const at::Tensor& targets, double inv_temp, bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return cuda_impl::stats_launch(logits, targets, inv_temp, with_entropy, on_current_stream());
}

void grad_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& norm, const at::Tensor& g_lp,
               const c10::optional<at::Tensor>& g_ent, const c10::optional<at::Tensor>& entropy, double inv_temp,
               at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda_impl::grad_launch(logits, targets, norm, g_lp, g_ent, entropy, inv_temp, out, on_current_stream());
}

at::Tensor epilogue_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& adv,
                         const at::Tensor& gate, const at::Tensor& mask, double lam, double eps_w, bool inverse) {
  const c10::cuda::CUDAGuard guard(student.device());
  return cuda_impl::epilogue_launch(student, teacher, adv, gate, mask, lam, eps_w, inverse, on_current_stream());
}

}  // namespace rlrt
