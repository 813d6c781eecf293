// pybind11 binding of the BGMV kernels (csrc/bgmv.h) for torch tensors: checks every argument's
// dtype, device, shape and layout with an error that names it, and launches on the current CUDA
// stream of x's device. Built as fusedpeft._C_bgmv by setup.py, or at first use by
// fusedpeft/_cuda_ext.py (torch.utils.cpp_extension.load, whose name sets TORCH_EXTENSION_NAME).
//
//   lora_update_(y, x, lora_A, lora_B, scalings, ranks, adapter_index, ranks_per_cta=0, rows_per_cta=0) -> y
//       y[m] += scalings[i] * (x[m] A[i, :r]^T) B[i, :, :r]^T,  i = adapter_index[m], r = ranks[i]
//   shrink(x, lora_A, ranks, adapter_index, ranks_per_cta=0) -> u (M, R) float32, entries j < r_i set
//   expand_(y, u, lora_B, scalings, ranks, adapter_index, rows_per_cta=0) -> y
//   lora_linear(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, overlap, ...) -> y
//       y = x W^T + b (torch's GEMM, cuBLAS) with the rank-r term added, in one call from Python;
//       with overlap the shrink runs on a side stream while the GEMM runs (see lora_linear below)
//
// Only headers torch installs with every wheel are used (c10/cuda, ATen/core, the pybind caster),
// so CI checks this file's syntax with g++ on a CPU machine.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bgmv.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_bgmv
#endif

namespace {

namespace bgmv = fusedpeft::bgmv;
using at::Tensor;

constexpr const char* kWho = "fusedpeft bgmv: ";

void check_device(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), kWho, name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), kWho, name, " is on ", t.device(), " but x is on ", x.device());
}

std::string shape_text(at::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// The expected shape is copied into a vector the check owns, and the message is plain strings.
void check_shape(const Tensor& t, const char* name, std::initializer_list<int64_t> expected, const char* meaning) {
  const std::vector<int64_t> shape(expected);
  if (t.sizes() == at::IntArrayRef(shape)) return;
  const std::string message = std::string(kWho) + name + " must have shape " + shape_text(shape) + " " + meaning +
                              ", got " + shape_text(t.sizes());
  TORCH_CHECK(false, message);
}

bgmv::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return bgmv::DType::kFloat16;
    case at::kBFloat16: return bgmv::DType::kBFloat16;
    case at::kFloat: return bgmv::DType::kFloat32;
    default:
      TORCH_CHECK(false, kWho, "x must be float16, bfloat16 or float32, got ", x.scalar_type());
  }
  return bgmv::DType::kFloat32;  // unreachable
}

// The checks every entry point shares; fills the pointers and sizes of what it was given.
// `x` is the tensor whose rows are the batch's (x itself, or y for expand_, which reads no x).
bgmv::LoraArgs common_args(const Tensor& x, const Tensor& ranks, const Tensor& adapter_index, int64_t S, int64_t R,
                           const char* x_name = "x") {
  TORCH_CHECK(x.dim() == 2, kWho, x_name, " must be 2-D (rows, features), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), kWho, x_name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, kWho, x_name, "'s rows must be contiguous (stride 1 along features), got strides ",
              x.strides());
  bgmv::LoraArgs a;
  a.dtype = dtype_of(x);
  a.M = x.size(0);
  a.S = S;
  a.R = R;
  TORCH_CHECK(R <= bgmv::kMaxRank, kWho, "the bank's max rank is ", R, "; the kernels take at most ", bgmv::kMaxRank);
  check_device(ranks, "ranks", x);
  TORCH_CHECK(ranks.scalar_type() == at::kInt, kWho, "ranks must be int32, got ", ranks.scalar_type());
  check_shape(ranks, "ranks", {S}, "(one per slot)");
  TORCH_CHECK(ranks.is_contiguous(), kWho, "ranks must be contiguous");
  check_device(adapter_index, "adapter_index", x);
  TORCH_CHECK(adapter_index.scalar_type() == at::kInt || adapter_index.scalar_type() == at::kLong, kWho,
              "adapter_index must be int32 or int64, got ", adapter_index.scalar_type());
  check_shape(adapter_index, "adapter_index", {a.M}, "(one per row of x)");
  TORCH_CHECK(adapter_index.is_contiguous(), kWho, "adapter_index must be contiguous");
  a.ranks = ranks.data_ptr<int32_t>();
  a.adapter_index = adapter_index.data_ptr();
  a.index_is_int64 = adapter_index.scalar_type() == at::kLong;
  return a;
}

