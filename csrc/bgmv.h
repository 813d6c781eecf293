// BGMV (batched gather matrix-vector) kernels for multi-adapter LoRA decode: the plain C++ API.
//
// Raw pointers, sizes and a cudaStream_t, nothing from torch: csrc/bgmv.cu compiles with nvcc alone
// (CI compiles it for sm_90 on a machine without a GPU), and csrc/bgmv_binding.cpp is the only file
// that sees torch. What the kernels compute, for every row m of x with slot i = adapter_index[m]:
//
//     u[m, j]  = sum_k x[m, k] A[i, j, k]                 j < r_i = ranks[i]       (shrink)
//     y[m, n] += scalings[i] * sum_{j < r_i} u[m, j] B[i, n, j]                    (expand)
//
// A row whose index is -1 (or any value outside [0, S)) is left alone. Rows of A and columns of B
// past r_i are never used (they may hold anything). See csrc/bgmv.cu for the design and its cost.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedpeft {
namespace bgmv {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct LoraArgs {
  DType dtype = DType::kBFloat16;  // of x, y, lora_A, lora_B
  void* y = nullptr;               // (M, N), row stride ldy, unit column stride: updated in place
  const void* x = nullptr;         // (M, K), row stride ldx, unit column stride
  const void* lora_A = nullptr;    // (S, R, K) contiguous
  const void* lora_B = nullptr;    // (S, N, R) contiguous
  const float* scalings = nullptr; // (S,)
  const int32_t* ranks = nullptr;  // (S,); clamped to [0, R]
  const void* adapter_index = nullptr;  // (M,) int32, or int64 when index_is_int64
  bool index_is_int64 = false;
  float* u = nullptr;              // (M, R) fp32 workspace: written by shrink (entries j < r_i), read by expand
  int64_t M = 0, K = 0, N = 0, S = 0, R = 0;
  int64_t ldx = 0, ldy = 0;
  // Launch shape; 0 picks by the heuristics in bgmv.cu (tests and tuning sweeps set them).
  int shrink_ranks_per_cta = 0;    // 1 or 4: ranks of one row one CTA reduces (sharing its x loads)
  int expand_rows_per_cta = 0;     // a power of two in [32, 4096]: outputs n one CTA updates
};

// The largest max rank R the expand kernel takes (its CTA keeps s_i * u[m, :R] in shared memory).
constexpr int64_t kMaxRank = 8192;

// Each returns cudaSuccess, or the error of the launch (cudaErrorInvalidValue for arguments the
// kernels cannot take: an unknown dtype, R > kMaxRank, a bad launch-shape override). Asynchronous
// on `stream`, as any kernel launch.
cudaError_t shrink(const LoraArgs& args, cudaStream_t stream);
cudaError_t expand(const LoraArgs& args, cudaStream_t stream);
cudaError_t lora_update(const LoraArgs& args, cudaStream_t stream);  // shrink, then expand

// What the launchers decide (for tests and diagnostics): whether the 16-byte path runs, and the
// launch shape the heuristics pick on a GPU with `num_sms` multiprocessors.
bool shrink_vectorized(const LoraArgs& args);
bool expand_vectorized(const LoraArgs& args);
int pick_shrink_ranks_per_cta(int64_t M, int64_t R, int num_sms);
int pick_expand_rows_per_cta(int64_t M, int64_t N, int num_sms);

}  // namespace bgmv
}  // namespace fusedpeft
