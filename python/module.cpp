// sws_kernels._C: the only C++ that knows about Python. Arrays travel as raw addresses (Python ints,
// e.g. tensor.data_ptr()) plus sizes, so the extension links no libtorch and survives torch upgrades;
// sws_kernels/native.py owns the tensors, their dtypes and their lifetimes.
// std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError (pybind11's translation).
// The GIL is released around every kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "cpu/vecmath.h"

namespace py = pybind11;
using sws::ReconstructArgs;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

ReconstructArgs make_args(uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
                          uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos,
                          uintptr_t o_mu, uintptr_t o_rho, int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner,
                          int64_t codebook_owner) {
  ReconstructArgs a;
  a.means = ptr<const float>(means);
  a.chol = ptr<const float>(chol);
  a.K = K;
  a.labels = ptr<const void>(labels);
  a.labels_dtype = labels_dtype;
  a.n = n;
  a.e_pos = ptr<const int64_t>(e_pos);
  a.e_a = ptr<const int64_t>(e_a);
  a.e_b = ptr<const int64_t>(e_b);
  a.e_alpha = ptr<const float>(e_alpha);
  a.E = E;
  a.o_pos = ptr<const int64_t>(o_pos);
  a.o_mu = ptr<const float>(o_mu);
  a.o_rho = ptr<const float>(o_rho);
  a.O = O;
  a.seed = seed;
  a.S = S;
  a.mode = mode;
  a.owner = owner;
  a.codebook_owner = codebook_owner;
  return a;
}