void set_x(bgmv::LoraArgs& a, const Tensor& x) {
  a.x = x.data_ptr();
  a.K = x.size(1);
  a.ldx = x.size(0) > 1 ? x.stride(0) : x.size(1);
}

void set_A(bgmv::LoraArgs& a, const Tensor& lora_A, const Tensor& x) {
  check_device(lora_A, "lora_A", x);
  TORCH_CHECK(lora_A.scalar_type() == x.scalar_type(), kWho, "lora_A must be ", x.scalar_type(), " as x is, got ",
              lora_A.scalar_type());
  check_shape(lora_A, "lora_A", {a.S, a.R, a.K}, "(slots, max_rank, in_features)");
  TORCH_CHECK(lora_A.is_contiguous(), kWho, "lora_A must be contiguous");
  a.lora_A = lora_A.data_ptr();
}

void set_y(bgmv::LoraArgs& a, const Tensor& y, const Tensor& x) {
  check_device(y, "y", x);
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), kWho, "y must be ", x.scalar_type(), " as x is, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == a.M, kWho, "y must be (", a.M, ", out_features), got shape ", y.sizes());
  TORCH_CHECK(y.size(1) <= 1 || y.stride(1) == 1, kWho, "y's rows must be contiguous (stride 1 along out_features), got strides ",
              y.strides());
  a.y = y.data_ptr();
  a.N = y.size(1);
  a.ldy = y.size(0) > 1 ? y.stride(0) : y.size(1);
}

void set_B(bgmv::LoraArgs& a, const Tensor& lora_B, const Tensor& scalings, const Tensor& x) {
  check_device(lora_B, "lora_B", x);
  TORCH_CHECK(lora_B.scalar_type() == x.scalar_type(), kWho, "lora_B must be ", x.scalar_type(), " as x is, got ",
              lora_B.scalar_type());
  check_shape(lora_B, "lora_B", {a.S, a.N, a.R}, "(slots, out_features, max_rank)");
  TORCH_CHECK(lora_B.is_contiguous(), kWho, "lora_B must be contiguous");
  check_device(scalings, "scalings", x);
  TORCH_CHECK(scalings.scalar_type() == at::kFloat, kWho, "scalings must be float32, got ", scalings.scalar_type());
  check_shape(scalings, "scalings", {a.S}, "(one per slot)");
  TORCH_CHECK(scalings.is_contiguous(), kWho, "scalings must be contiguous");
  a.lora_B = lora_B.data_ptr();
  a.scalings = scalings.data_ptr<float>();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kWho, what, " failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (an argument the kernels cannot take: see csrc/bgmv.h)" : "");
}

void check_rank3(const Tensor& t, const char* name, const char* meaning) {
  if (t.dim() == 3) return;
  const std::string message = std::string(kWho) + name + " must be 3-D " + meaning + ", got shape " + shape_text(t.sizes());
  TORCH_CHECK(false, message);
}

void check_weight_and_bias(const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& x) {
  check_device(weight, "weight", x);
  if (weight.dim() != 2 || weight.size(1) != x.size(1)) {
    const std::string message = std::string(kWho) + "weight must be (out_features, " + std::to_string(x.size(1)) +
                                "), got shape " + shape_text(weight.sizes());
    TORCH_CHECK(false, message);
  }
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kWho, "weight must be ", x.scalar_type(), " as x is, got ",
              weight.scalar_type());
  if (bias.has_value()) {
    check_device(*bias, "bias", x);
    check_shape(*bias, "bias", {weight.size(0)}, "(out_features)");
  }
}

