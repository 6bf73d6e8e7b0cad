// Fused small-M SWS linear forward on CUDA: y[s, m, o] = sum_i x[m, i] W[s][o, i] (+ bias), W never stored.
//
// Why fused: for M <= 16 rows the GEMM is memory bound on the weight; reading 1-2 byte labels instead of a
// materialised float32 W[S, out, in] cuts the bytes 2-4x per sample and skips the write+read of W. Larger M
// is compute bound: native.py routes it to reconstruct -> cuBLAS (torch.matmul) instead.
//
// Stages:
//  1. sample_components_cuda (reconstruct.cu): zbuf[S, K, 2] = (z_mu, softplus(z_rho)) (mean mode: m_mu).
//  2. k_linear_small_m: grid (ceil(out / kRowsPerBlock), S). A block copies its sample's table into shared
//     memory (dense z_mu, or the (z_mu, sp) pairs in hierarchical mode; global zbuf when it does not fit in
//     48 KB), then each warp owns kRowsPerWarp output rows in turn. Per row: lanes stride over the inputs
//     (coalesced label and x loads; x is small and shared by every warp: L1/L2 resident), weight =
//     table[label] (+ sp * eps in hierarchical mode, one Philox call per 4 consecutive weights when the row
//     starts on a counter boundary), fp32 accumulators for up to MT rows of x. Ellipse/outlier positions
//     are masked out of that loop (a bitmask) and added from the row-sorted override list by the same
//     lanes, then a fixed xor-butterfly warp reduction: deterministic, no atomics.
//  Activations fp32 / fp16 / bf16 in and out, fp32 accumulation, bias added in fp32 before the final rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common.h"
#include "launch.cuh"