void check_ptr(const char* fn, const char* name, uintptr_t p, int64_t count) {
  if (count > 0 && p == 0) throw std::invalid_argument(std::string(fn) + ": " + name + " is a null pointer");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sws_kernels native kernels (CPU/OpenMP and optionally CUDA); pointer arguments are addresses as ints";

#define SWS_RECON_ARGS                                                                                              \
  py::arg("means_ptr"), py::arg("chol_ptr"), py::arg("K"), py::arg("labels_ptr"), py::arg("labels_dtype"),          \
      py::arg("n"), py::arg("e_pos_ptr"), py::arg("e_a_ptr"), py::arg("e_b_ptr"), py::arg("e_alpha_ptr"),            \
      py::arg("E"), py::arg("o_pos_ptr"), py::arg("o_mu_ptr"), py::arg("o_rho_ptr"), py::arg("O"), py::arg("seed"), \
      py::arg("S"), py::arg("mode"), py::arg("owner"), py::arg("codebook_owner")

  m.def(
      "philox4x32",
      [](uintptr_t counter, uintptr_t key, uintptr_t out, int64_t n) {
        check_ptr("philox4x32", "counter_ptr", counter, n);
        check_ptr("philox4x32", "key_ptr", key, n);
        check_ptr("philox4x32", "out_ptr", out, n);
        sws::philox4x32_cpu(ptr<const int64_t>(counter), ptr<const int64_t>(key), ptr<int64_t>(out), n);
      },
      py::arg("counter_ptr"), py::arg("key_ptr"), py::arg("out_ptr"), py::arg("n"), py::call_guard<py::gil_scoped_release>(),
      "Philox4x32-10 on int64[n,4] counters and int64[n,2] keys (uint32 values in the low bits) -> int64[n,4].");

  m.def(
      "uniform",
      [](uintptr_t out, int64_t n, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose, uint64_t offset) {
        check_ptr("uniform", "out_ptr", out, n);
        sws::uniform_cpu(ptr<float>(out), n, offset, seed, sample, owner, purpose);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("sample") = 0, py::arg("owner") = 0,
      py::arg("purpose") = 0, py::arg("offset") = 0, py::call_guard<py::gil_scoped_release>(),
      "float32 out[n] = uniforms of elements offset..offset+n-1 of stream (seed, sample, owner, purpose).");

  m.def(
      "normal",
      [](uintptr_t out, int64_t n, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose, uint64_t offset) {
        check_ptr("normal", "out_ptr", out, n);
        sws::normal_cpu(ptr<float>(out), n, offset, seed, sample, owner, purpose);
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("sample") = 0, py::arg("owner") = 0,
      py::arg("purpose") = 0, py::arg("offset") = 0, py::call_guard<py::gil_scoped_release>(),
      "float32 out[n] = normals of elements offset..offset+n-1 of stream (seed, sample, owner, purpose).");

  m.def(
      "sws_linear_cpu",
      [](uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n, uintptr_t e_pos,
         uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu, uintptr_t o_rho,
         int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner, int64_t out_f,
         int64_t in_f, uintptr_t x, int64_t M, bool per_sample, uintptr_t bias, bool bias_per_sample, uintptr_t y) {
        const ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                            o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        check_ptr("sws_linear_cpu", "x_ptr", x, M * in_f);
        check_ptr("sws_linear_cpu", "y_ptr", y, M * out_f);
        sws::sws_linear_cpu(a, out_f, in_f, ptr<const float>(x), M, per_sample,
                            bias ? ptr<const float>(bias) : nullptr, bias_per_sample, ptr<float>(y));
      },
      SWS_RECON_ARGS, py::arg("out_f"), py::arg("in_f"), py::arg("x_ptr"), py::arg("M"), py::arg("per_sample"),
      py::arg("bias_ptr"), py::arg("bias_per_sample"), py::arg("y_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Fused small-M SWS linear forward (paper/mean): float32 y[S, M, out_f] = x W[s]^T (+ bias), W never "
      "materialised.");

  m.def(
      "reconstruct_cpu",
      [](uintptr_t out, uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
         uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu,
         uintptr_t o_rho, int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner) {
        const ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                            o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        check_ptr("reconstruct_cpu", "out_ptr", out, n);
        sws::reconstruct_cpu(a, ptr<float>(out));
      },
      py::arg("out_ptr"), SWS_RECON_ARGS, py::call_guard<py::gil_scoped_release>(),
      "float32 out[S, n] = sampled weights (mode 0 paper, 1 hierarchical, 2 mean).");

  m.def(
      "reconstruct_backward_cpu",
      [](uintptr_t grad_out, uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
         uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu,
         uintptr_t o_rho, int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner,
         uintptr_t grad_means, uintptr_t grad_chol, uintptr_t grad_mu_o, uintptr_t grad_rho_o) {
        const ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                            o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        const char* fn = "reconstruct_backward_cpu";
        check_ptr(fn, "grad_out_ptr", grad_out, n);
        check_ptr(fn, "grad_means_ptr", grad_means, K);
        check_ptr(fn, "grad_chol_ptr", grad_chol, K);
        check_ptr(fn, "grad_mu_o_ptr", grad_mu_o, O);
        check_ptr(fn, "grad_rho_o_ptr", grad_rho_o, O);
        sws::reconstruct_backward_cpu(a, ptr<const float>(grad_out), ptr<float>(grad_means), ptr<float>(grad_chol),
                                      ptr<float>(grad_mu_o), ptr<float>(grad_rho_o));
      },
      py::arg("grad_out_ptr"), SWS_RECON_ARGS, py::arg("grad_means_ptr"), py::arg("grad_chol_ptr"),
      py::arg("grad_mu_o_ptr"), py::arg("grad_rho_o_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Gradients (overwritten) of means[K,2], chol[K,3], o_mu[O], o_rho[O] from grad_out[S, n]; deterministic.");

  m.def(
      "mean_field_reconstruct_cpu",
      [](uintptr_t out, uintptr_t mu, uintptr_t rho, int64_t n, uint64_t seed, int64_t S, int64_t owner,
         int64_t purpose) {
        const char* fn = "mean_field_reconstruct_cpu";
        check_ptr(fn, "out_ptr", out, n);
        check_ptr(fn, "mu_ptr", mu, n);
        check_ptr(fn, "rho_ptr", rho, n);
        sws::mean_field_reconstruct_cpu(ptr<const float>(mu), ptr<const float>(rho), n, seed, S, owner, purpose,
                                        ptr<float>(out));
      },
      py::arg("out_ptr"), py::arg("mu_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("seed"), py::arg("S"),
      py::arg("owner"), py::arg("purpose"), py::call_guard<py::gil_scoped_release>(),
      "float32 out[S, n] = mu + softplus(rho) * eps[s], eps = normals of stream (seed, s, owner, purpose).");

  m.def(
      "mean_field_reconstruct_backward_cpu",
      [](uintptr_t grad_w, uintptr_t rho, int64_t n, uint64_t seed, int64_t S, int64_t owner, int64_t purpose,
         uintptr_t grad_mu, uintptr_t grad_rho) {
        const char* fn = "mean_field_reconstruct_backward_cpu";
        check_ptr(fn, "grad_w_ptr", grad_w, n);
        check_ptr(fn, "rho_ptr", rho, n);
        check_ptr(fn, "grad_mu_ptr", grad_mu, n);
        check_ptr(fn, "grad_rho_ptr", grad_rho, n);
        sws::mean_field_reconstruct_backward_cpu(ptr<const float>(grad_w), ptr<const float>(rho), n, seed, S, owner,
                                                 purpose, ptr<float>(grad_mu), ptr<float>(grad_rho));
      },
      py::arg("grad_w_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("seed"), py::arg("S"), py::arg("owner"),
      py::arg("purpose"), py::arg("grad_mu_ptr"), py::arg("grad_rho_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Overwrites grad_mu[n] = sum_s grad_w[s], grad_rho[n] = sum_s grad_w[s] eps[s] * softplus'(rho); deterministic.");

  m.def("simd_level", []() { return std::string(sws::simd_level()); },
        "The vector version the CPU normal/softplus code uses now: 'avx2' or 'scalar'.");
  m.def("set_simd", &sws::set_simd, py::arg("enabled"),
        "Enable (default) or disable the AVX2 normal/softplus code (process-wide; for tests and benchmarks).");

#if defined(SWS_WITH_CUDA)
  m.def(
      "reconstruct_cuda",
      [](uintptr_t out, uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
         uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu,
         uintptr_t o_rho, int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner,
         uintptr_t zbuf, uintptr_t stream, uintptr_t seed_dev) {
        ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                      o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        a.seed_dev = ptr<const int64_t>(seed_dev);
        check_ptr("reconstruct_cuda", "out_ptr", out, n);
        check_ptr("reconstruct_cuda", "zbuf_ptr", zbuf, K);
        sws::reconstruct_cuda(a, ptr<float>(out), ptr<float>(zbuf), stream);
      },
      py::arg("out_ptr"), SWS_RECON_ARGS, py::arg("zbuf_ptr"), py::arg("stream") = 0, py::arg("seed_dev_ptr") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Device pointers. zbuf: float32 workspace of S*K*2 elements. Asynchronous on `stream` (cudaStream_t as int).");

  m.def(
      "mean_field_reconstruct_cuda",
      [](uintptr_t out, uintptr_t mu, uintptr_t rho, int64_t n, uint64_t seed, int64_t S, int64_t owner,
         int64_t purpose, uintptr_t stream, uintptr_t seed_dev) {
        const char* fn = "mean_field_reconstruct_cuda";
        check_ptr(fn, "out_ptr", out, n);
        check_ptr(fn, "mu_ptr", mu, n);
        check_ptr(fn, "rho_ptr", rho, n);
        sws::mean_field_reconstruct_cuda(ptr<const float>(mu), ptr<const float>(rho), n, seed,
                                         ptr<const int64_t>(seed_dev), S, owner, purpose, ptr<float>(out), stream);
      },
      py::arg("out_ptr"), py::arg("mu_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("seed"), py::arg("S"),
      py::arg("owner"), py::arg("purpose"), py::arg("stream") = 0, py::arg("seed_dev_ptr") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Device pointers; as mean_field_reconstruct_cpu, asynchronous on `stream`.");

  m.def(
      "mean_field_reconstruct_backward_cuda",
      [](uintptr_t grad_w, uintptr_t rho, int64_t n, uint64_t seed, int64_t S, int64_t owner, int64_t purpose,
         uintptr_t grad_mu, uintptr_t grad_rho, uintptr_t stream, uintptr_t seed_dev) {
        const char* fn = "mean_field_reconstruct_backward_cuda";
        check_ptr(fn, "grad_w_ptr", grad_w, n);
        check_ptr(fn, "rho_ptr", rho, n);
        check_ptr(fn, "grad_mu_ptr", grad_mu, n);
        check_ptr(fn, "grad_rho_ptr", grad_rho, n);
        sws::mean_field_reconstruct_backward_cuda(ptr<const float>(grad_w), ptr<const float>(rho), n, seed,
                                                  ptr<const int64_t>(seed_dev), S, owner, purpose, ptr<float>(grad_mu),
                                                  ptr<float>(grad_rho), stream);
      },
      py::arg("grad_w_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("seed"), py::arg("S"), py::arg("owner"),
      py::arg("purpose"), py::arg("grad_mu_ptr"), py::arg("grad_rho_ptr"), py::arg("stream") = 0,
      py::arg("seed_dev_ptr") = 0, py::call_guard<py::gil_scoped_release>(), "Device pointers; as mean_field_reconstruct_backward_cpu.");

  m.def(
      "sws_linear_cuda",
      [](uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n, uintptr_t e_pos,
         uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu, uintptr_t o_rho,
         int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner, int64_t out_f,
         int64_t in_f, uintptr_t x, int x_dtype, int64_t M, bool per_sample, uintptr_t bias, bool bias_per_sample,
         uintptr_t y, uintptr_t ov_mask, uintptr_t ov_rows, uintptr_t ov_pos, uintptr_t ov_idx, uintptr_t zbuf,
         uintptr_t stream, uintptr_t seed_dev) {
        ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                      o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        a.seed_dev = ptr<const int64_t>(seed_dev);
        const char* fn = "sws_linear_cuda";
        check_ptr(fn, "x_ptr", x, M);
        check_ptr(fn, "y_ptr", y, M);
        check_ptr(fn, "zbuf_ptr", zbuf, K);
        sws::LinearArgs l;
        l.out_f = out_f;
        l.in_f = in_f;
        l.x = ptr<const void>(x);
        l.x_dtype = x_dtype;
        l.M = M;
        l.per_sample = per_sample;
        l.bias = ptr<const float>(bias);
        l.bias_per_sample = bias_per_sample;
        l.y = ptr<void>(y);
        l.ov_mask = ptr<const uint32_t>(ov_mask);
        l.ov_rows = ptr<const int64_t>(ov_rows);
        l.ov_pos = ptr<const int64_t>(ov_pos);
        l.ov_idx = ptr<const int64_t>(ov_idx);
        sws::sws_linear_cuda(a, l, ptr<float>(zbuf), stream);
      },
      SWS_RECON_ARGS, py::arg("out_f"), py::arg("in_f"), py::arg("x_ptr"), py::arg("x_dtype"), py::arg("M"),
      py::arg("per_sample"), py::arg("bias_ptr"), py::arg("bias_per_sample"), py::arg("y_ptr"), py::arg("ov_mask_ptr"),
      py::arg("ov_rows_ptr"), py::arg("ov_pos_ptr"), py::arg("ov_idx_ptr"), py::arg("zbuf_ptr"), py::arg("stream") = 0,
      py::arg("seed_dev_ptr") = 0, py::call_guard<py::gil_scoped_release>(),
      "Fused small-M (M <= 16) SWS linear forward, device pointers: y[S, M, out_f] = x W[s]^T (+ bias float32). "
      "x_dtype 0 float32, 1 float16, 2 bfloat16 (y the same); zbuf float32 workspace of S*K*2.");

  m.def(
      "reconstruct_backward_cuda",
      [](uintptr_t grad_out, uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
         uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos, uintptr_t o_mu,
         uintptr_t o_rho, int64_t O, uint64_t seed, int64_t S, int mode, int64_t owner, int64_t codebook_owner,
         uintptr_t grad_means, uintptr_t grad_chol, uintptr_t grad_mu_o, uintptr_t grad_rho_o, uintptr_t seg_offsets,
         uintptr_t seg_pos, uintptr_t seg_coef, int64_t n_entries, uintptr_t dzbuf, uintptr_t stream,
         uintptr_t seed_dev) {
        ReconstructArgs a = make_args(means, chol, K, labels, labels_dtype, n, e_pos, e_a, e_b, e_alpha, E, o_pos,
                                      o_mu, o_rho, O, seed, S, mode, owner, codebook_owner);
        a.seed_dev = ptr<const int64_t>(seed_dev);
        const char* fn = "reconstruct_backward_cuda";
        check_ptr(fn, "grad_out_ptr", grad_out, n);
        check_ptr(fn, "seg_offsets_ptr", seg_offsets, K + 1);
        check_ptr(fn, "seg_pos_ptr", seg_pos, n_entries);
        check_ptr(fn, "seg_coef_ptr", seg_coef, n_entries);
        check_ptr(fn, "dzbuf_ptr", dzbuf, K);
        sws::reconstruct_backward_cuda(a, ptr<const float>(grad_out), ptr<const int64_t>(seg_offsets),
                                       ptr<const int64_t>(seg_pos), ptr<const float>(seg_coef), n_entries,
                                       ptr<double>(dzbuf), ptr<float>(grad_means), ptr<float>(grad_chol),
                                       ptr<float>(grad_mu_o), ptr<float>(grad_rho_o), stream);
      },
      py::arg("grad_out_ptr"), SWS_RECON_ARGS, py::arg("grad_means_ptr"), py::arg("grad_chol_ptr"),
      py::arg("grad_mu_o_ptr"), py::arg("grad_rho_o_ptr"), py::arg("seg_offsets_ptr"), py::arg("seg_pos_ptr"),
      py::arg("seg_coef_ptr"), py::arg("n_entries"), py::arg("dzbuf_ptr"), py::arg("stream") = 0,
      py::arg("seed_dev_ptr") = 0, py::call_guard<py::gil_scoped_release>(),
      "Device pointers. seg_*: label-sorted CSR of inlier/ellipse entries (offsets int64[K+1], pos int64[N], "
      "coef float32[N]); dzbuf: float64 workspace of S*K*2 elements. Deterministic.");
#endif

  // CUDA facts. with_cuda / cuda_runtime_version / cuda_archs are compile-time constants; cuda_probe() is
  // the only call that reaches the driver, and native.py makes it lazily (import must create no context).
#if defined(SWS_WITH_CUDA)
  m.def(
      "cuda_probe",
      []() -> py::dict {
        const sws::CudaProbe p = sws::cuda_probe();
        py::list devices;
        for (const auto& d : p.devices)
          devices.append(py::make_tuple(d.index, d.name, d.major, d.minor, d.sm_count));
        py::dict out;
        out["driver_version"] = p.driver_version;
        out["count_error"] = p.count_error;
        out["count_error_name"] = p.count_error_name;
        out["count_error_string"] = p.count_error_string;
        out["device_count"] = p.device_count;
        out["devices"] = devices;
        return out;
      },
      "Device queries, no context: {driver_version, count_error, count_error_name, count_error_string, "
      "device_count, devices: [(index, name, major, minor, sm_count)]}. sws_kernels.native calls it lazily.");
#endif

  m.def("omp_max_threads", &sws::omp_max_threads, "OpenMP max threads (1 when built without OpenMP).");
  m.def("set_num_threads", &sws::omp_set_threads, py::arg("n"),
        "omp_set_num_threads for this module's OpenMP runtime (the calling thread).");
#if defined(_OPENMP)
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
#if defined(SWS_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("linear_max_m") = sws::kLinearMaxM;
  m.attr("cuda_runtime_version") = sws::cuda_runtime_build_version();
  // CMAKE_CUDA_ARCHITECTURES with ',' for ';' (CMakeLists.txt): which devices have code in this build.
  m.attr("cuda_archs") = SWS_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_runtime_version") = 0;
  m.attr("cuda_archs") = "";
#endif
}
