// BGMV kernels for multi-adapter LoRA decode (Punica's shrink / expand), plain CUDA C++.
//
//     shrink   u[m, j]  = x[m] . A[i, j]                       for j < r_i          (i = index[m])
//     expand   y[m, n] += s_i * sum_{j < r_i} u[m, j] B[i, n, j]
//
// The base GEMM y = x W^T + b stays with cuBLAS (torch.addmm in fusedpeft/backends/cuda.py); these
// two launches add the rank-r term into that y in place. The API is csrc/bgmv.h (no torch here).
//
// Cost model (decode: M rows, D distinct adapters among them, rank r, K in, N out, 2-byte dtype)
// --------------------------------------------------------------------------------------------
// - Base GEMV (cuBLAS): 2 M N K FLOPs, 2 N K bytes of W. K = N = 4096: 32 MiB, about 10 us at the
//   H100's 3.35 TB/s.
// - Rank-r term: 2 M r (K + N) FLOPs; from DRAM it reads A[i] (r x K) and B[i] (N x r) once per
//   distinct adapter, 2 D r (K + N) bytes, plus x, y and the fp32 u (2 M K + 4 M N + 8 M r). Rows
//   that share an adapter re-read A[i] and B[i] from L2 (50 MiB on the H100): 2 M r (K + N) bytes of
//   L2 traffic. The intensity is about one FLOP per byte when each adapter serves a row (M / D
//   when rows share), against a ridge near 300 FLOP/byte (989 bf16 TFLOP/s / 3.35 TB/s): the term is
//   memory- and latency-bound. Tensor cores buy nothing; fp32 FMAs on CUDA cores do, and the work is
//   to keep enough bytes in flight: 16-byte loads, several independent loads per thread, and
//   enough CTAs to spread the bytes over every SM.
//   Examples at K = N = 4096: D = 8 adapters of rank 16 read 2 MiB (0.6 us at full bandwidth);
//   D = 64 of rank 64 read 64 MiB, more than W itself.
// - A slot's cost is its own rank: the shrink never loads rows of A past r_i (a CTA whose ranks all
//   lie past r_i returns at once) and the expand reads r_i entries of each row of B (rounded up to
//   one 16-byte pack; B's rows are R long, so a rank-8 slot in an R = 64 bank reads 16 of each
//   row's 128 bytes: half of a 32-byte sector is wasted, inherent to the (S, N, R) layout).
//
// Why two kernels and not one fused kernel per row
// ------------------------------------------------
// Every output n of a row needs all of u[m, :r_i]. One CTA per row that computes u and then the
// whole expand would put 2 r (K + N) bytes on one SM per row: at M = 1 a single SM (a few percent
// of the chip's bandwidth) would stream all of A[i] and B[i]. Splitting the expand over CTAs inside
// one launch needs u first: either a grid-wide sync (cooperative launch, which also forbids more
// CTAs than fit at once) or each CTA recomputing u, which multiplies A's bytes by the number of
// n tiles. Two launches spread both phases over the whole GPU (shrink: M x ceil(R / RC) CTAs,
// expand: M x ceil(N / rows) CTAs); the price is u's round trip (8 M r bytes, L2-resident) and
// one more launch on the stream (a few microseconds eagerly, less inside a CUDA graph).
//
// The kernels
// -----------
// shrink: one CTA per (row m, RC consecutive ranks), RC = 1 or 4. Its threads stride over K in
//   16-byte packs (8 halves / bfloat16s, 4 floats); each thread loads U packs of x and U x RC packs
//   of A before it uses any (U = 4 for RC = 1, 2 for RC = 4: that many loads in flight per thread),
//   accumulates in fp32, then the CTA reduces RC sums (warp shuffles, then shared memory across
//   warps) and writes u[m, j0 .. j0 + RC) in fp32. RC = 4 shares each x pack among four ranks
//   (x is read from L2 once per four ranks instead of once per rank); RC = 1 gives 4x the CTAs,
//   for small M. The block is 32..256 threads, as many as K's packs need with U packs each.
//   The heuristic: RC = 4 where M * R / 4 still makes two CTAs per SM, else RC = 1.
// expand: one CTA (128 threads) per (row m, tile of outputs n). It stages s_i * u[m, :r_i] in shared
//   memory, then G lanes read one row of B[i] (r_i entries, contiguous: G = 1, 2, 4 or 8 packs, the
//   smallest that covers r_i, chosen per CTA since the rank is the slot's), each group takes ROWS
//   rows at a time with all their loads issued first, reduces across its G lanes by shuffles, and
//   adds the sum to y[m, n] in fp32, rounding the result once to the output dtype. Ranks past 8
//   packs (> 64 in 16-bit types) loop. The tile is the largest power of two in [64, 512] outputs
//   that still makes two CTAs per SM.
// Both have a scalar path (one element per load) for when a 16-byte pack would be misaligned: K
// (or ldx) not a multiple of the pack for the shrink, R not a multiple of it for the expand, or an
// unaligned base pointer. Tails (K, N, r_i off any multiple) are bounded loops and predicated loads.
// Indices are int32 or int64 (read by a uniform branch, once per CTA), fp32 accumulation throughout.
#include "bgmv.h"

