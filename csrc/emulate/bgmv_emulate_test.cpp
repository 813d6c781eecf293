// Tests only: runs csrc/bgmv.cu's launchers and kernels on the CPU (cuda_emulation.h) against a
// float64 reference, over the paths a GPU would take: float16 / bfloat16 / float32, the 16-byte
// and the scalar loads, 1 and 4 ranks per shrink CTA, 1 to 8 lanes per row of B and ranks past
// 8 packs, int32 and int64 indices, -1 (and out-of-range) rows, ragged K and N, padded row strides,
// misaligned pointers, several CTAs per row. Rows of A and columns of B past a slot's rank hold
// NaN, as does the u workspace before the shrink: a read of any of them shows in the results.
//
// Build and run (tests/test_cuda_ext.py does):
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -pthread -DFUSEDPEFT_BGMV_EMULATE \
//       -I csrc -I <cuda>/include -x c++ csrc/bgmv.cu -x c++ csrc/emulate/bgmv_emulate_test.cpp -o emu
//   ./emu          (exit status 0 and "all N cases passed" on success)
#include "../bgmv.h"
#include "cuda_emulation.h"

#include <cinttypes>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using fusedpeft::bgmv::DType;
using fusedpeft::bgmv::LoraArgs;

namespace {

float to_f(float v) { return v; }
float to_f(__half v) { return __half2float(v); }
float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_f(float v);
template <>
float from_f<float>(float v) { return v; }
template <>
__half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <>
constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T>
const char* name_of() {
  return dtype_of<T>() == DType::kFloat32 ? "float32" : dtype_of<T>() == DType::kFloat16 ? "float16" : "bfloat16";
}

// The unit roundoff of the output dtype: y is rounded once to it.
template <typename T>
double roundoff() {
  return dtype_of<T>() == DType::kFloat32 ? 0x1p-24 : dtype_of<T>() == DType::kFloat16 ? 0x1p-11 : 0x1p-8;
}

struct Case {
  std::string what;
  int64_t M, K, N, R;
  std::vector<int> ranks;  // one per slot (S = ranks.size()); may exceed R or be negative: clamped
  bool index64 = false;
  int ranks_per_cta = 0, rows_per_cta = 0, sms = 132;
  int64_t pad_x = 0, pad_y = 0;      // row strides ldx = K + pad_x, ldy = N + pad_y
  int64_t shift_x = 0, shift_A = 0, shift_B = 0;  // element offsets of the base pointers
  std::vector<int64_t> index;        // explicit adapter_index; empty: random in [-1, S)
  int expect_vec_shrink = -1, expect_vec_expand = -1;  // -1: either
};

int failures = 0;

void fail(const Case& c, const char* dtype, const std::string& why) {
  if (++failures <= 30) std::fprintf(stderr, "FAIL [%s, %s]: %s\n", c.what.c_str(), dtype, why.c_str());
}

template <typename T>
void run(const Case& c, uint64_t seed) {
  const char* dn = name_of<T>();
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t M = c.M, K = c.K, N = c.N, R = c.R, S = static_cast<int64_t>(c.ranks.size());
  const int64_t ldx = K + c.pad_x, ldy = N + c.pad_y;

  auto clamp_rank = [&](int64_t s) { return std::max<int64_t>(0, std::min<int64_t>(c.ranks[s], R)); };

  // Exactly sized buffers (plus the shift), so AddressSanitizer sees a read past either end.
  std::vector<T> x(c.shift_x + (M ? (M - 1) * ldx + K : 0));
  std::vector<T> A(c.shift_A + S * R * K), B(c.shift_B + S * N * R);
  std::vector<T> y(M ? (M - 1) * ldy + N : 0);
  for (auto& v : x) v = from_f<T>(uni(rng));
  for (auto& v : y) v = from_f<T>(uni(rng));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < R; ++j) {
      for (int64_t k = 0; k < K; ++k) A[c.shift_A + (s * R + j) * K + k] = from_f<T>(j < clamp_rank(s) ? uni(rng) : nan);
      for (int64_t n = 0; n < N; ++n) B[c.shift_B + (s * N + n) * R + j] = from_f<T>(j < clamp_rank(s) ? uni(rng) : nan);
    }
  }
  std::vector<float> scalings(S);
  for (auto& v : scalings) v = 2.f * uni(rng);
  std::vector<int32_t> ranks(c.ranks.begin(), c.ranks.end());
  std::vector<int64_t> index(c.index);
  if (index.empty()) {
    std::uniform_int_distribution<int64_t> pick(-1, S - 1);
    for (int64_t m = 0; m < M; ++m) index.push_back(pick(rng));
  }
  std::vector<int32_t> index32(index.begin(), index.end());
  std::vector<float> u(M * R, nan);
  const std::vector<T> y0 = y;

  LoraArgs a;
  a.dtype = dtype_of<T>();
  a.y = y.data();
  a.x = x.data() + c.shift_x;
  a.lora_A = A.data() + c.shift_A;
  a.lora_B = B.data() + c.shift_B;
  a.scalings = scalings.data();
  a.ranks = ranks.data();
  a.index_is_int64 = c.index64;
  a.adapter_index = c.index64 ? static_cast<const void*>(index.data()) : static_cast<const void*>(index32.data());
  a.u = u.data();
  a.M = M, a.K = K, a.N = N, a.S = S, a.R = R, a.ldx = ldx, a.ldy = ldy;
  a.shrink_ranks_per_cta = c.ranks_per_cta;
  a.expand_rows_per_cta = c.rows_per_cta;
  bgmv_emu::emulated_sms = c.sms;

  const bool vs = fusedpeft::bgmv::shrink_vectorized(a), ve = fusedpeft::bgmv::expand_vectorized(a);
  if (c.expect_vec_shrink >= 0 && vs != static_cast<bool>(c.expect_vec_shrink)) fail(c, dn, "unexpected shrink load path");
  if (c.expect_vec_expand >= 0 && ve != static_cast<bool>(c.expect_vec_expand)) fail(c, dn, "unexpected expand load path");

  // What the kernels must not load: A's rows past each slot's rank; B's entries past it, except
  // those that share a 16-byte pack with the last entry read on the packed path.
  const int64_t pack = ve ? 16 / static_cast<int64_t>(sizeof(T)) : 1;
  std::vector<unsigned char> no_A(A.size() * sizeof(T), 0), no_B(B.size() * sizeof(T), 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = clamp_rank(s), r_read = (r + pack - 1) / pack * pack;
    for (int64_t j = r; j < R; ++j)
      std::fill_n(no_A.begin() + (c.shift_A + (s * R + j) * K) * sizeof(T), K * sizeof(T), 1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = r_read; j < R; ++j)
        std::fill_n(no_B.begin() + (c.shift_B + (s * N + n) * R + j) * sizeof(T), sizeof(T), 1);
  }
  bgmv_emu::forbidden.clear();
  bgmv_emu::forbid(A.data(), std::move(no_A));
  bgmv_emu::forbid(B.data(), std::move(no_B));

  const int before = bgmv_emu::errors.load();
  const cudaError_t err = fusedpeft::bgmv::lora_update(a, nullptr);
  bgmv_emu::forbidden.clear();
  if (err != cudaSuccess) fail(c, dn, "lora_update returned error " + std::to_string(static_cast<int>(err)));
  if (bgmv_emu::errors.load() != before) fail(c, dn, "the emulation reported errors (above)");

  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = index[m];
    const bool has = i >= 0 && i < S;
    const int64_t r = has ? clamp_rank(i) : 0;
    std::vector<double> ur(r, 0.0), ubound(r, 0.0);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(to_f(x[c.shift_x + m * ldx + k])) * double(to_f(A[c.shift_A + (i * R + j) * K + k]));
        ur[j] += p;
        ubound[j] += std::fabs(p);
      }
      const double got = u[m * R + j];
      if (!(std::fabs(got - ur[j]) <= 1e-5 * ubound[j] + 1e-30))
        fail(c, dn, "u[" + std::to_string(m) + ", " + std::to_string(j) + "] = " + std::to_string(got) +
                        ", reference " + std::to_string(ur[j]));
    }
    for (int64_t j = r; j < R; ++j)
      if (!std::isnan(u[m * R + j])) fail(c, dn, "the shrink wrote u past the slot's rank, or for a row without one");
    for (int64_t n = 0; n < N; ++n) {
      const double base = to_f(y0[m * ldy + n]);
      const double got = to_f(y[m * ldy + n]);
      if (!has || r == 0) {
        if (std::memcmp(&y[m * ldy + n], &y0[m * ldy + n], sizeof(T)) != 0)
          fail(c, dn, "row " + std::to_string(m) + " has no adapter but changed");
        continue;
      }
      double term = 0.0, bound = std::fabs(base);
      for (int64_t j = 0; j < r; ++j) {
        const double b = to_f(B[c.shift_B + (i * N + n) * R + j]);
        term += ur[j] * b;
        bound += std::fabs(scalings[i]) * ubound[j] * std::fabs(b);
      }
      const double ref = base + double(scalings[i]) * term;
      const double tol = roundoff<T>() * std::fabs(ref) + 1e-5 * bound + 1e-7;
      const double e = std::fabs(got - ref);
      if (!(e <= tol))
        fail(c, dn, "y[" + std::to_string(m) + ", " + std::to_string(n) + "] = " + std::to_string(got) +
                        ", reference " + std::to_string(ref) + " (tolerance " + std::to_string(tol) + ")");
      else if (tol > 0)
        worst = std::max(worst, e / tol);
    }
    if (!has) {
      for (int64_t j = 0; j < R; ++j)
        if (!std::isnan(u[m * R + j])) fail(c, dn, "the shrink wrote u for a row without an adapter");
    }
  }
  // Padding between y's rows is never written.
  for (int64_t m = 0; m + 1 < M; ++m)
    for (int64_t n = N; n < ldy; ++n)
      if (std::memcmp(&y[m * ldy + n], &y0[m * ldy + n], sizeof(T)) != 0) fail(c, dn, "y's row padding changed");
  std::printf("ok  %-58s %-8s shrink %-6s expand %-6s worst error %.2f of tolerance\n", c.what.c_str(), dn,
              vs ? "16B" : "scalar", ve ? "16B" : "scalar", worst);
  std::fflush(stdout);
}

