// sws_kernels._C: the only C++ that knows about Python. Arrays travel as raw addresses (Python ints,
// e.g. tensor.data_ptr()) plus sizes, so the extension links no libtorch and survives torch upgrades;
// sws_kernels/native.py owns the tensors, their dtypes and their lifetimes.
//
// Every kernel entry point takes one argument bundle, the C++ struct itself bound as a class
// (ReconstructArgs for reconstruct, its backward and the fused linear; MeanFieldArgs for the mean-field ops;
// LinearArgs for the fused linear's extras), plus its op-specific outputs and workspaces. Pointer fields are
// addresses (ints); native.py builds each bundle in one place.
// std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError (pybind11's translation).
// The GIL is released around every kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "common.h"
#include "cpu/vecmath.h"
#include "cpu/histogram.h"  // issue 14: the label-histogram linear forward
#include "cpu/layer.h"  // issue 11: the layers' one-row backward

namespace py = pybind11;
using sws::LinearArgs;
using sws::MeanFieldArgs;
using sws::ReconstructArgs;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_ptr(const char* fn, const char* name, uintptr_t p, int64_t count) {
  if (count > 0 && p == 0) throw std::invalid_argument(std::string(fn) + ": " + name + " is a null pointer");
}

// The *_run / one-row entries (the layers' steady-state calls, sws_kernels/_bound.py): the bundles are the
// caller's, reused across calls and shared by threads, so this call's seed and S go into a copy (no lock, no
// attribute writes from Python). seed_ptr: the address of a CPU int64 seed tensor (read here), else 0 and
// seed is the value.
template <class A>
A for_call(const A& a0, uint64_t seed, uintptr_t seed_ptr, int64_t S) {
  A a = a0;
  a.seed = seed_ptr ? *ptr<const uint64_t>(seed_ptr) : seed;
  a.S = S;
  return a;
}

// Runs f, releasing the GIL only around work that is worth it: releasing and re-taking it costs more than a
// tiny layer's kernel.
template <class F>
void run_gil_aware(int64_t work, F&& f) {
  if (work < (1 << 16)) {
    f();
    return;
  }
  py::gil_scoped_release release;
  f();
}

sws::RowBackward row_backward(int64_t out_f, int64_t in_f, uintptr_t gy, uintptr_t x, bool x_per_sample) {
  sws::RowBackward r;
  r.out_f = out_f;
  r.in_f = in_f;
  r.gy = ptr<const float>(gy);
  r.x = ptr<const float>(x);
  r.x_per_sample = x_per_sample;
  return r;
}

// A pointer member as a read/write Python int property (the address).
template <class C, class T>
void ptr_field(py::class_<C>& cls, const char* name, T* C::*field) {
  cls.def_property(
      name, [field](const C& c) { return reinterpret_cast<uintptr_t>(c.*field); },
      [field](C& c, uintptr_t p) { c.*field = reinterpret_cast<T*>(p); });
}

template <class C, class T>
void add_field(std::ostringstream& os, const char* name, T* C::*field, const C& c, bool& first) {
  os << (first ? "" : ", ") << name << "=0x" << std::hex << reinterpret_cast<uintptr_t>(c.*field) << std::dec;
  first = false;
}

template <class C, class T>
void add_value(std::ostringstream& os, const char* name, T C::*field, const C& c, bool& first) {
  os << (first ? "" : ", ") << name << "=" << +(c.*field);
  first = false;
}

