// Shared by the CPU and CUDA kernels: the argument bundles (ReconstructArgs, MeanFieldArgs, LinearArgs: each is
// bound to Python as one class by python/module.cpp, built in one place by sws_kernels/native.py), the label
// dtypes, the math of SPEC.md sections 2-3 written once for host and device, and the entry points.
// No Python and no libtorch here: raw pointers and sizes only, so the extension never depends on a torch ABI.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "philox.h"

namespace sws {

enum LabelDtype : int { kU8 = 0, kI8 = 1, kI16 = 2, kI32 = 3, kI64 = 4 };
enum Mode : int { kPaper = 0, kHierarchical = 1, kMean = 2 };

// Everything reconstruct and its backward read. Arrays are contiguous; pointers of empty arrays
// (E == 0, O == 0) are never dereferenced.
struct ReconstructArgs {
  const float* means = nullptr;  // [K, 2] (m_mu, m_rho)
  const float* chol = nullptr;   // [K, 3] (a, b, c)
  int64_t K = 0;
  const void* labels = nullptr;  // [n], dtype per labels_dtype
  int labels_dtype = 0;
  int64_t n = 0;
  const int64_t* e_pos = nullptr;  // [E] flat positions
  const int64_t* e_a = nullptr;    // [E] components
  const int64_t* e_b = nullptr;    // [E]
  const float* e_alpha = nullptr;  // [E]
  int64_t E = 0;
  const int64_t* o_pos = nullptr;  // [O] flat positions
  const float* o_mu = nullptr;     // [O]
  const float* o_rho = nullptr;    // [O]
  int64_t O = 0;
  uint64_t seed = 0;
  const int64_t* seed_dev = nullptr;  // CUDA: the seed in device memory, read by the kernels (philox.h SeedRef)
  int64_t S = 1;
  int mode = kPaper;
  int64_t owner = 0;
  int64_t codebook_owner = 0;
  // Global element mapping of a shard (tensor parallelism; sws_kernels/reference.py element_map): local weight
  // i = r * row_len + c draws the noise of element elem_offset + r * row_stride + c. All 0: the identity.
  int64_t elem_offset = 0;
  int64_t row_stride = 0;
  int64_t row_len = 0;
};

// The element mapping above as a value (host and device): g(i) = offset + (i / row_len) * row_stride + i % row_len,
// or offset + i when the rows are contiguous (row_stride == row_len, or row_len 0).
struct ElemMap {
  int64_t offset = 0, row_stride = 0, row_len = 0;
  SWS_HD bool contiguous() const { return row_len <= 0 || row_stride == row_len; }
  SWS_HD bool identity() const { return offset == 0 && contiguous(); }
  SWS_HD uint64_t operator()(int64_t i) const {
    if (contiguous()) return static_cast<uint64_t>(offset + i);
    return static_cast<uint64_t>(offset + (i / row_len) * row_stride + i % row_len);
  }
};

// Checks of a mapping over n local elements; throws std::invalid_argument naming `fn`.
inline void validate_elem_map(int64_t offset, int64_t row_stride, int64_t row_len, int64_t n, const char* fn) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (offset < 0) fail("elem_offset must be >= 0, got " + std::to_string(offset));
  if (row_len < 0 || (row_len > 0 && n % row_len != 0))
    fail("row_len must divide n = " + std::to_string(n) + ", got " + std::to_string(row_len));
  if (row_len > 0 && row_stride < row_len)
    fail("row_stride must be >= row_len = " + std::to_string(row_len) + ", got " + std::to_string(row_stride));
  if (n > 0) {
    const int64_t rows = row_len > 0 ? n / row_len : 1;
    const int64_t len = row_len > 0 ? row_len : n;
    const int64_t stride = row_len > 0 ? row_stride : 0;
    const double last = static_cast<double>(offset) + static_cast<double>(rows - 1) * static_cast<double>(stride) +
                        static_cast<double>(len);
    if (last > static_cast<double>(kMaxElement))
      fail("the shard's global element indices exceed the per-stream limit of 2^34 elements");
  }
}

inline ElemMap elem_map_of(const ReconstructArgs& a) {
  return ElemMap{a.elem_offset, a.row_len > 0 ? a.row_stride : 0, a.row_len};
}