void run_all_dtypes(const Case& c, uint64_t seed) {
  run<__nv_bfloat16>(c, seed);
  run<__half>(c, seed + 1);
  run<float>(c, seed + 2);
}

}  // namespace

int main() {
  std::vector<Case> cases;
  {  // The serving shape: mixed ranks 1..64 in an R = 64 bank, a rank-0 slot, -1 rows; heuristics
     // (few SMs: RC = 4 and a small expand tile).
    Case c{"mixed ranks, heuristics, 4 SMs", 9, 264, 70, 64, {1, 3, 8, 17, 64, 0, 33}};
    c.sms = 4;
    cases.push_back(c);
  }
  {
    Case c{"mixed ranks, heuristics, 132 SMs, int64", 5, 264, 70, 64, {1, 3, 8, 17, 64, 0, 33}};
    c.index64 = true;
    cases.push_back(c);
  }
  {  // K off the 16-byte pack: scalar shrink; R = 16 packs for 16-bit types.
    Case c{"K = 37 (scalar shrink), RC = 1, 32-row tiles", 7, 37, 33, 16, {16, 5, 9}};
    c.ranks_per_cta = 1, c.rows_per_cta = 32, c.index64 = true;
    c.expect_vec_shrink = 0;
    cases.push_back(c);
  }
  {  // R = 20: scalar expand for 16-bit types (20 % 8), 16-byte for float32 (20 % 4 == 0).
    Case c{"R = 20, ranks past 8 packs (scalar expand)", 4, 64, 50, 20, {20, 19, 12, 1}};
    c.ranks_per_cta = 4, c.rows_per_cta = 64;
    cases.push_back(c);
  }
  {  // R = 128: ranks past 8 packs on the 16-byte path (the remainder loop).
    Case c{"R = 128 (remainder loop)", 3, 136, 40, 128, {128, 100, 65, 7}};
    c.index = {0, 1, 2};
    cases.push_back(c);
  }
  {  // R = 160: s * u staged by more than one pass of the expand's 128 threads.
    Case c{"R = 160, ranks past the expand's block size", 2, 24, 20, 160, {160, 129}};
    c.index = {0, 1}, c.ranks_per_cta = 4;
    cases.push_back(c);
  }
  {  // M = 1, K past one pass of 256 threads (4096 with RC = 4: a second, partial pass); one tile of all N.
    Case c{"M = 1, K = 4104 (two passes), N = 300 in one tile", 1, 4104, 300, 16, {16, 8}};
    c.rows_per_cta = 4096, c.ranks_per_cta = 4, c.index = {1};
    cases.push_back(c);
  }
  {  // Misaligned bases: both phases fall back to scalar loads (the shrink: two passes over K).
    Case c{"misaligned x, A, B (scalar both), K = 1100", 4, 1100, 24, 16, {16, 4, 11}};
    c.shift_x = 1, c.shift_A = 1, c.shift_B = 1;
    c.expect_vec_shrink = 0, c.expect_vec_expand = 0;
    cases.push_back(c);
  }
  {  // Padded row strides of x and y (x: still 16-byte rows; y: any stride).
    Case c{"padded rows: ldx = K + 8, ldy = N + 3", 5, 48, 29, 8, {8, 2, 5}};
    c.pad_x = 8, c.pad_y = 3, c.ranks_per_cta = 4;
    c.expect_vec_shrink = 1, c.expect_vec_expand = 1;
    cases.push_back(c);
  }
  {  // x's rows off 16 bytes (ldx = K + 3): the shrink must take the scalar path.
    Case c{"ldx = K + 3 (scalar shrink)", 4, 32, 20, 8, {8, 3}};
    c.pad_x = 3;
    c.expect_vec_shrink = 0, c.expect_vec_expand = 1;
    cases.push_back(c);
  }
  {  // Indices out of [-1, S) and ranks out of [0, R]: rows skipped, ranks clamped.
    Case c{"index out of range, ranks clamped", 6, 16, 12, 8, {9, -2, 3}};
    c.index = {3, -7, 0, 1, 2, -1};
    cases.push_back(c);
  }
  {
    Case c{"every row without an adapter", 4, 16, 12, 8, {8, 8}};
    c.index = {-1, -1, -1, -1};
    cases.push_back(c);
  }
  {
    Case c{"M = 0", 0, 16, 12, 8, {8}};
    cases.push_back(c);
  }
  {  // K smaller than one pack per thread; tiny N.
    Case c{"K = 8, N = 1", 3, 8, 1, 8, {1, 8}};
    c.index = {0, 1, 1};
    cases.push_back(c);
  }

  uint64_t seed = 12345;
  for (const Case& c : cases) {
    run_all_dtypes(c, seed);
    seed += 10;
  }
  if (failures || bgmv_emu::errors.load()) {
    std::printf("%d failures, %d emulation errors\n", failures, bgmv_emu::errors.load());
    return 1;
  }
  std::printf("all %zu cases passed (x3 dtypes)\n", cases.size());
  return 0;
}