void bind_args(py::module_& m) {
  py::class_<ReconstructArgs> ra(m, "ReconstructArgs",
                                 "Everything reconstruct, its backward and the fused linear read (csrc/common.h). "
                                 "Pointer fields are addresses (ints, 0 = null); seed is the uint64 host value, "
                                 "seed_dev the address of the int64 seed in device memory (CUDA; 0: use seed).");
  ra.def(py::init([](uintptr_t means, uintptr_t chol, int64_t K, uintptr_t labels, int labels_dtype, int64_t n,
                     uintptr_t e_pos, uintptr_t e_a, uintptr_t e_b, uintptr_t e_alpha, int64_t E, uintptr_t o_pos,
                     uintptr_t o_mu, uintptr_t o_rho, int64_t O, uint64_t seed, uintptr_t seed_dev, int64_t S, int mode,
                     int64_t owner, int64_t codebook_owner) {
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
           a.seed_dev = ptr<const int64_t>(seed_dev);
           a.S = S;
           a.mode = mode;
           a.owner = owner;
           a.codebook_owner = codebook_owner;
           return a;
         }),
         py::arg("means") = 0, py::arg("chol") = 0, py::arg("K") = 0, py::arg("labels") = 0,
         py::arg("labels_dtype") = 0, py::arg("n") = 0, py::arg("e_pos") = 0, py::arg("e_a") = 0, py::arg("e_b") = 0,
         py::arg("e_alpha") = 0, py::arg("E") = 0, py::arg("o_pos") = 0, py::arg("o_mu") = 0, py::arg("o_rho") = 0,
         py::arg("O") = 0, py::arg("seed") = 0, py::arg("seed_dev") = 0, py::arg("S") = 1, py::arg("mode") = 0,
         py::arg("owner") = 0, py::arg("codebook_owner") = 0);
  ptr_field(ra, "means", &ReconstructArgs::means);
  ptr_field(ra, "chol", &ReconstructArgs::chol);
  ra.def_readwrite("K", &ReconstructArgs::K);
  ptr_field(ra, "labels", &ReconstructArgs::labels);
  ra.def_readwrite("labels_dtype", &ReconstructArgs::labels_dtype);
  ra.def_readwrite("n", &ReconstructArgs::n);
  ptr_field(ra, "e_pos", &ReconstructArgs::e_pos);
  ptr_field(ra, "e_a", &ReconstructArgs::e_a);
  ptr_field(ra, "e_b", &ReconstructArgs::e_b);
  ptr_field(ra, "e_alpha", &ReconstructArgs::e_alpha);
  ra.def_readwrite("E", &ReconstructArgs::E);
  ptr_field(ra, "o_pos", &ReconstructArgs::o_pos);
  ptr_field(ra, "o_mu", &ReconstructArgs::o_mu);
  ptr_field(ra, "o_rho", &ReconstructArgs::o_rho);
  ra.def_readwrite("O", &ReconstructArgs::O);
  ra.def_readwrite("seed", &ReconstructArgs::seed);
  ptr_field(ra, "seed_dev", &ReconstructArgs::seed_dev);
  ra.def_readwrite("S", &ReconstructArgs::S);
  ra.def_readwrite("mode", &ReconstructArgs::mode);
  ra.def_readwrite("owner", &ReconstructArgs::owner);
  ra.def_readwrite("codebook_owner", &ReconstructArgs::codebook_owner);
  // a shard's global element mapping (common.h; default 0 = the identity), set by sws_kernels/_ops.py for TP shards
  ra.def_readwrite("elem_offset", &ReconstructArgs::elem_offset);
  ra.def_readwrite("row_stride", &ReconstructArgs::row_stride);
  ra.def_readwrite("row_len", &ReconstructArgs::row_len);
  ra.def("__repr__", [](const ReconstructArgs& a) {
    std::ostringstream os;
    bool first = true;
    os << "ReconstructArgs(";
    add_field(os, "means", &ReconstructArgs::means, a, first);
    add_field(os, "chol", &ReconstructArgs::chol, a, first);
    add_value(os, "K", &ReconstructArgs::K, a, first);
    add_field(os, "labels", &ReconstructArgs::labels, a, first);
    add_value(os, "labels_dtype", &ReconstructArgs::labels_dtype, a, first);
    add_value(os, "n", &ReconstructArgs::n, a, first);
    add_field(os, "e_pos", &ReconstructArgs::e_pos, a, first);
    add_field(os, "e_a", &ReconstructArgs::e_a, a, first);
    add_field(os, "e_b", &ReconstructArgs::e_b, a, first);
    add_field(os, "e_alpha", &ReconstructArgs::e_alpha, a, first);
    add_value(os, "E", &ReconstructArgs::E, a, first);
    add_field(os, "o_pos", &ReconstructArgs::o_pos, a, first);
    add_field(os, "o_mu", &ReconstructArgs::o_mu, a, first);
    add_field(os, "o_rho", &ReconstructArgs::o_rho, a, first);
    add_value(os, "O", &ReconstructArgs::O, a, first);
    add_value(os, "seed", &ReconstructArgs::seed, a, first);
    add_field(os, "seed_dev", &ReconstructArgs::seed_dev, a, first);
    add_value(os, "S", &ReconstructArgs::S, a, first);
    add_value(os, "mode", &ReconstructArgs::mode, a, first);
    add_value(os, "owner", &ReconstructArgs::owner, a, first);
    add_value(os, "codebook_owner", &ReconstructArgs::codebook_owner, a, first);
    os << ")";
    return os.str();
  });

  py::class_<MeanFieldArgs> mf(m, "MeanFieldArgs",
                               "Everything mean-field reconstruct and its backward read (csrc/common.h): mu, rho "
                               "addresses (the backward reads rho only), n, seed (+ seed_dev on CUDA), S, owner, "
                               "purpose.");
  mf.def(py::init([](uintptr_t mu, uintptr_t rho, int64_t n, uint64_t seed, uintptr_t seed_dev, int64_t S,
                     int64_t owner, int64_t purpose) {
           MeanFieldArgs a;
           a.mu = ptr<const float>(mu);
           a.rho = ptr<const float>(rho);
           a.n = n;
           a.seed = seed;
           a.seed_dev = ptr<const int64_t>(seed_dev);
           a.S = S;
           a.owner = owner;
           a.purpose = purpose;
           return a;
         }),
         py::arg("mu") = 0, py::arg("rho") = 0, py::arg("n") = 0, py::arg("seed") = 0, py::arg("seed_dev") = 0,
         py::arg("S") = 1, py::arg("owner") = 0, py::arg("purpose") = 0);
  ptr_field(mf, "mu", &MeanFieldArgs::mu);
  ptr_field(mf, "rho", &MeanFieldArgs::rho);
  mf.def_readwrite("n", &MeanFieldArgs::n);
  mf.def_readwrite("seed", &MeanFieldArgs::seed);
  ptr_field(mf, "seed_dev", &MeanFieldArgs::seed_dev);
  mf.def_readwrite("S", &MeanFieldArgs::S);
  mf.def_readwrite("owner", &MeanFieldArgs::owner);
  mf.def_readwrite("elem_offset", &MeanFieldArgs::elem_offset);  // a shard's mapping (common.h; 0 = identity)
  mf.def_readwrite("row_stride", &MeanFieldArgs::row_stride);
  mf.def_readwrite("row_len", &MeanFieldArgs::row_len);
  mf.def_readwrite("purpose", &MeanFieldArgs::purpose);
  mf.def("__repr__", [](const MeanFieldArgs& a) {
    std::ostringstream os;
    bool first = true;
    os << "MeanFieldArgs(";
    add_field(os, "mu", &MeanFieldArgs::mu, a, first);
    add_field(os, "rho", &MeanFieldArgs::rho, a, first);
    add_value(os, "n", &MeanFieldArgs::n, a, first);
    add_value(os, "seed", &MeanFieldArgs::seed, a, first);
    add_field(os, "seed_dev", &MeanFieldArgs::seed_dev, a, first);
    add_value(os, "S", &MeanFieldArgs::S, a, first);
    add_value(os, "owner", &MeanFieldArgs::owner, a, first);
    add_value(os, "purpose", &MeanFieldArgs::purpose, a, first);
    os << ")";
    return os.str();
  });

  py::class_<LinearArgs> la(m, "LinearArgs",
                            "The fused small-M linear's extras (csrc/common.h): labels are [out_f, in_f]; x, y, bias "
                            "addresses; x_dtype 0 float32, 1 float16, 2 bfloat16; ov_*: the CUDA kernel's "
                            "ellipse/outlier overrides (0 when E + O == 0; unused on the CPU).");
  la.def(py::init([](int64_t out_f, int64_t in_f, uintptr_t x, int x_dtype, int64_t M, bool per_sample, uintptr_t bias,
                     bool bias_per_sample, uintptr_t y, uintptr_t ov_mask, uintptr_t ov_rows, uintptr_t ov_pos,
                     uintptr_t ov_idx) {
           LinearArgs l;
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
           return l;
         }),
         py::arg("out_f") = 0, py::arg("in_f") = 0, py::arg("x") = 0, py::arg("x_dtype") = 0, py::arg("M") = 0,
         py::arg("per_sample") = false, py::arg("bias") = 0, py::arg("bias_per_sample") = false, py::arg("y") = 0,
         py::arg("ov_mask") = 0, py::arg("ov_rows") = 0, py::arg("ov_pos") = 0, py::arg("ov_idx") = 0);
  la.def_readwrite("out_f", &LinearArgs::out_f);
  la.def_readwrite("in_f", &LinearArgs::in_f);
  ptr_field(la, "x", &LinearArgs::x);
  la.def_readwrite("x_dtype", &LinearArgs::x_dtype);
  la.def_readwrite("M", &LinearArgs::M);
  la.def_readwrite("per_sample", &LinearArgs::per_sample);
  ptr_field(la, "bias", &LinearArgs::bias);
  la.def_readwrite("bias_per_sample", &LinearArgs::bias_per_sample);
  ptr_field(la, "y", &LinearArgs::y);
  ptr_field(la, "ov_mask", &LinearArgs::ov_mask);
  ptr_field(la, "ov_rows", &LinearArgs::ov_rows);
  ptr_field(la, "ov_pos", &LinearArgs::ov_pos);
  ptr_field(la, "ov_idx", &LinearArgs::ov_idx);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sws_kernels native kernels (CPU/OpenMP and optionally CUDA); pointer arguments are addresses as ints";
  bind_args(m);

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
      "reconstruct_cpu",
      [](const ReconstructArgs& a, uintptr_t out) {
        check_ptr("reconstruct_cpu", "out_ptr", out, a.n);
        sws::reconstruct_cpu(a, ptr<float>(out));
      },
      py::arg("args"), py::arg("out_ptr"), py::call_guard<py::gil_scoped_release>(),
      "float32 out[S, n] = sampled weights (mode 0 paper, 1 hierarchical, 2 mean).");

  m.def(
      "reconstruct_backward_cpu",
      [](const ReconstructArgs& a, uintptr_t grad_out, uintptr_t grad_means, uintptr_t grad_chol, uintptr_t grad_mu_o,
         uintptr_t grad_rho_o) {
        const char* fn = "reconstruct_backward_cpu";
        check_ptr(fn, "grad_out_ptr", grad_out, a.n);
        check_ptr(fn, "grad_means_ptr", grad_means, a.K);
        check_ptr(fn, "grad_chol_ptr", grad_chol, a.K);
        check_ptr(fn, "grad_mu_o_ptr", grad_mu_o, a.O);
        check_ptr(fn, "grad_rho_o_ptr", grad_rho_o, a.O);
        sws::reconstruct_backward_cpu(a, ptr<const float>(grad_out), ptr<float>(grad_means), ptr<float>(grad_chol),
                                      ptr<float>(grad_mu_o), ptr<float>(grad_rho_o));
      },
      py::arg("args"), py::arg("grad_out_ptr"), py::arg("grad_means_ptr"), py::arg("grad_chol_ptr"),
      py::arg("grad_mu_o_ptr"), py::arg("grad_rho_o_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Gradients (overwritten) of means[K,2], chol[K,3], o_mu[O], o_rho[O] from grad_out[S, n]; deterministic.");

  m.def(
      "sws_linear_cpu",
      [](const ReconstructArgs& a, const LinearArgs& l) {
        check_ptr("sws_linear_cpu", "x", reinterpret_cast<uintptr_t>(l.x), l.M * l.in_f);
        check_ptr("sws_linear_cpu", "y", reinterpret_cast<uintptr_t>(l.y), l.M * l.out_f);
        sws::sws_linear_cpu(a, l);
      },
      py::arg("args"), py::arg("linear"), py::call_guard<py::gil_scoped_release>(),
      "Fused small-M SWS linear forward (paper/mean, float32 x, M <= 32): float32 y[S, M, out_f] = x W[s]^T "
      "(+ bias), W never materialised.");

  // The layers' steady-state calls (sws_kernels/_bound.py): see for_call and run_gil_aware above.
  m.def(
      "sws_linear_cpu_run",
      [](const ReconstructArgs& a0, const LinearArgs& l0, uintptr_t x, uintptr_t y, uintptr_t bias,
         bool bias_per_sample, uint64_t seed, uintptr_t seed_ptr, int64_t S) {
        const ReconstructArgs a = for_call(a0, seed, seed_ptr, S);
        LinearArgs l = l0;
        l.x = ptr<const void>(x);
        l.y = ptr<void>(y);
        l.bias = ptr<const float>(bias);
        l.bias_per_sample = bias_per_sample;
        check_ptr("sws_linear_cpu_run", "x", x, l.M * l.in_f);
        check_ptr("sws_linear_cpu_run", "y", y, l.M * l.out_f);
        run_gil_aware(S * a.n * l.M, [&] { sws::sws_linear_cpu(a, l); });
      },
      py::arg("args"), py::arg("linear"), py::arg("x"), py::arg("y"), py::arg("bias"), py::arg("bias_per_sample"),
      py::arg("seed"), py::arg("seed_ptr"), py::arg("S"),
      "sws_linear_cpu with this call's addresses, seed and S written into copies of the bundles.");

  // csrc/cpu/layer.cpp: the one-row backward of the linear layers and the mean-field sampling, one call each.
  m.def(
      "sws_linear_backward_rows_cpu",
      [](const ReconstructArgs& a0, int64_t out_f, int64_t in_f, uintptr_t gy, uintptr_t x, bool x_per_sample,
         uint64_t seed, uintptr_t seed_ptr, int64_t S, uintptr_t g_means, uintptr_t g_chol, uintptr_t g_mu,
         uintptr_t g_rho, uintptr_t g_bias) {
        const char* fn = "sws_linear_backward_rows_cpu";
        const ReconstructArgs a = for_call(a0, seed, seed_ptr, S);
        check_ptr(fn, "g_means", g_means, a.K);
        check_ptr(fn, "g_chol", g_chol, a.K);
        check_ptr(fn, "g_mu", g_mu, a.O);
        check_ptr(fn, "g_rho", g_rho, a.O);
        const sws::RowBackward r = row_backward(out_f, in_f, gy, x, x_per_sample);
        run_gil_aware(S * a.n, [&] {
          sws::sws_linear_backward_rows_cpu(a, r, ptr<float>(g_means), ptr<float>(g_chol), ptr<float>(g_mu),
                                            ptr<float>(g_rho), ptr<float>(g_bias));
        });
      },
      py::arg("args"), py::arg("out_f"), py::arg("in_f"), py::arg("gy"), py::arg("x"), py::arg("x_per_sample"),
      py::arg("seed"), py::arg("seed_ptr"), py::arg("S"), py::arg("g_means"), py::arg("g_chol"), py::arg("g_mu"),
      py::arg("g_rho"), py::arg("g_bias"),
      "One-row SWS linear backward: gradients (overwritten) of means, chol, o_mu, o_rho from dW[s] = gy[s] x[s]^T, "
      "and of the bias (g_bias != 0, S == 1).");
  m.def(
      "mean_field_linear_backward_rows_cpu",
      [](const MeanFieldArgs& w0, const MeanFieldArgs* b0, int64_t out_f, int64_t in_f, uintptr_t gy, uintptr_t x,
         bool x_per_sample, uint64_t seed, uintptr_t seed_ptr, int64_t S, uintptr_t g_mu, uintptr_t g_rho,
         uintptr_t g_bmu, uintptr_t g_brho) {
        const char* fn = "mean_field_linear_backward_rows_cpu";
        const MeanFieldArgs w = for_call(w0, seed, seed_ptr, S);
        const MeanFieldArgs b = b0 != nullptr ? for_call(*b0, seed, seed_ptr, S) : MeanFieldArgs{};
        check_ptr(fn, "g_mu", g_mu, w.n);
        check_ptr(fn, "g_rho", g_rho, w.n);
        check_ptr(fn, "g_bmu", g_bmu, b.n);
        check_ptr(fn, "g_brho", g_brho, b.n);
        const sws::RowBackward r = row_backward(out_f, in_f, gy, x, x_per_sample);
        run_gil_aware(S * w.n, [&] {
          sws::mean_field_linear_backward_rows_cpu(w, b0 != nullptr ? &b : nullptr, r, ptr<float>(g_mu),
                                                   ptr<float>(g_rho), ptr<float>(g_bmu), ptr<float>(g_brho));
        });
      },
      py::arg("weight"), py::arg("bias").none(true), py::arg("out_f"), py::arg("in_f"), py::arg("gy"), py::arg("x"),
      py::arg("x_per_sample"), py::arg("seed"), py::arg("seed_ptr"), py::arg("S"), py::arg("g_mu"), py::arg("g_rho"),
      py::arg("g_bmu"), py::arg("g_brho"),
      "One-row mean-field linear backward: gradients (overwritten) of mu, rho from dW[s] = gy[s] x[s]^T and, with "
      "the bias bundle, of bias mu, rho from gy[s].");
  m.def(
      "mean_field_sample_cpu",
      [](const MeanFieldArgs& w0, const MeanFieldArgs* b0, uint64_t seed, uintptr_t seed_ptr, int64_t S,
         uintptr_t w_out, uintptr_t b_out) {
        const MeanFieldArgs w = for_call(w0, seed, seed_ptr, S);
        const MeanFieldArgs b = b0 != nullptr ? for_call(*b0, seed, seed_ptr, S) : MeanFieldArgs{};
        check_ptr("mean_field_sample_cpu", "w_out", w_out, w.n);
        check_ptr("mean_field_sample_cpu", "b_out", b_out, b.n);
        run_gil_aware(S * w.n, [&] {
          sws::mean_field_reconstruct_cpu(w, ptr<float>(w_out));
          if (b0 != nullptr) sws::mean_field_reconstruct_cpu(b, ptr<float>(b_out));
        });
      },
      py::arg("weight"), py::arg("bias").none(true), py::arg("seed"), py::arg("seed_ptr"), py::arg("S"),
      py::arg("w_out"), py::arg("b_out"),
      "Mean-field weights [S, n] and, with the bias bundle, bias [S, out] of one seed, in one call.");

  // ---- issue 14: label-histogram SWS linear forward (csrc/cpu/histogram.cpp) ----
  m.def(
      "sws_linear_histogram_cpu",
      [](const ReconstructArgs& a, const LinearArgs& l) {
        check_ptr("sws_linear_histogram_cpu", "x", reinterpret_cast<uintptr_t>(l.x), l.M * l.in_f);
        check_ptr("sws_linear_histogram_cpu", "y", reinterpret_cast<uintptr_t>(l.y), l.M * l.out_f);
        sws::sws_linear_histogram_cpu(a, l);
      },
      py::arg("args"), py::arg("linear"), py::call_guard<py::gil_scoped_release>(),
      "Label-histogram SWS linear forward (paper/mean, float32 x shared by all samples, inference): float32 "
      "y[S, M, out_f] = sum_k z[s, k] h[m, j, k] + outliers (+ bias); one pass over the labels for all S samples.");
  // ---- end issue 14 ----

  m.def(
      "mean_field_reconstruct_cpu",
      [](const MeanFieldArgs& a, uintptr_t out) {
        const char* fn = "mean_field_reconstruct_cpu";
        check_ptr(fn, "out_ptr", out, a.n);
        check_ptr(fn, "mu", reinterpret_cast<uintptr_t>(a.mu), a.n);
        check_ptr(fn, "rho", reinterpret_cast<uintptr_t>(a.rho), a.n);
        sws::mean_field_reconstruct_cpu(a, ptr<float>(out));
      },
      py::arg("args"), py::arg("out_ptr"), py::call_guard<py::gil_scoped_release>(),
      "float32 out[S, n] = mu + softplus(rho) * eps[s], eps = normals of stream (seed, s, owner, purpose).");

  m.def(
      "mean_field_reconstruct_backward_cpu",
      [](const MeanFieldArgs& a, uintptr_t grad_w, uintptr_t grad_mu, uintptr_t grad_rho) {
        const char* fn = "mean_field_reconstruct_backward_cpu";
        check_ptr(fn, "grad_w_ptr", grad_w, a.n);
        check_ptr(fn, "rho", reinterpret_cast<uintptr_t>(a.rho), a.n);
        check_ptr(fn, "grad_mu_ptr", grad_mu, a.n);
        check_ptr(fn, "grad_rho_ptr", grad_rho, a.n);
        sws::mean_field_reconstruct_backward_cpu(a, ptr<const float>(grad_w), ptr<float>(grad_mu), ptr<float>(grad_rho));
      },
      py::arg("args"), py::arg("grad_w_ptr"), py::arg("grad_mu_ptr"), py::arg("grad_rho_ptr"),
      py::call_guard<py::gil_scoped_release>(),
      "Overwrites grad_mu[n] = sum_s grad_w[s], grad_rho[n] = sum_s grad_w[s] eps[s] * softplus'(rho); deterministic.");

  m.def(
      "kl_gaussian_cpu",
      [](uintptr_t mu, uintptr_t rho, int64_t n, float mu0, float sigma0) {
        check_ptr("kl_gaussian_cpu", "mu_ptr", mu, n);
        check_ptr("kl_gaussian_cpu", "rho_ptr", rho, n);
        return sws::kl_gaussian_sum_cpu(ptr<const float>(mu), ptr<const float>(rho), n, mu0, sigma0);
      },
      py::arg("mu_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("mu0"), py::arg("sigma0"),
      py::call_guard<py::gil_scoped_release>(),
      "sum_i KL(N(mu_i, softplus(rho_i)^2) || N(mu0, sigma0^2)) of float32 mu[n], rho[n], as a double.");
  m.def(
      "kl_gaussian_backward_cpu",
      [](uintptr_t mu, uintptr_t rho, int64_t n, float mu0, float sigma0, float scale, uintptr_t grad_mu,
         uintptr_t grad_rho) {
        const char* fn = "kl_gaussian_backward_cpu";
        check_ptr(fn, "mu_ptr", mu, n);
        check_ptr(fn, "rho_ptr", rho, n);
        check_ptr(fn, "grad_mu_ptr", grad_mu, n);
        check_ptr(fn, "grad_rho_ptr", grad_rho, n);
        sws::kl_gaussian_backward_cpu(ptr<const float>(mu), ptr<const float>(rho), n, mu0, sigma0, scale,
                                      ptr<float>(grad_mu), ptr<float>(grad_rho));
      },
      py::arg("mu_ptr"), py::arg("rho_ptr"), py::arg("n"), py::arg("mu0"), py::arg("sigma0"), py::arg("scale"),
      py::arg("grad_mu_ptr"), py::arg("grad_rho_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Overwrites grad_mu[n], grad_rho[n] with scale times the gradient of kl_gaussian_cpu's sum.");

  m.def(
      "kl_components_cpu",
      [](uintptr_t means, uintptr_t chol, uintptr_t means0, uintptr_t chol0, int64_t K, uintptr_t g_means,
         uintptr_t g_chol) {
        const char* fn = "kl_components_cpu";
        if (K < 0) throw std::invalid_argument(std::string(fn) + ": K must be >= 0, got " + std::to_string(K));
        check_ptr(fn, "means_ptr", means, K);
        check_ptr(fn, "chol_ptr", chol, K);
        check_ptr(fn, "means0_ptr", means0, K);
        check_ptr(fn, "chol0_ptr", chol0, K);
        return sws::kl_components_cpu(ptr<const float>(means), ptr<const float>(chol), ptr<const float>(means0),
                                      ptr<const float>(chol0), K, ptr<float>(g_means), ptr<float>(g_chol));
      },
      py::arg("means_ptr"), py::arg("chol_ptr"), py::arg("means0_ptr"), py::arg("chol0_ptr"), py::arg("K"),
      py::arg("g_means_ptr"), py::arg("g_chol_ptr"),
      "Codebook KL of float32 means[K,2], chol[K,3] against means0, chol0 (a double); its gradient written into "
      "g_means[K,2], g_chol[K,3] where those are not 0.");

  m.def("simd_isa", []() { return std::string(sws::simd_isa()); },
        "The widest vector code the CPU normals and the histogram path use now: 'avx512', 'avx2' or 'scalar'.");
  m.def("simd_level", []() { return std::string(sws::simd_level()); },
        "The vector version the CPU normal/softplus code uses now: 'avx2' or 'scalar'.");
  m.def("set_simd", &sws::set_simd, py::arg("enabled"),
        "Enable (default) or disable the AVX2 normal/softplus code (process-wide; for tests and benchmarks).");

#if defined(SWS_WITH_CUDA)
  m.def(
      "reconstruct_cuda",
      [](const ReconstructArgs& a, uintptr_t out, uintptr_t zbuf, uintptr_t stream) {
        check_ptr("reconstruct_cuda", "out_ptr", out, a.n);
        check_ptr("reconstruct_cuda", "zbuf_ptr", zbuf, a.K);
        sws::reconstruct_cuda(a, ptr<float>(out), ptr<float>(zbuf), stream);
      },
      py::arg("args"), py::arg("out_ptr"), py::arg("zbuf_ptr"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Device pointers. zbuf: float32 workspace of S*K*2 elements. Asynchronous on `stream` (cudaStream_t as int).");

  m.def(
      "reconstruct_backward_cuda",
      [](const ReconstructArgs& a, uintptr_t grad_out, uintptr_t grad_means, uintptr_t grad_chol, uintptr_t grad_mu_o,
         uintptr_t grad_rho_o, uintptr_t seg_offsets, uintptr_t seg_pos, uintptr_t seg_coef, int64_t n_entries,
         uintptr_t dzbuf, uintptr_t stream) {
        const char* fn = "reconstruct_backward_cuda";
        check_ptr(fn, "grad_out_ptr", grad_out, a.n);
        check_ptr(fn, "grad_means_ptr", grad_means, a.K);
        check_ptr(fn, "grad_chol_ptr", grad_chol, a.K);
        check_ptr(fn, "grad_mu_o_ptr", grad_mu_o, a.O);
        check_ptr(fn, "grad_rho_o_ptr", grad_rho_o, a.O);
        check_ptr(fn, "seg_offsets_ptr", seg_offsets, a.K + 1);
        check_ptr(fn, "seg_pos_ptr", seg_pos, n_entries);
        check_ptr(fn, "seg_coef_ptr", seg_coef, n_entries);
        check_ptr(fn, "dzbuf_ptr", dzbuf, a.K);
        sws::reconstruct_backward_cuda(a, ptr<const float>(grad_out), ptr<const int64_t>(seg_offsets),
                                       ptr<const int64_t>(seg_pos), ptr<const float>(seg_coef), n_entries,
                                       ptr<double>(dzbuf), ptr<float>(grad_means), ptr<float>(grad_chol),
                                       ptr<float>(grad_mu_o), ptr<float>(grad_rho_o), stream);
      },
      py::arg("args"), py::arg("grad_out_ptr"), py::arg("grad_means_ptr"), py::arg("grad_chol_ptr"),
      py::arg("grad_mu_o_ptr"), py::arg("grad_rho_o_ptr"), py::arg("seg_offsets_ptr"), py::arg("seg_pos_ptr"),
      py::arg("seg_coef_ptr"), py::arg("n_entries"), py::arg("dzbuf_ptr"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Device pointers. seg_*: label-sorted CSR of inlier/ellipse entries (offsets int64[K+1], pos int64[N], "
      "coef float32[N]; sws_kernels/_segments.py); dzbuf: float64 workspace of S*K*2 elements. Deterministic.");

  m.def(
      "sws_linear_cuda",
      [](const ReconstructArgs& a, const LinearArgs& l, uintptr_t zbuf, uintptr_t stream) {
        const char* fn = "sws_linear_cuda";
        check_ptr(fn, "x", reinterpret_cast<uintptr_t>(l.x), l.M);
        check_ptr(fn, "y", reinterpret_cast<uintptr_t>(l.y), l.M);
        check_ptr(fn, "zbuf_ptr", zbuf, a.K);
        sws::sws_linear_cuda(a, l, ptr<float>(zbuf), stream);
      },
      py::arg("args"), py::arg("linear"), py::arg("zbuf_ptr"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Fused small-M (M <= 16) SWS linear forward, device pointers: y[S, M, out_f] = x W[s]^T (+ bias float32). "
      "x_dtype 0 float32, 1 float16, 2 bfloat16 (y the same); zbuf float32 workspace of S*K*2.");

  m.def(
      "mean_field_reconstruct_cuda",
      [](const MeanFieldArgs& a, uintptr_t out, uintptr_t stream) {
        const char* fn = "mean_field_reconstruct_cuda";
        check_ptr(fn, "out_ptr", out, a.n);
        check_ptr(fn, "mu", reinterpret_cast<uintptr_t>(a.mu), a.n);
        check_ptr(fn, "rho", reinterpret_cast<uintptr_t>(a.rho), a.n);
        sws::mean_field_reconstruct_cuda(a, ptr<float>(out), stream);
      },
      py::arg("args"), py::arg("out_ptr"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Device pointers; as mean_field_reconstruct_cpu, asynchronous on `stream`.");

  m.def(
      "mean_field_reconstruct_backward_cuda",
      [](const MeanFieldArgs& a, uintptr_t grad_w, uintptr_t grad_mu, uintptr_t grad_rho, uintptr_t stream) {
        const char* fn = "mean_field_reconstruct_backward_cuda";
        check_ptr(fn, "grad_w_ptr", grad_w, a.n);
        check_ptr(fn, "rho", reinterpret_cast<uintptr_t>(a.rho), a.n);
        check_ptr(fn, "grad_mu_ptr", grad_mu, a.n);
        check_ptr(fn, "grad_rho_ptr", grad_rho, a.n);
        sws::mean_field_reconstruct_backward_cuda(a, ptr<const float>(grad_w), ptr<float>(grad_mu),
                                                  ptr<float>(grad_rho), stream);
      },
      py::arg("args"), py::arg("grad_w_ptr"), py::arg("grad_mu_ptr"), py::arg("grad_rho_ptr"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(), "Device pointers; as mean_field_reconstruct_backward_cpu.");
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
