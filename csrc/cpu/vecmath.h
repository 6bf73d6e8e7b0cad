// Bulk Philox -> Box-Muller normals and the per-element softplus / softplus' of the CPU kernels, with a
// runtime-dispatched AVX2 version (x86-64 with AVX2+FMA) and a portable scalar one (philox.h + libm).
//
// Contract (SPEC.md section 4): the Philox words, and so the uniforms, are bit-exact in both versions;
// the AVX2 normals use polynomial log/sin/cos (Cephes-style, float32) that stay within a few 1e-7 of the
// libm ones, far inside the 1e-5 absolute the contract allows. Which version ran is a property of the
// machine (and of set_simd), never of the thread count or of an element's position inside a call:
// the AVX2 path evaluates every counter as a full 8-lane group, tails included, so element i of a stream
// gets the same float whichever call or block produced it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../philox.h"

namespace sws {

// out[0 .. 4*nj): the normals of counters j0 .. j0+nj-1 of stream (key, sample, owner, purpose), i.e.
// elements 4*j0 .. 4*(j0+nj)-1. Requires j0 + nj <= 2^32 (callers check the 2^34 element limit).
void normals_fill(Key key, uint64_t j0, int64_t nj, uint32_t sample, uint32_t owner, uint32_t purpose, float* out);

// out[i] = softplus(x[i]) (torch's: x above 20, else log1p(exp(x))); in-place allowed.
void softplus_fill(const float* x, float* out, int64_t n);
// out[i] = softplus'(x[i]) = sigmoid(x[i]), exactly 1 above 20 (reference.softplus_grad); in-place allowed.
void softplus_grad_fill(const float* x, float* out, int64_t n);

// One-sample gather out[i] = z[lab[i]], i in [0, n), labels already range-checked; AVX2 vgatherdps on 8 labels
// at a time. Returns false (nothing written) when the vector path does not apply (no AVX2, or int64 labels,
// see the template): the caller then runs its own loop. stream: non-temporal stores (out 32-byte aligned).
bool gather1(const uint8_t* lab, int64_t n, const float* z, float* out, bool stream);
bool gather1(const int8_t* lab, int64_t n, const float* z, float* out, bool stream);
bool gather1(const int16_t* lab, int64_t n, const float* z, float* out, bool stream);
bool gather1(const int32_t* lab, int64_t n, const float* z, float* out, bool stream);
template <class L>
inline bool gather1(const L*, int64_t, const float*, float*, bool) {
  return false;
}

// issue 14: out[o * S + s] = the normal of element pos[o] of stream (key, s, owner, purpose), o < npos, s < S
// (scattered elements: one Philox call each; AVX2 8 at a time, else normal_at). Positions < 2^34.
void normals_at_fill(Key key, const int64_t* pos, int64_t npos, int64_t S, uint32_t owner, uint32_t purpose,
                     float* out);

// Transparent-huge-page hint for a fresh output of `bytes` (reconstruct.cpp): first-touch page faults of a
// fresh 64 MB output cost several times its writes. Only a hint; harmless when refused.
void advise_huge_pages(void* p, size_t bytes);

// "avx2" or "scalar": whether the calls above use vector code now ("avx2" also when they run the AVX-512
// versions: callers that only need AVX2 test this).
const char* simd_level();
// "avx512", "avx2" or "scalar": the widest vector code in use now. The AVX-512 (F/DQ/BW/VL) versions of the bulk
// and scattered normals run the same operations as the AVX2 ones on 16 lanes (same words, same normals).
const char* simd_isa();
// Enable (default) or disable the vector versions (tests compare both; benchmarks measure both). Enabling takes
// the widest level the CPU has, capped by the environment variable SWS_SIMD when set ("avx2": no AVX-512;
// "scalar": no vector code), read at each set_simd(true) and at the first call: a test sets SWS_SIMD and calls
// set_simd(True) to run a lower level in the same process.
void set_simd(bool enabled);

}  // namespace sws