// The kernels' view of the seed: the device copy when there is one (read in the kernel), else the host value.
inline SeedRef seed_ref_of(const ReconstructArgs& a) { return SeedRef{a.seed_dev, seed_key(a.seed)}; }

// Cheap size/range checks shared by every backend; throws std::invalid_argument naming `fn`.
inline void validate_sizes(const ReconstructArgs& a, const char* fn) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (a.K < 1) fail("K (number of components) must be >= 1, got " + std::to_string(a.K));
  if (a.n < 0) fail("n must be >= 0, got " + std::to_string(a.n));
  if (static_cast<uint64_t>(a.n) > kMaxElement)
    fail("n = " + std::to_string(a.n) + " exceeds the per-stream limit of 2^34 elements");
  if (a.S < 1 || a.S > 0xffffffffll) fail("S (samples) must be in [1, 2^32), got " + std::to_string(a.S));
  if (a.E < 0) fail("E must be >= 0, got " + std::to_string(a.E));
  if (a.O < 0) fail("O must be >= 0, got " + std::to_string(a.O));
  if (a.E > a.n || a.O > a.n) fail("more ellipse/outlier entries than weights");
  if (a.mode < kPaper || a.mode > kMean) fail("mode must be 0 (paper), 1 (hierarchical) or 2 (mean), got " + std::to_string(a.mode));
  if (a.labels_dtype < kU8 || a.labels_dtype > kI64)
    fail("labels_dtype must be 0=uint8 1=int8 2=int16 3=int32 4=int64, got " + std::to_string(a.labels_dtype));
  if (a.owner < 0 || a.owner > 0xffffffffll) fail("owner must be in [0, 2^32), got " + std::to_string(a.owner));
  if (a.codebook_owner < 0 || a.codebook_owner > 0xffffffffll)
    fail("codebook_owner must be in [0, 2^32), got " + std::to_string(a.codebook_owner));
  if (a.n > 0 && a.labels == nullptr) fail("labels pointer is null");
  if (a.means == nullptr || a.chol == nullptr) fail("means/chol pointer is null");
  if (a.E > 0 && (a.e_pos == nullptr || a.e_a == nullptr || a.e_b == nullptr || a.e_alpha == nullptr))
    fail("e_pos/e_a/e_b/e_alpha pointer is null with E = " + std::to_string(a.E));
  if (a.O > 0 && (a.o_pos == nullptr || a.o_mu == nullptr || a.o_rho == nullptr))
    fail("o_pos/o_mu/o_rho pointer is null with O = " + std::to_string(a.O));
  validate_elem_map(a.elem_offset, a.row_stride, a.row_len, a.n, fn);
}

// Calls f with `labels` cast to its element type (host side; every backend's one switch over LabelDtype).
template <class F>
void dispatch_labels(const char* fn, int code, const void* p, F&& f) {
  switch (code) {
    case kU8: f(static_cast<const uint8_t*>(p)); break;
    case kI8: f(static_cast<const int8_t*>(p)); break;
    case kI16: f(static_cast<const int16_t*>(p)); break;
    case kI32: f(static_cast<const int32_t*>(p)); break;
    case kI64: f(static_cast<const int64_t*>(p)); break;
    default: throw std::invalid_argument(std::string(fn) + ": unknown labels_dtype " + std::to_string(code));
  }
}