#include <atomic>
#include <cstring>

#ifdef FUSEDPEFT_BGMV_EMULATE
// Tests only: CPU stand-ins for the CUDA built-ins used here, so that this same file runs on a
// machine without a GPU (csrc/emulate/; tests/test_cuda_ext.py builds it with g++ and runs it).
#include "emulate/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FUSEDPEFT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace fusedpeft {
namespace bgmv {
namespace {

constexpr int kWarp = 32;
constexpr int kShrinkMaxThreads = 256;
constexpr int kExpandThreads = 128;
// Register budgets: at most 128 registers a thread, so that an SM holds at least 16 warps of either
// kernel (their loads in flight hide DRAM latency). Without a minimum, ptxas capped the scalar
// expand at 40 registers and spilled.
constexpr int kShrinkMinBlocks = 2;
constexpr int kExpandMinBlocks = 4;
constexpr int kExpandRows = 4;  // output rows per lane group per iteration, their loads in flight together

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// W consecutive elements: one 16-byte load when W * sizeof(T) == 16, else W == 1 (the scalar path).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load_pack(const T* __restrict__ p) {
  static_assert(W == 1 || sizeof(T) * W == 16, "a pack is one element or 16 bytes");
  Pack<T, W> out;
  if constexpr (W == 1) {
    out.v[0] = __ldg(p);
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  }
  return out;
}

// The slot of row m, or -1: no adapter (index -1, or anything outside [0, S), never dereferenced).
__device__ __forceinline__ int64_t slot_of(const LoraArgs& a, int64_t m) {
  const int64_t i = a.index_is_int64 ? static_cast<const int64_t*>(a.adapter_index)[m]
                                     : static_cast<int64_t>(static_cast<const int32_t*>(a.adapter_index)[m]);
  return (i >= 0 && i < a.S) ? i : -1;
}

__device__ __forceinline__ int rank_of(const LoraArgs& a, int64_t i) {
  const int r = a.ranks[i];
  return r < 0 ? 0 : (r > a.R ? static_cast<int>(a.R) : r);
}

template <typename T, int W, int RC>
__global__ void __launch_bounds__(kShrinkMaxThreads, kShrinkMinBlocks) shrink_kernel(const LoraArgs a) {
  constexpr int U = RC >= 4 ? 2 : 4;  // K steps whose loads one thread issues before using them
  const int64_t chunks = (a.R + RC - 1) / RC;
  const int64_t m = blockIdx.x / chunks;
  const int j0 = static_cast<int>(blockIdx.x % chunks) * RC;
  const int64_t i = slot_of(a, m);
  if (i < 0) return;
  const int r = rank_of(a, i);
  if (j0 >= r) return;  // this CTA's ranks are all past the slot's: nothing to read
  const int nj = r - j0 < RC ? r - j0 : RC;

  const T* __restrict__ xr = static_cast<const T*>(a.x) + m * a.ldx;
  const T* __restrict__ Ar = static_cast<const T*>(a.lora_A) + (i * a.R + j0) * a.K;
  const int64_t K = a.K;
  const int64_t step = static_cast<int64_t>(blockDim.x) * W;

  float acc[RC];
#pragma unroll
  for (int c = 0; c < RC; ++c) acc[c] = 0.f;

  for (int64_t k0 = static_cast<int64_t>(threadIdx.x) * W; k0 < K; k0 += step * U) {
    Pack<T, W> xv[U];
    Pack<T, W> av[U][RC];
#pragma unroll
    for (int s = 0; s < U; ++s) {
      const int64_t k = k0 + s * step;
      if (k < K) {  // K is a multiple of W on the packed path: a pack is all in range or all out
        xv[s] = load_pack<T, W>(xr + k);
#pragma unroll
        for (int c = 0; c < RC; ++c)
          if (c < nj) av[s][c] = load_pack<T, W>(Ar + c * K + k);
      }
    }
#pragma unroll
    for (int s = 0; s < U; ++s) {
      if (k0 + s * step < K) {
#pragma unroll
        for (int c = 0; c < RC; ++c) {
          if (c < nj) {
#pragma unroll
            for (int e = 0; e < W; ++e) acc[c] = fmaf(to_float(xv[s].v[e]), to_float(av[s][c].v[e]), acc[c]);
          }
        }
      }
    }
  }

  // Reduce the RC sums over the CTA: within each warp by shuffles, then across warps.
  __shared__ float partial[kShrinkMaxThreads / kWarp][RC];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int c = 0; c < RC; ++c) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
    if (lane == 0) partial[warp][c] = acc[c];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < nj) {
    float sum = 0.f;
    const int warps = blockDim.x / kWarp;
    for (int w = 0; w < warps; ++w) sum += partial[w][threadIdx.x];
    a.u[m * a.R + j0 + threadIdx.x] = sum;
  }
}