namespace sws {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;  // rows per warp: amortises the table copy over 32 rows per block
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Params {
  int64_t out_f, in_f, K, S, M;
  int mode;
  SeedRef seed;
  uint32_t owner;
  const float* zbuf;
  const float* means;
  const int64_t *e_a, *e_b;
  const float* e_alpha;
  int64_t E;
  const float *o_mu, *o_rho;
  const uint32_t* ov_mask;
  const int64_t *ov_rows, *ov_pos, *ov_idx;
  const float* bias;
  bool bias_per_sample;
  bool per_sample;
};

template <class T, class L, bool kHier, int MT>
__global__ void __launch_bounds__(kThreads) k_linear_small_m(const T* __restrict__ x, const L* __restrict__ lab,
                                                             T* __restrict__ y, Params p, bool smem_table) {
  extern __shared__ float smem[];
  const Key key = p.seed.get();
  const float nan = __int_as_float(0x7fc00000);
  const int64_t s = blockIdx.y;
  const int64_t K = p.K, in_f = p.in_f;
  const float* zg = p.zbuf + 2 * s * K;
  // Table layout: hierarchical (z_mu, sp) pairs, else dense z_mu (stride 1 in smem, 2 in global zbuf).
  const float* zs = zg;
  int64_t zstep = 2;
  if (smem_table) {
    if (kHier) {
      for (int64_t t = threadIdx.x; t < 2 * K; t += kThreads) smem[t] = zg[t];
    } else {
      for (int64_t t = threadIdx.x; t < K; t += kThreads) smem[t] = zg[2 * t];
      zstep = 1;
    }
    __syncthreads();
    zs = smem;
  }
  const T* xs = p.per_sample ? x + s * p.M * in_f : x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t ss = static_cast<uint32_t>(s);

  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + r * kWarps + warp;
    if (o >= p.out_f) break;  // uniform per warp
    const L* lrow = lab + o * in_f;
    const int64_t base = o * in_f;  // flat position of the row's first weight
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

    auto weight = [&](int64_t i, float eps) -> float {
      const uint64_t c = label_at(lrow, i);
      if (c >= static_cast<uint64_t>(K)) return nan;  // labels are validated on the Python side
      float w = zs[zstep * c];
      if (kHier) w = w + zs[2 * c + 1] * eps;
      if (p.ov_mask != nullptr) {
        const int64_t q = base + i;
        if ((p.ov_mask[q >> 5] >> (q & 31)) & 1u) w = 0.0f;  // an override: added below
      }
      return w;
    };
    auto fma_x = [&](int64_t i, float w) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < p.M) acc[m] += to_f(xs[m * in_f + i]) * w;
    };

    if (!kHier) {
      for (int64_t i = lane; i < in_f; i += 32) fma_x(i, weight(i, 0.0f));
    } else {
      // 4 consecutive weights per lane: one Philox call gives their 4 normals when they share a counter.
      for (int64_t i0 = 4 * lane; i0 < in_f; i0 += 128) {
        float eps[4];
        const int64_t q0 = base + i0;
        const int cnt = static_cast<int>(min(static_cast<int64_t>(4), in_f - i0));
        if ((q0 & 3) == 0) {
          words_to_normal4(stream_words(key, static_cast<uint32_t>(q0 >> 2), ss, p.owner, kPurposeWeight), eps);
        } else {
#pragma unroll
          for (int t = 0; t < 4; ++t)
            eps[t] = t < cnt ? normal_at(key, static_cast<uint64_t>(q0 + t), ss, p.owner, kPurposeWeight) : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < 4; ++t)
          if (t < cnt) fma_x(i0 + t, weight(i0 + t, eps[t]));
      }
    }

    // Ellipse / outlier weights of this row (positions ascending), lane-strided.
    if (p.ov_mask != nullptr) {
      for (int64_t e = p.ov_rows[o] + lane; e < p.ov_rows[o + 1]; e += 32) {
        const int64_t q = p.ov_pos[e], idx = p.ov_idx[e];
        float w;
        if (idx < p.E) {
          const int64_t ca = p.e_a[idx], cb = p.e_b[idx];
          if (ca < 0 || ca >= K || cb < 0 || cb >= K) {
            w = nan;
          } else {
            const float al = p.e_alpha[idx], bl = 1.0f - al;
            w = al * zs[zstep * ca] + bl * zs[zstep * cb];
            if (kHier) {
              const float sd = al * zs[2 * ca + 1] + bl * zs[2 * cb + 1];
              w = w + sd * normal_at(key, static_cast<uint64_t>(q), ss, p.owner, kPurposeWeight);
            }
          }
        } else {
          const int64_t oi = idx - p.E;
          w = p.o_mu[oi];
          if (p.mode != kMean)
            w = w + softplus(p.o_rho[oi]) * normal_at(key, static_cast<uint64_t>(q), ss, p.owner, kPurposeWeight);
        }
        fma_x(q - base, w);
      }
    }

    // Fixed xor butterfly: every lane ends with the same, order-fixed sum.
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m] = v;
    }
    const float b = p.bias == nullptr ? 0.0f : p.bias[(p.bias_per_sample ? s * p.out_f : 0) + o];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < p.M && lane == m % 32) y[(s * p.M + m) * p.out_f + o] = from_f<T>(acc[m] + b);
  }
}

template <class F>
void dispatch_act(const char* fn, int code, F&& f) {
  switch (code) {
    case kF32: f(static_cast<float*>(nullptr)); break;
    case kF16: f(static_cast<__half*>(nullptr)); break;
    case kBF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw std::invalid_argument(std::string(fn) + ": x_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                         std::to_string(code));
  }
}

}  // namespace