// All labels of [i0, i1) in [0, K)? min/max in the label's own type vectorises.
template <class L>
inline bool labels_in_range(const L* lab, int64_t i0, int64_t i1, int64_t K) {
  if (i0 >= i1) return true;
  L mn = lab[i0], mx = lab[i0];
  for (int64_t i = i0; i < i1; ++i) {  // value ternaries, not std::min/max references: GCC vectorises these
    const L v = lab[i];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  return static_cast<int64_t>(mn) >= 0 && static_cast<int64_t>(mx) < K;
}

// Validates ellipse/outlier entries (positions in range and unique, components in range) and returns a
// bitmask of their positions (empty when E == O == 0). Host pointers; serial: O(E + O) plus n/8 bytes.
inline std::vector<uint64_t> exclusion_mask(const ReconstructArgs& a, const char* fn) {
  std::vector<uint64_t> mask;
  if (a.E == 0 && a.O == 0) return mask;
  mask.assign(static_cast<size_t>((a.n + 63) / 64), 0);
  auto mark = [&](int64_t p, const char* what, int64_t idx) {
    if (p < 0 || p >= a.n)
      throw std::invalid_argument(std::string(fn) + ": " + what + "[" + std::to_string(idx) + "] = " + std::to_string(p) +
                                  " is out of range [0, " + std::to_string(a.n) + ")");
    uint64_t& w = mask[static_cast<size_t>(p >> 6)];
    const uint64_t bit = 1ull << (p & 63);
    if (w & bit)
      throw std::invalid_argument(std::string(fn) + ": position " + std::to_string(p) +
                                  " appears twice among the ellipse/outlier positions");
    w |= bit;
  };
  for (int64_t e = 0; e < a.E; ++e) {
    mark(a.e_pos[e], "e_pos", e);
    if (a.e_a[e] < 0 || a.e_a[e] >= a.K || a.e_b[e] < 0 || a.e_b[e] >= a.K)
      throw std::invalid_argument(std::string(fn) + ": ellipse " + std::to_string(e) + " has components (" +
                                  std::to_string(a.e_a[e]) + ", " + std::to_string(a.e_b[e]) + ") outside [0, " +
                                  std::to_string(a.K) + ")");
  }
  for (int64_t o = 0; o < a.O; ++o) mark(a.o_pos[o], "o_pos", o);
  return mask;
}

// Everything mean-field reconstruct and its backward read: w[s] = mu + softplus(rho) eps[s], eps the normals of
// stream (seed, s, owner, purpose). The backward reads rho only (mu may be null there).
struct MeanFieldArgs {
  const float* mu = nullptr;   // [n]
  const float* rho = nullptr;  // [n]
  int64_t n = 0;
  uint64_t seed = 0;
  const int64_t* seed_dev = nullptr;  // CUDA: the seed in device memory (philox.h SeedRef)
  int64_t S = 1;
  int64_t owner = 0;
  int64_t purpose = 0;
  // Global element mapping of a shard, as in ReconstructArgs (all 0: the identity).
  int64_t elem_offset = 0;
  int64_t row_stride = 0;
  int64_t row_len = 0;
};

inline SeedRef seed_ref_of(const MeanFieldArgs& a) { return SeedRef{a.seed_dev, seed_key(a.seed)}; }

inline ElemMap elem_map_of(const MeanFieldArgs& a) {
  return ElemMap{a.elem_offset, a.row_len > 0 ? a.row_stride : 0, a.row_len};
}

// Checks of the mean-field entry points (CPU and CUDA); throws std::invalid_argument naming `fn`.
inline void validate_mean_field(const MeanFieldArgs& a, const char* fn) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (a.n < 0) fail("n must be >= 0, got " + std::to_string(a.n));
  if (static_cast<uint64_t>(a.n) > kMaxElement)
    fail("n = " + std::to_string(a.n) + " exceeds the per-stream limit of 2^34 elements");
  if (a.S < 1 || a.S > 0xffffffffll) fail("S (samples) must be in [1, 2^32), got " + std::to_string(a.S));
  if (a.owner < 0 || a.owner > 0xffffffffll) fail("owner must be in [0, 2^32), got " + std::to_string(a.owner));
  if (a.purpose < 0 || a.purpose > 0xffffffffll)
    fail("purpose must be in [0, 2^32), got " + std::to_string(a.purpose));
  validate_elem_map(a.elem_offset, a.row_stride, a.row_len, a.n, fn);
}

