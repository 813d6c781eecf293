// Tests only: CPU stand-ins for the CUDA built-ins csrc/bgmv.cu uses, so that the kernels run
// unchanged on a machine without a GPU. bgmv.cu includes this when FUSEDPEFT_BGMV_EMULATE is
// defined; csrc/emulate/bgmv_emulate_test.cpp drives it (tests/test_cuda_ext.py compiles that with
// g++ and AddressSanitizer and runs it). Never part of the extension.
//
// A launch runs its CTAs one after another. A CTA's threads are blockDim.x OS threads that meet at
// a barrier for __syncthreads and twice for each warp shuffle (write the value, read the partner's).
// What the emulation checks on the way, as errors that fail the test:
// - every thread at one barrier arrived from the same call (the same __syncthreads or shuffle, by
//   source line): a thread that skipped a shuffle its warp-mates made is caught here;
// - a shuffle's full mask, with all 32 lanes of the warp still running (none has returned);
// - each __ldg (every load of x, A and B goes through one) aligned to its size (a 16-byte load on a
//   pointer that is not 16-byte aligned faults on a GPU), and not touching bytes the test marked
//   forbidden (forbid()): rows of A past a slot's rank, and whole packs of B past it, which the
//   kernels must not read (a slot costs its own rank);
// - launch shapes a GPU would refuse (threads not a multiple of 32 or above 1024; over 48 KiB of
//   dynamic shared memory without the opt-in).
// Shared memory and the shuffle slots are filled with NaN before each CTA, so a read of a value no
// thread wrote shows up in the results. Out-of-bounds global reads are AddressSanitizer's to find.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  // CTAs run one at a time, so one copy serves each CTA in turn
#define __launch_bounds__(...)

#define threadIdx (::bgmv_emu::tls.thread_idx)
#define blockIdx (::bgmv_emu::tls.block_idx)
#define blockDim (::bgmv_emu::tls.block_dim)
#define __syncthreads() ::bgmv_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::bgmv_emu::shfl_xor(mask, value, lane_mask, __LINE__)
#define __ldg(p) ::bgmv_emu::ldg(p)
#define FUSEDPEFT_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::bgmv_emu::dynamic_shared())

namespace bgmv_emu {

struct Dim {
  unsigned x = 0, y = 1, z = 1;
};

inline int emulated_sms = 132;  // what num_sms() answers (tests vary it to reach each heuristic branch)
inline std::atomic<int> errors{0};

inline void report(const char* what, unsigned block, unsigned thread) {
  if (errors.fetch_add(1) < 20) std::fprintf(stderr, "emulation error: %s (block %u, thread %u)\n", what, block, thread);
}

// A barrier whose participants may leave (a thread that returned), and that checks every arrival
// in a phase came from the same call (its source line; -1 for __syncthreads).
class Barrier {
 public:
  void reset(int participants) {
    std::lock_guard<std::mutex> lock(mutex_);
    participants_ = participants;
    arrived_ = 0;
  }
  void arrive_and_wait(int kind, unsigned block, unsigned thread) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (arrived_ == 0) {
      kind_ = kind;
    } else if (kind != kind_) {
      report("threads of one CTA meet at different barriers (different shuffles, or one against __syncthreads)",
             block, thread);
    }
    const uint64_t generation = generation_;
    if (++arrived_ >= participants_) {
      complete();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --participants_;
    if (arrived_ > 0 && arrived_ >= participants_) complete();
  }