Tensor lora_update_(Tensor y, const Tensor& x, const Tensor& lora_A, const Tensor& lora_B, const Tensor& scalings,
                    const Tensor& ranks, const Tensor& adapter_index, int64_t ranks_per_cta, int64_t rows_per_cta) {
  check_rank3(lora_A, "lora_A", "(slots, max_rank, in_features)");
  bgmv::LoraArgs a = common_args(x, ranks, adapter_index, lora_A.size(0), lora_A.size(1));
  set_x(a, x);
  set_A(a, lora_A, x);
  set_y(a, y, x);
  set_B(a, lora_B, scalings, x);
  a.shrink_ranks_per_cta = static_cast<int>(ranks_per_cta);
  a.expand_rows_per_cta = static_cast<int>(rows_per_cta);
  if (a.M == 0 || a.N == 0 || a.R == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor u = at::empty({a.M, a.R}, x.options().dtype(at::kFloat));
  a.u = u.data_ptr<float>();
  check_launch(bgmv::lora_update(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "lora_update_");
  return y;
}

Tensor shrink(const Tensor& x, const Tensor& lora_A, const Tensor& ranks, const Tensor& adapter_index,
              int64_t ranks_per_cta) {
  check_rank3(lora_A, "lora_A", "(slots, max_rank, in_features)");
  bgmv::LoraArgs a = common_args(x, ranks, adapter_index, lora_A.size(0), lora_A.size(1));
  set_x(a, x);
  set_A(a, lora_A, x);
  a.shrink_ranks_per_cta = static_cast<int>(ranks_per_cta);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor u = at::empty({a.M, a.R}, x.options().dtype(at::kFloat));
  a.u = u.data_ptr<float>();
  check_launch(bgmv::shrink(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "shrink");
  return u;
}

Tensor expand_(Tensor y, const Tensor& u, const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks,
               const Tensor& adapter_index, int64_t rows_per_cta) {
  check_rank3(lora_B, "lora_B", "(slots, out_features, max_rank)");
  // The expand reads no x: u stands in for it (device, rows); y's dtype is the compute dtype.
  bgmv::LoraArgs a = common_args(y, ranks, adapter_index, lora_B.size(0), lora_B.size(2), "y");
  check_device(u, "u", y);
  TORCH_CHECK(u.scalar_type() == at::kFloat, kWho, "u must be float32, got ", u.scalar_type());
  check_shape(u, "u", {a.M, a.R}, "(rows, max_rank)");
  TORCH_CHECK(u.is_contiguous(), kWho, "u must be contiguous");
  set_y(a, y, y);
  set_B(a, lora_B, scalings, y);
  a.u = const_cast<float*>(u.data_ptr<float>());
  a.expand_rows_per_cta = static_cast<int>(rows_per_cta);
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(bgmv::expand(a, c10::cuda::getCurrentCUDAStream(y.device().index()).stream()), "expand_");
  return y;
}

// Two events per device, made once (cudaEventDisableTiming: a record costs about a microsecond). A
// wait takes the event's latest record at the time it is enqueued, so reusing them call after call
// is safe, in eager mode and inside a stream capture alike.
struct ForkEvents {
  cudaEvent_t inputs_ready = nullptr;
  cudaEvent_t shrink_done = nullptr;
};

constexpr int kMaxDevices = 64;

// A fixed table, never resized: a reference handed out stays valid while another thread creates
// the events of another device.
ForkEvents& fork_events(int device) {
  static std::mutex lock;
  static std::array<ForkEvents, kMaxDevices> events;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, kWho, "device index ", device, " past the ", kMaxDevices,
              " this extension keeps events for");
  const std::lock_guard<std::mutex> hold(lock);
  ForkEvents& e = events[device];
  if (e.inputs_ready == nullptr) {
    check_launch(cudaEventCreateWithFlags(&e.inputs_ready, cudaEventDisableTiming), "cudaEventCreate");
    check_launch(cudaEventCreateWithFlags(&e.shrink_done, cudaEventDisableTiming), "cudaEventCreate");
  }
  return e;
}

// y = x W^T + b + (per row) s_i (x A_i^T) B_i^T: the whole multi-adapter layer in one call.
//
// The shrink reads x and the adapters' A, not y, so it need not wait for the GEMM. At decode the
// GEMM is a weight-streaming GEMV (2 N K bytes; 32 MiB at K = N = 4096) and the shrink another
// memory-bound pass (2 D r K bytes of A for D distinct adapters); with `overlap` the shrink runs
// on a side stream from torch's pool, forked after what produced x and joined before the expand,
// so its bytes share the GEMM's time instead of following it: the layer costs about the GEMM,
// then the expand. A captured graph keeps the fork as two branches. Without `overlap` all three
// run on the current stream, in order. Either way Python makes one call (the GEMM is launched
// from here, not through a second Python call of torch.addmm).
//
// Streams and memory: u is allocated on the current stream and written on the side stream; the
// current stream waits for the shrink before the expand, so every later use of u's or x's memory
// on the current stream (after they are freed) comes after the shrink is done.
Tensor lora_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                   const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks, const Tensor& adapter_index,
                   bool overlap, int64_t ranks_per_cta, int64_t rows_per_cta) {
  check_rank3(lora_A, "lora_A", "(slots, max_rank, in_features)");
  bgmv::LoraArgs a = common_args(x, ranks, adapter_index, lora_A.size(0), lora_A.size(1));
  set_x(a, x);
  set_A(a, lora_A, x);
  check_weight_and_bias(weight, bias, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.device().index();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device);
  const bool update = a.M > 0 && weight.size(0) > 0 && a.R > 0;
  Tensor u;
  const ForkEvents* forked = nullptr;  // the events of the fork, where the shrink runs beside the GEMM
  if (update) {
    u = at::empty({a.M, a.R}, x.options().dtype(at::kFloat));
    a.u = u.data_ptr<float>();
    a.shrink_ranks_per_cta = static_cast<int>(ranks_per_cta);
    if (overlap) {
      forked = &fork_events(device);
      const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
      check_launch(cudaEventRecord(forked->inputs_ready, current.stream()), "cudaEventRecord");
      check_launch(cudaStreamWaitEvent(side.stream(), forked->inputs_ready, 0), "cudaStreamWaitEvent");
      check_launch(bgmv::shrink(a, side.stream()), "shrink");
      check_launch(cudaEventRecord(forked->shrink_done, side.stream()), "cudaEventRecord");
    } else {
      check_launch(bgmv::shrink(a, current.stream()), "shrink");
    }
  }
  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (!update) return y;
  if (forked != nullptr) {
    check_launch(cudaStreamWaitEvent(current.stream(), forked->shrink_done, 0), "cudaStreamWaitEvent");
  }
  set_y(a, y, x);
  set_B(a, lora_B, scalings, x);
  a.expand_rows_per_cta = static_cast<int>(rows_per_cta);
  check_launch(bgmv::expand(a, current.stream()), "expand_");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fusedpeft's BGMV kernels (csrc/bgmv.cu): the rank-r term of multi-adapter LoRA, added into y in place";
  m.def("lora_update_", &lora_update_, "y[m] += s_i (x[m] A_i^T) B_i^T over each row's slot i (in place); returns y",
        py::arg("y"), py::arg("x"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scalings"), py::arg("ranks"),
        py::arg("adapter_index"), py::arg("ranks_per_cta") = 0, py::arg("rows_per_cta") = 0);
  m.def("shrink", &shrink, "u[m, :r_i] = x[m] A_i[:r_i]^T in float32 (entries past r_i, and rows without a slot, unset)",
        py::arg("x"), py::arg("lora_A"), py::arg("ranks"), py::arg("adapter_index"), py::arg("ranks_per_cta") = 0);
  m.def("expand_", &expand_, "y[m] += s_i u[m, :r_i] B_i[:, :r_i]^T (in place); returns y", py::arg("y"), py::arg("u"),
        py::arg("lora_B"), py::arg("scalings"), py::arg("ranks"), py::arg("adapter_index"), py::arg("rows_per_cta") = 0);
  m.def("lora_linear", &lora_linear,
        "x W^T + b with each row's s_i (x[m] A_i^T) B_i^T added; overlap: the shrink on a side stream during the GEMM",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scalings"),
        py::arg("ranks"), py::arg("adapter_index"), py::arg("overlap") = false, py::arg("ranks_per_cta") = 0,
        py::arg("rows_per_cta") = 0);
  m.attr("max_rank") = bgmv::kMaxRank;
  // fusedpeft/_cuda_ext.py refuses a prebuilt module of another API_VERSION (a stale build).
  m.attr("api_version") = 2;
}