void sws_linear_cuda(const ReconstructArgs& a, const LinearArgs& l, float* zbuf, uintptr_t stream_ptr) {
  const char* fn = "sws_linear_cuda";
  validate_sizes(a, fn);
  // A tensor-parallel shard's element mapping (common.h) is not read by this kernel: sws_kernels/_ops.py sends
  // shards to reconstruct + GEMM; a direct call with a mapping is refused rather than drawing the wrong noise.
  if (!elem_map_of(a).identity())
    throw std::invalid_argument(std::string(fn) + ": a shard's element mapping (elem_offset/row_stride) is not "
                                "supported by the fused CUDA linear; use reconstruct + GEMM");
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(fn) + ": " + what); };
  if (l.out_f < 1 || l.in_f < 1 || l.out_f * l.in_f != a.n)
    fail("labels must be [out_f, in_f] with out_f * in_f = n, got out_f = " + std::to_string(l.out_f) +
         ", in_f = " + std::to_string(l.in_f) + ", n = " + std::to_string(a.n));
  if (l.M < 1 || l.M > kLinearMaxM)
    fail("M (rows per sample) must be in [1, " + std::to_string(kLinearMaxM) + "], got " + std::to_string(l.M) +
         " (larger M: reconstruct, then a GEMM)");
  if (a.S > 65535) fail("S must be <= 65535 for the fused kernel (grid y), got " + std::to_string(a.S));
  if (l.x == nullptr || l.y == nullptr || zbuf == nullptr) fail("null x, y or zbuf pointer");
  if ((a.E + a.O > 0) && (l.ov_mask == nullptr || l.ov_rows == nullptr || l.ov_pos == nullptr || l.ov_idx == nullptr))
    fail("ellipse/outlier entries need ov_mask, ov_rows, ov_pos and ov_idx");
  (void)sm_count(fn);  // a device is current

  sample_components_cuda(a, zbuf, stream_ptr);
  cudaStream_t stream = as_stream(stream_ptr);

  Params p;
  p.out_f = l.out_f;
  p.in_f = l.in_f;
  p.K = a.K;
  p.S = a.S;
  p.M = l.M;
  p.mode = a.mode;
  p.seed = seed_ref_of(a);
  p.owner = static_cast<uint32_t>(a.owner);
  p.zbuf = zbuf;
  p.means = a.means;
  p.e_a = a.e_a;
  p.e_b = a.e_b;
  p.e_alpha = a.e_alpha;
  p.E = a.E;
  p.o_mu = a.o_mu;
  p.o_rho = a.o_rho;
  p.ov_mask = (a.E + a.O > 0) ? l.ov_mask : nullptr;
  p.ov_rows = l.ov_rows;
  p.ov_pos = l.ov_pos;
  p.ov_idx = l.ov_idx;
  p.bias = l.bias;
  p.bias_per_sample = l.bias_per_sample;
  p.per_sample = l.per_sample;

  const bool hier = a.mode == kHierarchical;
  const int64_t table_floats = hier ? 2 * a.K : a.K;
  const bool smem = table_floats <= kSmemFloats;
  const size_t shmem = smem ? static_cast<size_t>(table_floats) * sizeof(float) : 0;
  const dim3 grid(static_cast<unsigned>((l.out_f + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(a.S));
  dispatch_act(fn, l.x_dtype, [&](auto tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    const T* x = static_cast<const T*>(l.x);
    T* y = static_cast<T*>(l.y);
    dispatch_labels(fn, a.labels_dtype, a.labels, [&](auto lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      // MT: accumulator rows, the smallest of 4 / 16 that holds M (M = 1 decode pays for 4, not 16).
      if (hier) {
        if (l.M <= 4) k_linear_small_m<T, L, true, 4><<<grid, kThreads, shmem, stream>>>(x, lab, y, p, smem);
        else k_linear_small_m<T, L, true, 16><<<grid, kThreads, shmem, stream>>>(x, lab, y, p, smem);
      } else {
        if (l.M <= 4) k_linear_small_m<T, L, false, 4><<<grid, kThreads, shmem, stream>>>(x, lab, y, p, smem);
        else k_linear_small_m<T, L, false, 16><<<grid, kThreads, shmem, stream>>>(x, lab, y, p, smem);
      }
    });
  });
  SWS_CUDA_CHECK(fn, cudaGetLastError());
}

}  // namespace sws