// The op-specific extras of the fused small-M SWS linear forward (CPU: csrc/cpu/linear.cpp, float32 x only;
// CUDA: csrc/cuda/linear.cu). y[s] = x[s or shared] W[s]^T (+ bias), W never materialised.
enum ActDtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
struct LinearArgs {
  int64_t out_f = 0, in_f = 0;  // labels is [out_f, in_f] (n = out_f * in_f)
  const void* x = nullptr;      // [M, in_f] shared, or [S, M, in_f] per sample; contiguous
  int x_dtype = kF32;
  int64_t M = 0;                // rows per sample, 1 <= M <= kLinearMaxM (CUDA) / kLinearCpuMaxM (CPU)
  bool per_sample = false;
  const float* bias = nullptr;  // float32 [out_f] or [S, out_f] or null
  bool bias_per_sample = false;
  void* y = nullptr;            // [S, M, out_f], x's dtype
  // CUDA only. Ellipse/outlier positions: a bitmask over the n weights (bit p set: not an inlier) and a
  // row-sorted list (positions ascending; ov_idx < E: ellipse entry, else outlier entry ov_idx - E) with row
  // offsets. The CPU kernel corrects those positions itself (serial pass in entry order).
  const uint32_t* ov_mask = nullptr;  // [(n + 31) / 32] or null when E + O == 0
  const int64_t* ov_rows = nullptr;   // [out_f + 1]
  const int64_t* ov_pos = nullptr;    // [E + O]
  const int64_t* ov_idx = nullptr;    // [E + O]
};

// softplus exactly as torch.nn.functional.softplus (beta 1, threshold 20): x if x > 20 else log1p(exp(x)).
SWS_HD float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
SWS_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
// softplus' as PyTorch computes it (reference.softplus_grad): sigmoid, exactly 1 above the threshold 20.
SWS_HD float softplus_grad(float x) { return x > 20.0f ? 1.0f : sigmoid(x); }

// Component noise xi[s, k] = elements 2k, 2k+1 of stream (seed, s, codebook_owner, purpose 1): both come
// from counter j = k / 2, words (0, 1) for even k and (2, 3) for odd k.
SWS_HD void component_noise(Key key, uint64_t k, uint32_t s, uint32_t codebook_owner, float& xi0, float& xi1) {
  const Words4 w = stream_words(key, static_cast<uint32_t>(k >> 1), s, codebook_owner, kPurposeComponent);
  if (k & 1) {
    box_muller(w.w[2], w.w[3], xi0, xi1);
  } else {
    box_muller(w.w[0], w.w[1], xi0, xi1);
  }
}

// z = m + L xi, L = [[softplus(a), 0], [b, softplus(c)]], in the reference's float32 operation order.
SWS_HD void sample_component(const float* means, const float* chol, uint64_t k, float xi0, float xi1, float& z_mu,
                             float& z_rho) {
  const float a = chol[3 * k], b = chol[3 * k + 1], c = chol[3 * k + 2];
  z_mu = means[2 * k] + softplus(a) * xi0;
  z_rho = (means[2 * k + 1] + b * xi0) + softplus(c) * xi1;
}

// ---- entry points (csrc/cpu/*.cpp) ----
void philox4x32_cpu(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n);
// Elements offset .. offset+n-1 of stream (seed, sample, owner, purpose).
void uniform_cpu(float* out, int64_t n, uint64_t offset, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose);
void normal_cpu(float* out, int64_t n, uint64_t offset, uint64_t seed, int64_t sample, int64_t owner, int64_t purpose);
void reconstruct_cpu(const ReconstructArgs& a, float* out);
void reconstruct_backward_cpu(const ReconstructArgs& a, const float* grad_out, float* grad_means, float* grad_chol,
                              float* grad_mu_o, float* grad_rho_o);
