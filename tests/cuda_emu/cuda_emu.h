// A CPU stand-in for the parts of the CUDA programming model that csrc/logprobs_cuda_kernels.cuh
// uses, so the CPU test suite can run the CUDA kernels' own text without a GPU.
//
// Each CUDA thread of a block is a fiber (POSIX ucontext) on the launching host thread; a barrier
// parks its fibers until the last one arrives, and a scheduler resumes runnable fibers in order,
// so runs are deterministic. Blocks run one after another. Warp shuffles exchange values through a
// per-warp buffer between two warp barriers; __syncthreads_or is a block barrier with an OR. A
// block whose threads wait at barriers the others never reach (a real GPU would hang) is an error
// saying how many wait.
// bf16/fp16 convert through c10::BFloat16 / c10::Half's host code (round to nearest even, as
// their device code); __fmul_rn & co. are plain float operations (build with -ffp-contract=off).
// Build with the compiler's default strict aliasing: it is what exposed a type pun in the kernels.
//
// What this checks: indexing, vector-pack and tail paths, alignment branches, the warp and block
// merges, NaN/-inf handling, in-place aliasing, the launch logic. What it cannot: timing, the
// memory model of real hardware, register pressure, or the vendor intrinsics' own code.
#pragma once

#include <c10/util/Exception.h>

#include <ucontext.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::isnan;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// The scheduler sets threadIdx before it resumes a fiber (one host thread runs them all).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---------------------------------------------------------------- intrinsics
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

namespace cuda_emu {

constexpr size_t kStackBytes = 128 * 1024;  // per emulated thread; the kernels' frames are small

class Scheduler;
inline Scheduler*& current() {
  static Scheduler* scheduler = nullptr;
  return scheduler;
}

// A barrier for a fixed number of emulated threads: arrivals park until the last one arrives.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait();

 private:
  const int count_;
  std::vector<int> parked_;
};

// Runs the blocks of one launch, each as `block` fibers on this host thread.
class Scheduler {
 public:
  explicit Scheduler(int block) : block_barrier(block), block_(block), stacks_(block) {
    for (auto& st : stacks_) st.reset(new char[kStackBytes]);
    for (int w = 0; w < block / 32; ++w) warp_barriers_.emplace_back(std::make_unique<Barrier>(32));
    warp_buffers.resize(block / 32);
    contexts_.resize(block);
  }

  void run(int64_t grid, const std::function<void()>& body) {
    body_ = &body;
    for (int64_t b = 0; b < grid; ++b) {
      blockIdx = dim3{static_cast<unsigned>(b), 1, 1};
      finished_ = 0;
      runnable_.clear();
      for (int t = 0; t < block_; ++t) {
        getcontext(&contexts_[t]);
        contexts_[t].uc_stack.ss_sp = stacks_[t].get();
        contexts_[t].uc_stack.ss_size = kStackBytes;
        contexts_[t].uc_link = &main_;
        makecontext(&contexts_[t], &Scheduler::entry, 0);
        runnable_.push_back(t);
      }
      while (!runnable_.empty()) {
        running_ = runnable_.front();
        runnable_.pop_front();
        threadIdx = dim3{static_cast<unsigned>(running_), 1, 1};
        swapcontext(&main_, &contexts_[running_]);
      }
      if (error_) std::rethrow_exception(error_);
      TORCH_CHECK(finished_ == block_, "emulated block ", b, ": ", block_ - finished_, " of ", block_,
                  " threads wait at a barrier that the others never reach (a GPU would hang)");
    }
  }

  // The running fiber parks (a barrier will make it runnable again).
  void park() { swapcontext(&contexts_[running_], &main_); }
  void wake(int fiber) { runnable_.push_back(fiber); }
  int running() const { return running_; }
  Barrier& warp_barrier(unsigned warp) { return *warp_barriers_[warp]; }

  Barrier block_barrier;
  std::vector<std::array<uint64_t, 32>> warp_buffers;
  int any = 0;  // __syncthreads_or's accumulator

 private:
  static void entry() {
    Scheduler& s = *current();
    try {
      (*s.body_)();
    } catch (...) {
      if (!s.error_) s.error_ = std::current_exception();
    }
    ++s.finished_;
  }  // returns to uc_link = main_

  const int block_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<std::unique_ptr<Barrier>> warp_barriers_;
  std::vector<ucontext_t> contexts_;
  ucontext_t main_;
  std::deque<int> runnable_;
  const std::function<void()>* body_ = nullptr;
  int running_ = -1, finished_ = 0;
  std::exception_ptr error_;
};

inline void Barrier::wait() {
  Scheduler& s = *current();
  if (static_cast<int>(parked_.size()) + 1 == count_) {  // the last arrival releases the others
    for (int f : parked_) s.wake(f);
    parked_.clear();
    return;
  }
  parked_.push_back(s.running());
  s.park();
}

inline std::mutex& launch_mutex() {
  static std::mutex mu;
  return mu;
}

// launch(kernel, grid, block, args...): the emulated kernel<<<grid, block>>>(args...), synchronous.
struct Launch {
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, int64_t grid, int block, Args... args) const {
    TORCH_CHECK(block > 0 && block % 32 == 0 && block <= 1024, "emulated launch: block size ", block,
                " must be a multiple of 32 in (0, 1024]");
    TORCH_CHECK(grid > 0 && grid <= INT32_MAX, "emulated launch: bad grid ", grid);
    std::lock_guard<std::mutex> serial(launch_mutex());
    Scheduler scheduler(block);
    current() = &scheduler;
    gridDim = dim3{static_cast<unsigned>(grid), 1, 1};
    blockDim = dim3{static_cast<unsigned>(block), 1, 1};
    const std::function<void()> body = [&] { kernel(args...); };
    try {
      scheduler.run(grid, body);
    } catch (...) {
      current() = nullptr;
      throw;
    }
    current() = nullptr;
  }
};

}  // namespace cuda_emu

// ---------------------------------------------------------------- warp and block primitives
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  TORCH_CHECK(mask == 0xffffffffu, "emulation supports full-warp shuffles only");
  cuda_emu::Scheduler& s = *cuda_emu::current();
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(&s.warp_buffers[warp][lane], &value, sizeof(T));
  s.warp_barrier(warp).wait();  // every lane has written
  T out;
  std::memcpy(&out, &s.warp_buffers[warp][lane ^ static_cast<unsigned>(lane_mask & 31)], sizeof(T));
  s.warp_barrier(warp).wait();  // every lane has read before the buffer is reused
  return out;
}

inline void __syncthreads() { cuda_emu::current()->block_barrier.wait(); }

inline int __syncthreads_or(int predicate) {
  cuda_emu::Scheduler& s = *cuda_emu::current();
  if (predicate) s.any = 1;
  s.block_barrier.wait();
  const int result = s.any;
  s.block_barrier.wait();
  if (threadIdx.x == 0) s.any = 0;
  s.block_barrier.wait();
  return result;
}