// One CTA's outputs n in [n_begin, n_end) of row m: G lanes per row of B[i], kExpandRows rows per
// lane group in flight. The loop bounds are uniform over the CTA, so every lane reaches the shuffles.
template <typename T, int W, int G>
__device__ __forceinline__ void expand_rows(T* __restrict__ yr, const T* __restrict__ Bi, const float* us, int r,
                                            int64_t R, int64_t n_begin, int64_t n_end) {
  const int g = threadIdx.x % G;
  const int group = threadIdx.x / G;
  const int groups = blockDim.x / G;
  const int packs = (r + W - 1) / W;  // packs of one row of B[i] that hold its r entries
  const bool first = g < packs;       // this lane's first pack holds entries of the row

  for (int64_t n0 = n_begin; n0 < n_end; n0 += static_cast<int64_t>(groups) * kExpandRows) {
    Pack<T, W> b[kExpandRows];
#pragma unroll
    for (int t = 0; t < kExpandRows; ++t) {
      const int64_t n = n0 + static_cast<int64_t>(t) * groups + group;
      if (n < n_end && first) b[t] = load_pack<T, W>(Bi + n * R + g * W);
    }
    float acc[kExpandRows];
#pragma unroll
    for (int t = 0; t < kExpandRows; ++t) {
      acc[t] = 0.f;
      const int64_t n = n0 + static_cast<int64_t>(t) * groups + group;
      if (n < n_end && first) {
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const int j = g * W + e;
          if (j < r) acc[t] = fmaf(us[j], to_float(b[t].v[e]), acc[t]);  // entries past r_i: loaded, unused
        }
        for (int p = g + G; p < packs; p += G) {  // rows longer than G packs (ranks > 8 packs)
          const Pack<T, W> more = load_pack<T, W>(Bi + n * R + p * W);
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const int j = p * W + e;
            if (j < r) acc[t] = fmaf(us[j], to_float(more.v[e]), acc[t]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kExpandRows; ++t) {
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
      const int64_t n = n0 + static_cast<int64_t>(t) * groups + group;
      if (g == 0 && n < n_end) yr[n] = from_float<T>(to_float(yr[n]) + acc[t]);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kExpandThreads, kExpandMinBlocks) expand_kernel(const LoraArgs a, int64_t rows_per_cta) {
  const int64_t tiles = (a.N + rows_per_cta - 1) / rows_per_cta;
  const int64_t m = blockIdx.x / tiles;
  const int64_t n_begin = (blockIdx.x % tiles) * rows_per_cta;
  const int64_t n_end = n_begin + rows_per_cta < a.N ? n_begin + rows_per_cta : a.N;
  const int64_t i = slot_of(a, m);
  if (i < 0) return;
  const int r = rank_of(a, i);
  if (r == 0) return;

  FUSEDPEFT_DYNAMIC_SHARED(float, us);  // s_i * u[m, :r_i]
  const float s = a.scalings[i];
  for (int j = threadIdx.x; j < r; j += blockDim.x) us[j] = s * a.u[m * a.R + j];
  __syncthreads();

  T* __restrict__ yr = static_cast<T*>(a.y) + m * a.ldy;
  const T* __restrict__ Bi = static_cast<const T*>(a.lora_B) + i * a.N * a.R;
  const int packs = (r + W - 1) / W;
  // G, the lanes per row of B, depends on the slot's rank only: uniform over the CTA.
  if (packs <= 1) {
    expand_rows<T, W, 1>(yr, Bi, us, r, a.R, n_begin, n_end);
  } else if (packs <= 2) {
    expand_rows<T, W, 2>(yr, Bi, us, r, a.R, n_begin, n_end);
  } else if (packs <= 4) {
    expand_rows<T, W, 4>(yr, Bi, us, r, a.R, n_begin, n_end);
  } else {
    expand_rows<T, W, 8>(yr, Bi, us, r, a.R, n_begin, n_end);
  }
}

// ------------------------------------------------------------------------------------ launchers
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), unsigned blocks, int threads, size_t smem, cudaStream_t stream, A... args) {
#ifdef FUSEDPEFT_BGMV_EMULATE
  (void)stream;
  return ::bgmv_emu::launch(kernel, blocks, threads, smem, args...);
#else
  kernel<<<blocks, threads, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

int num_sms() {
#ifdef FUSEDPEFT_BGMV_EMULATE
  return ::bgmv_emu::emulated_sms;
#else
  static std::atomic<int> cache[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 132;
  if (device >= 0 && device < 64) {
    int hit = cache[device].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear it: the launch that follows reports its own errors
    sms = 132;
  }
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <typename T>
cudaError_t launch_shrink(const LoraArgs& a, cudaStream_t stream, bool vec, int rc) {
  constexpr int W = 16 / sizeof(T);
  const int w = vec ? W : 1;
  const int u = rc >= 4 ? 2 : 4;
  const int64_t packs = (a.K + w - 1) / w;
  const int64_t want = (packs + u - 1) / u;  // threads that cover K with u packs each
  int threads = kWarp;
  while (threads < kShrinkMaxThreads && threads < want) threads *= 2;
  const int64_t blocks = a.M * ((a.R + rc - 1) / rc);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (vec && rc == 4) return launch(shrink_kernel<T, W, 4>, grid, threads, 0, stream, a);
  if (vec) return launch(shrink_kernel<T, W, 1>, grid, threads, 0, stream, a);
  if (rc == 4) return launch(shrink_kernel<T, 1, 4>, grid, threads, 0, stream, a);
  return launch(shrink_kernel<T, 1, 1>, grid, threads, 0, stream, a);
}

template <typename T>
cudaError_t launch_expand(const LoraArgs& a, cudaStream_t stream, bool vec, int64_t rows) {
  constexpr int W = 16 / sizeof(T);
  const int64_t blocks = a.M * ((a.N + rows - 1) / rows);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(blocks);
  const size_t smem = static_cast<size_t>(a.R) * sizeof(float);
  if (vec) return launch(expand_kernel<T, W>, grid, kExpandThreads, smem, stream, a, rows);
  return launch(expand_kernel<T, 1>, grid, kExpandThreads, smem, stream, a, rows);
}

bool valid(const LoraArgs& a) {
  return (a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat32) &&
         a.M >= 0 && a.K >= 0 && a.N >= 0 && a.S >= 0 && a.R >= 0 && a.R <= kMaxRank;
}

template <typename T>
struct ElementType {
  using type = T;
};

// launch(ElementType<T>{}) for the element type T of `dtype`; cudaErrorInvalidValue for an unknown one.
template <typename Launch>
cudaError_t with_element_type(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat16: return launch(ElementType<__half>{});
    case DType::kBFloat16: return launch(ElementType<__nv_bfloat16>{});
    case DType::kFloat32: return launch(ElementType<float>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool shrink_vectorized(const LoraArgs& a) {
  const int64_t w = 16 / elem_size(a.dtype);
  return a.K % w == 0 && (a.M <= 1 || a.ldx % w == 0) && aligned16(a.x) && aligned16(a.lora_A);
}

bool expand_vectorized(const LoraArgs& a) {
  const int64_t w = 16 / elem_size(a.dtype);
  return a.R % w == 0 && aligned16(a.lora_B);
}

int pick_shrink_ranks_per_cta(int64_t M, int64_t R, int num_sms) {
  // Four ranks per CTA (x loaded once for four) where the grid still has two CTAs per SM; else one.
  return M * ((R + 3) / 4) >= 2LL * num_sms ? 4 : 1;
}

int pick_expand_rows_per_cta(int64_t M, int64_t N, int num_sms) {
  // The largest tile (fewer CTAs, each with more rows in flight) that still gives two CTAs per SM.
  int64_t rows = 512;
  while (rows > 64 && M * ((N + rows - 1) / rows) < 2LL * num_sms) rows /= 2;
  return static_cast<int>(rows);
}

cudaError_t shrink(const LoraArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.M == 0 || a.R == 0) return cudaSuccess;
  int rc = a.shrink_ranks_per_cta;
  if (rc == 0) rc = pick_shrink_ranks_per_cta(a.M, a.R, num_sms());
  if (rc != 1 && rc != 4) return cudaErrorInvalidValue;
  const bool vec = shrink_vectorized(a);
  return with_element_type(a.dtype, [&](auto element) {
    return launch_shrink<typename decltype(element)::type>(a, stream, vec, rc);
  });
}

cudaError_t expand(const LoraArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0 || a.R == 0) return cudaSuccess;
  int64_t rows = a.expand_rows_per_cta;
  if (rows == 0) rows = pick_expand_rows_per_cta(a.M, a.N, num_sms());
  if (rows < 32 || rows > 4096 || (rows & (rows - 1)) != 0) return cudaErrorInvalidValue;
  const bool vec = expand_vectorized(a);
  return with_element_type(a.dtype, [&](auto element) {
    return launch_expand<typename decltype(element)::type>(a, stream, vec, rows);
  });
}

cudaError_t lora_update(const LoraArgs& a, cudaStream_t stream) {
  const cudaError_t err = shrink(a, stream);
  return err != cudaSuccess ? err : expand(a, stream);
}

}  // namespace bgmv
}  // namespace fusedpeft