int omp_max_threads();
void omp_set_threads(int n);
// Mean-field (csrc/cpu/mean_field.cpp): out[S, n] = mu + softplus(rho) eps[s]; eps of stream (seed, s, owner,
// purpose). Backward overwrites grad_mu[n], grad_rho[n] from grad_w[S, n]. Deterministic.
void mean_field_reconstruct_cpu(const MeanFieldArgs& a, float* out);
void mean_field_reconstruct_backward_cpu(const MeanFieldArgs& a, const float* grad_w, float* grad_mu, float* grad_rho);
// csrc/cpu/linear.cpp: fused small-M SWS linear forward (paper/mean modes), y[S, M, out_f] = x W[s]^T (+ bias)
// without materialising W. x float32 [M, in_f] shared or [S, M, in_f] per sample; bias float32 [out_f] or
// [S, out_f] (bias_per_sample) or null; l.ov_* unused. Deterministic (independent of the thread count).
constexpr int64_t kLinearCpuMaxM = 32;
void sws_linear_cpu(const ReconstructArgs& a, const LinearArgs& l);
// csrc/cpu/kl.cpp: sum_i KL(N(mu_i, softplus(rho_i)^2) || N(mu0, sigma0^2)) (float32 terms, double sum in a fixed
// order), and its gradient times scale (overwrites grad_mu[n], grad_rho[n]).
double kl_gaussian_sum_cpu(const float* mu, const float* rho, int64_t n, float mu0, float sigma0);
void kl_gaussian_backward_cpu(const float* mu, const float* rho, int64_t n, float mu0, float sigma0, float scale,
                              float* grad_mu, float* grad_rho);
// csrc/cpu/kl.cpp: the codebook KL sum_k KL(N(m_k, L_k L_k^T) || N(m0_k, L0_k L0_k^T)) (double sum of float32
// terms in component order) and, where g_means / g_chol are not null, its gradient (overwritten).
double kl_components_cpu(const float* means, const float* chol, const float* means0, const float* chol0, int64_t K,
                         float* g_means, float* g_chol);

// ---- entry points (csrc/cuda/reconstruct.cu; only when built with SWS_WITH_CUDA) ----
#if defined(SWS_WITH_CUDA)
// zbuf: device float32 workspace of S*K*2 floats.
void reconstruct_cuda(const ReconstructArgs& a, float* out, float* zbuf, uintptr_t stream);
// seg_*: label-sorted CSR of the entries (see reconstruct.cu); dzbuf: device float64 workspace of S*K*2.
void reconstruct_backward_cuda(const ReconstructArgs& a, const float* grad_out, const int64_t* seg_offsets,
                               const int64_t* seg_pos, const float* seg_coef, int64_t n_entries, double* dzbuf,
                               float* grad_means, float* grad_chol, float* grad_mu_o, float* grad_rho_o,
                               uintptr_t stream);
// csrc/cuda/device.cu: the raw facts behind native.py's CUDA status (native.explain_cuda words them).
struct CudaDeviceInfo {
  int index = 0, major = 0, minor = 0, sm_count = 0;
  std::string name;
};
struct CudaProbe {
  int driver_version = 0;  // cudaDriverGetVersion: the CUDA version the driver supports (12040 = 12.4); 0 = none
  int count_error = 0;     // cudaGetDeviceCount's cudaError_t (35 = insufficient/no driver, 100 = no device)
  std::string count_error_name, count_error_string;
  int device_count = 0;
  std::vector<CudaDeviceInfo> devices;
};
// Device queries only: initialises the driver, creates no context. Called lazily, never at import.
CudaProbe cuda_probe();
// CUDART_VERSION of the toolkit the module was compiled with (13000 = 13.0); touches no runtime.
int cuda_runtime_build_version();
// zbuf[S, K, 2] = (z_mu, softplus(z_rho)) (mean mode: (m_mu, 0)): the table the fused kernels read.
void sample_components_cuda(const ReconstructArgs& a, float* zbuf, uintptr_t stream);
// csrc/cuda/mean_field.cu: same contract as the CPU versions, device pointers, asynchronous on `stream`;
// a.seed_dev: the seed in device memory (null: use a.seed), see philox.h SeedRef.
void mean_field_reconstruct_cuda(const MeanFieldArgs& a, float* out, uintptr_t stream);
void mean_field_reconstruct_backward_cuda(const MeanFieldArgs& a, const float* grad_w, float* grad_mu, float* grad_rho,
                                          uintptr_t stream);
// csrc/cuda/linear.cu: fused small-M SWS linear forward, y[s] = x[s or shared] W[s]^T (+ bias), W generated
// from labels and the sampled codebook (zbuf, filled here) inside the kernel. x/y dtype: kF32 / kF16 / kBF16.
constexpr int64_t kLinearMaxM = 16;
void sws_linear_cuda(const ReconstructArgs& a, const LinearArgs& l, float* zbuf, uintptr_t stream);
#endif

}  // namespace sws