 private:
  void complete() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int participants_ = 0, arrived_ = 0, kind_ = 0;
  uint64_t generation_ = 0;
};

struct Cta {
  explicit Cta(unsigned threads, size_t smem) : threads(threads), slots(threads), alive(new std::atomic<bool>[threads]),
                                                dynamic(smem / sizeof(float) + 1) {
    reset();
  }
  void reset() {
    barrier.reset(static_cast<int>(threads));
    for (unsigned t = 0; t < threads; ++t) alive[t] = true;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (auto& s : slots) s = nan;
    for (auto& d : dynamic) d = nan;
  }
  unsigned threads;
  Barrier barrier;
  std::vector<float> slots;
  std::unique_ptr<std::atomic<bool>[]> alive;
  std::vector<float> dynamic;  // float-aligned dynamic shared memory
};

struct ThreadState {
  Dim thread_idx, block_idx, block_dim;
  Cta* cta = nullptr;
};
inline thread_local ThreadState tls;

inline void syncthreads() { tls.cta->barrier.arrive_and_wait(-1, tls.block_idx.x, tls.thread_idx.x); }

inline float shfl_xor(unsigned mask, float value, int lane_mask, int line) {
  Cta& cta = *tls.cta;
  const unsigned t = tls.thread_idx.x, b = tls.block_idx.x;
  if (mask != 0xffffffffu) report("a shuffle without the full mask", b, t);
  if (lane_mask < 0 || lane_mask >= 32) report("a shuffle's lane mask outside the warp", b, t);
  cta.slots[t] = value;
  cta.barrier.arrive_and_wait(line, b, t);
  for (unsigned lane = t & ~31u; lane < (t | 31u) + 1; ++lane) {
    if (lane >= cta.threads || !cta.alive[lane]) {
      report("a full-mask shuffle while a lane of the warp has returned", b, t);
      break;
    }
  }
  const unsigned source = (t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask & 31));
  const float result = cta.slots[source];
  cta.barrier.arrive_and_wait(line, b, t);
  return result;
}

// Byte ranges the kernels must not load (see the header comment). The test registers them before
// a launch and clears them after; a launch's threads only read the list.
struct Forbidden {
  const unsigned char* base;
  std::vector<unsigned char> bytes;  // 1: must not be loaded
};
inline std::vector<Forbidden> forbidden;

inline void forbid(const void* base, std::vector<unsigned char> bytes) {
  forbidden.push_back(Forbidden{static_cast<const unsigned char*>(base), std::move(bytes)});
}

template <typename T>
T ldg(const T* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address % sizeof(T) != 0) report("a load not aligned to its size", tls.block_idx.x, tls.thread_idx.x);
  const auto* bytes = reinterpret_cast<const unsigned char*>(p);
  for (const Forbidden& f : forbidden) {
    if (bytes >= f.base && bytes < f.base + f.bytes.size()) {
      const size_t at = static_cast<size_t>(bytes - f.base);
      for (size_t k = 0; k < sizeof(T) && at + k < f.bytes.size(); ++k) {
        if (f.bytes[at + k]) {
          report("a load of bytes past a slot's rank", tls.block_idx.x, tls.thread_idx.x);
          break;
        }
      }
    }
  }
  return *p;
}

inline void* dynamic_shared() { return tls.cta->dynamic.data(); }

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), unsigned blocks, int threads, size_t smem, A... args) {
  if (threads <= 0 || threads > 1024 || threads % 32 != 0) {
    report("a launch with a block size a GPU would refuse", 0, 0);
    return cudaErrorInvalidConfiguration;
  }
  if (smem > 48 * 1024) {
    report("a launch with more than 48 KiB of dynamic shared memory and no opt-in", 0, 0);
    return cudaErrorInvalidValue;
  }
  if (blocks == 0) return cudaSuccess;
  Cta cta(static_cast<unsigned>(threads), smem);
  std::barrier next_cta(threads, [&cta]() noexcept { cta.reset(); });
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (unsigned b = 0; b < blocks; ++b) {
        tls.thread_idx = Dim{static_cast<unsigned>(t)};
        tls.block_idx = Dim{b};
        tls.block_dim = Dim{static_cast<unsigned>(threads)};
        tls.cta = &cta;
        kernel(args...);
        cta.alive[t] = false;
        cta.barrier.leave();
        next_cta.arrive_and_wait();
      }
    });
  }
  for (auto& thread : pool) thread.join();
  return cudaSuccess;
}

}  // namespace bgmv_emu
