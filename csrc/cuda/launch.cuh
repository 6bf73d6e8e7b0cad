// What every .cu file shares on the host side of a launch: the CUDA error check, the block size, the SM count,
// the grid sizing and the stream cast; plus the label read the kernels share.
// A failing runtime call becomes std::runtime_error naming the entry point (fn) and the call, which pybind11
// turns into a Python RuntimeError (never an abort).
#pragma once

#include <cuda_runtime.h>

#include "../common.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#define SWS_CUDA_CHECK(fn, call)                                                                               \
  do {                                                                                                         \
    const cudaError_t err_ = (call);                                                                           \
    if (err_ != cudaSuccess)                                                                                   \
      throw std::runtime_error(std::string(fn) + ": " #call " failed: " + cudaGetErrorString(err_) + " (" + \
                               std::to_string(static_cast<int>(err_)) + ")");                                  \
  } while (0)

namespace sws {

constexpr int kThreads = 256;           // threads per block of every kernel
constexpr int64_t kSmemFloats = 12288;  // 48 KB: the default dynamic shared memory limit, no opt-in needed

// SMs of the current device (grid caps are multiples of it); the queries create no context of their own.
inline int sm_count(const char* fn) {
  int dev = 0, sms = 0;
  SWS_CUDA_CHECK(fn, cudaGetDevice(&dev));
  SWS_CUDA_CHECK(fn, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(1, sms);
}

// Blocks of kThreads for `work` items, at least 1 and at most `cap` (the kernels grid-stride past the cap).
inline unsigned grid_for(int64_t work, int64_t cap) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(b, cap)));
}

// The stream python/module.cpp passes as an int (torch.cuda.current_stream().cuda_stream).
inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

#ifdef __CUDACC__
// Label i as an unsigned component id: a negative label becomes huge, so one `c < K` test rejects both ends.
template <class L>
__device__ __forceinline__ uint64_t label_at(const L* lab, int64_t i) {
  return static_cast<uint64_t>(static_cast<int64_t>(lab[i]));
}
#endif

#ifdef __CUDACC__
// The 4 normals of local weights i .. i+3 (cnt of them valid) under a shard's global element mapping (common.h
// ElemMap; tensor parallelism): the identity and any mapping whose aligned local quads are aligned global quads
// (offset, row_stride and row_len multiples of 4) take one Philox call per quad; any other mapping one per weight.
__device__ __forceinline__ void mapped_normal4(Key key, const ElemMap& em, int64_t i, int cnt, uint32_t sample,
                                               uint32_t owner, uint32_t purpose, bool quad, float eps[4]) {
  if (quad) {
    words_to_normal4(stream_words(key, static_cast<uint32_t>(em(i) >> 2), sample, owner, purpose), eps);
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) eps[t] = t < cnt ? normal_at(key, em(i + t), sample, owner, purpose) : 0.0f;
  }
}
#endif

// Whether mapped_normal4 may take one Philox call per quad under `em`.
inline bool quad_aligned(const ElemMap& em) {
  return em.identity() || ((em.offset & 3) == 0 && (em.row_len & 3) == 0 && (em.row_stride & 3) == 0);
}

}  // namespace sws
