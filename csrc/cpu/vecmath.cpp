// Bulk normals and softplus on the CPU: AVX-512 (16 counters per step, several Philox chains in flight; normals
// only) and AVX2 (8 counters per step), runtime-dispatched, with a scalar fallback. See vecmath.h.
//
// Why: hierarchical reconstruct and the mean-field ops need one normal per weight per sample, and the scalar
// path (philox.h's Philox, then libm logf/sincosf per pair) costs ~25 ns per normal on the 2-core dev
// machine: n = 4M, S = 4 is 16.8M normals, ~90 ms of a ~94 ms hierarchical forward. The vector path runs
// Philox on 8 counters at once (_mm256_mul_epu32 on even/odd lanes gives the 32x32->64 products, blends
// split hi/lo) and evaluates Box-Muller with float32 polynomials, 8 pairs per instruction.
//
// Accuracy of the polynomials (Cephes single precision, the coefficients used by sse_mathfun/avx_mathfun):
// logf relative error ~1 ulp on the uniforms' range [2^-24, 1); sin/cos absolute error ~1e-7 on [0, 2 pi)
// after a three-constant Cody-Waite reduction (exact products for the small quadrant counts here); expf
// ~1 ulp. A normal r*cos(th) with r <= 5.8 then differs from libm's by < 1e-6 (tests check 1e-5, the
// contract). No fast-math: every operation is an explicit IEEE intrinsic.
//
// Measured (2-core AMD EPYC with AVX2/AVX-512, shared with other jobs: load 5-7, so min of several rounds;
// set_simd(false) gives the scalar numbers in the same process):
//   normals, 1 thread, n = 4M:                 543 M/s AVX2 vs 70 M/s scalar (1.8 vs 14.3 ns per normal)
//   mean-field fwd n = 4M S = 4, 1 thread,
//     preallocated output:                     61 ms AVX2 vs 307 ms scalar
//   2 threads, n = 4M S = 4 (16.8M normals):   normal() 75 vs 416 ms; hierarchical reconstruct fwd 141 vs 448 ms,
//                                              bwd 106 vs 408 ms; mean-field fwd 153 vs 481 ms, bwd 92 vs 384 ms
// Floor: hierarchical reconstruct and mean-field at n = 4M, S = 4 need 16.8M normals = 31 ms of one core at
// 543 M/s (about 15 ms on both), plus the 64 MB output write (~3 ms into warm pages; a fresh torch output
// also pays its page faults, ~45 ms for 64 MB without huge pages, hence advise_huge_pages).
#include "vecmath.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "../common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SWS_X86_DISPATCH 1
#define SWS_AVX2 __attribute__((target("avx2,fma")))
#define SWS_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define SWS_AVX512_INLINE __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), always_inline)) inline
#else
#define SWS_X86_DISPATCH 0
#endif

namespace sws {
namespace {

// The vector level in use: 0 scalar, 1 AVX2 + FMA, 2 AVX-512 (F/DQ/BW/VL); -1 until the first call. set_simd(true)
// (and the first call) take the best level the CPU has, capped by SWS_SIMD (see vecmath.h).
enum Level : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
std::atomic<int> g_level{-1};

// ------------------------------------------------------------------------------------------------------
// Scalar versions (any CPU): exactly the per-element functions of philox.h / common.h.
// ------------------------------------------------------------------------------------------------------

void normals_scalar(Key key, uint64_t j0, int64_t nj, uint32_t sample, uint32_t owner, uint32_t purpose, float* out) {
  for (int64_t jj = 0; jj < nj; ++jj) {
    words_to_normal4(stream_words(key, static_cast<uint32_t>(j0 + jj), sample, owner, purpose), out + 4 * jj);
  }
}

void softplus_scalar(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = softplus(x[i]);
}

void softplus_grad_scalar(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] > 20.0f ? 1.0f : sigmoid(x[i]);
}

#if SWS_X86_DISPATCH
// ------------------------------------------------------------------------------------------------------
// AVX2 + FMA versions
// ------------------------------------------------------------------------------------------------------

// The Cephes polynomials and reduction constants, one table for both vector widths (the AVX2 and AVX-512
// functions run the same operations on them in the same order: their normals are bit-identical, tested).
namespace cephes {
constexpr float kLog[9] = {7.0376836292E-2f,   -1.1514610310E-1f, 1.1676998740E-1f,
                           -1.2420140846E-1f,  1.4249322787E-1f,  -1.6668057665E-1f,
                           2.0000714765E-1f,   -2.4999993993E-1f, 3.3333331174E-1f};  // log(1 + f), f^3 onwards
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 split: e * kLn2Hi is exact
constexpr float kDP[3] = {0.78515625f, 2.4187564849853515625e-4f, 3.77489497744594108e-8f};  // pi/4 in three parts
constexpr float kFourOverPi = 1.27323954473516f;
constexpr float kCos[3] = {2.443315711809948E-005f, -1.388731625493765E-003f, 4.166664568298827E-002f};
constexpr float kSin[3] = {-1.9515295891E-4f, 8.3321608736E-3f, -1.6666654611E-1f};
}  // namespace cephes

SWS_AVX2 inline __m256 set1(float v) { return _mm256_set1_ps(v); }

// Horner steps y = y * x + c[i] for i = 1 .. N-1 (y starts at c[0]), as FMAs in that order.
template <size_t N>
SWS_AVX2 inline __m256 horner8(__m256 x, const float (&c)[N]) {
  __m256 y = set1(c[0]);
  for (size_t i = 1; i < N; ++i) y = _mm256_fmadd_ps(y, x, set1(c[i]));
  return y;
}

// Cephes logf for x > 0 normal (the uniforms are in [2^-24, 1); softplus's 1 + e^x is in (1, 4.9e8]).
SWS_AVX2 inline __m256 log_ps(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  __m256i e_i = _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(0x7e));
  // mantissa in [0.5, 1)
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));
  __m256 e = _mm256_cvtepi32_ps(e_i);
  // m < sqrt(1/2): use 2m - 1 and e - 1 so the polynomial argument stays in [sqrt(1/2) - 1, sqrt(2) - 1).
  const __m256 small = _mm256_cmp_ps(m, set1(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(set1(1.0f), small));
  const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, set1(1.0f)), _mm256_and_ps(m, small));  // exact (Sterbenz)
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = horner8(f, cephes::kLog);
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, set1(cephes::kLn2Lo), y);
  y = _mm256_fnmadd_ps(set1(0.5f), z, y);
  // ln 2 split in two (0.693359375 has 9 bits: e * it is exact) so small results keep their precision.
  return _mm256_fmadd_ps(e, set1(cephes::kLn2Hi), _mm256_add_ps(f, y));
}

// Cephes sincosf for x in [0, 2 pi] (th = 2 pi u). Quadrant count q <= 8, so q * DP1 and q * DP2 are exact
// and the reduced argument is accurate to ~1e-10 absolute.
SWS_AVX2 inline void sincos_ps(__m256 x, __m256& s, __m256& c) {
  __m256i q = _mm256_cvttps_epi32(_mm256_mul_ps(x, set1(cephes::kFourOverPi)));
  q = _mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));  // even quadrants
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 r = _mm256_fnmadd_ps(qf, set1(cephes::kDP[0]), x);
  r = _mm256_fnmadd_ps(qf, set1(cephes::kDP[1]), r);
  r = _mm256_fnmadd_ps(qf, set1(cephes::kDP[2]), r);
  // sin sign flips when bit 2 of q is set; cos sign flips when bit 2 of (q - 2) is clear... as in Cephes.
  const __m256 sign_sin = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(4)), 29));
  const __m256 sign_cos = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(q, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29));
  // quadrants 2, 6 (q & 2): sin and cos polynomials swap
  const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), _mm256_set1_epi32(2)));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 pc = horner8(z, cephes::kCos);
  pc = _mm256_mul_ps(_mm256_mul_ps(pc, z), z);
  pc = _mm256_fnmadd_ps(set1(0.5f), z, pc);
  pc = _mm256_add_ps(pc, set1(1.0f));
  __m256 ps = horner8(z, cephes::kSin);
  ps = _mm256_fmadd_ps(_mm256_mul_ps(ps, z), r, r);
  s = _mm256_xor_ps(_mm256_blendv_ps(ps, pc, swap), sign_sin);
  c = _mm256_xor_ps(_mm256_blendv_ps(pc, ps, swap), sign_cos);
}

// Cephes expf with the input clamped to [-87.3, 88.37] (callers need e^x only where it is a normal float
// or where its exact value no longer matters: softplus(x < -87) ~ 1e-38).
SWS_AVX2 inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, set1(-87.3f)), set1(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, set1(1.44269504088896341f), set1(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, set1(cephes::kLn2Hi), x);
  r = _mm256_fnmadd_ps(fx, set1(cephes::kLn2Lo), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 y = set1(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, set1(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, set1(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, set1(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, set1(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, set1(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), set1(1.0f));
  const __m256i p2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(p2));
}

// (hi, lo) of the 32x32->64 products m * x on 8 lanes: mul_epu32 multiplies the even lanes, a 32-bit shift
// brings the odd lanes down; blends put each lane's halves back in place.
SWS_AVX2 inline void mulhilo8(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(x, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// u(w) = float32(2 * (w >> 9) + 1) * 2^-24: the integer is < 2^24, so the conversion and scale are exact.
SWS_AVX2 inline __m256 uniform8(__m256i w) {
  const __m256i v = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(w, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), set1(5.9604644775390625e-08f));
}

// Box-Muller in the reference's float32 order: r = sqrt(-2 * log(u_a)), th = float32(2 pi) * u_b.
SWS_AVX2 inline void box_muller8(__m256i wa, __m256i wb, __m256& x, __m256& y) {
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(set1(-2.0f), log_ps(uniform8(wa))));
  __m256 s, c;
  sincos_ps(_mm256_mul_ps(set1(kTwoPiF), uniform8(wb)), s, c);
  x = _mm256_mul_ps(r, c);
  y = _mm256_mul_ps(r, s);
}

// The 32 normals of counters j .. j+7 in stream order (element 4(j + l) + t = lane l of output t).
// Philox4x32-10 on 8 counters at once (the rounds of csrc/philox.h, lane-wise): c0..c3 in, the outputs out.
SWS_AVX2 inline void philox8(const uint32_t* ks0, const uint32_t* ks1, __m256i& c0, __m256i& c1, __m256i& c2,
                             __m256i& c3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, hi0, lo0);
    mulhilo8(m1, c2, hi1, lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(ks0[r])));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(ks1[r])));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
}

SWS_AVX2 inline void normals8(const uint32_t* ks0, const uint32_t* ks1, uint32_t j, __m256i c1i, __m256i c2i,
                              __m256i c3i, float* out) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = c1i, c2 = c2i, c3 = c3i;
  philox8(ks0, ks1, c0, c1, c2, c3);
  __m256 v0, v1, v2, v3;
  box_muller8(c0, c1, v0, v1);
  box_muller8(c2, c3, v2, v3);
  // 4 x 8 -> 8 x 4 transpose: out[4l + t] = v_t[l].
  const __m256 a = _mm256_unpacklo_ps(v0, v1), b = _mm256_unpackhi_ps(v0, v1);
  const __m256 cc = _mm256_unpacklo_ps(v2, v3), d = _mm256_unpackhi_ps(v2, v3);
  const __m256 e = _mm256_shuffle_ps(a, cc, _MM_SHUFFLE(1, 0, 1, 0));  // lanes 0 | 4
  const __m256 f = _mm256_shuffle_ps(a, cc, _MM_SHUFFLE(3, 2, 3, 2));  // lanes 1 | 5
  const __m256 g = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(1, 0, 1, 0));   // lanes 2 | 6
  const __m256 h = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(3, 2, 3, 2));   // lanes 3 | 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(e, f, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g, h, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(e, f, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g, h, 0x31));
}

SWS_AVX2 void normals_avx2(Key key, uint64_t j0, int64_t nj, uint32_t sample, uint32_t owner, uint32_t purpose,
                           float* out) {
  uint32_t ks0[10], ks1[10];  // the round keys
  ks0[0] = key.k0;
  ks1[0] = key.k1;
  for (int r = 1; r < 10; ++r) {
    ks0[r] = ks0[r - 1] + kPhiloxW0;
    ks1[r] = ks1[r - 1] + kPhiloxW1;
  }
  const __m256i c1 = _mm256_set1_epi32(static_cast<int>(sample));
  const __m256i c2 = _mm256_set1_epi32(static_cast<int>(owner));
  const __m256i c3 = _mm256_set1_epi32(static_cast<int>(purpose));
  int64_t jj = 0;
  for (; jj + 8 <= nj; jj += 8) normals8(ks0, ks1, static_cast<uint32_t>(j0 + jj), c1, c2, c3, out + 4 * jj);
  if (jj < nj) {  // a full group into a scratch buffer: a tail normal equals the same normal of a full group
    alignas(32) float tmp[32];
    normals8(ks0, ks1, static_cast<uint32_t>(j0 + jj), c1, c2, c3, tmp);
    std::memcpy(out + 4 * jj, tmp, sizeof(float) * 4 * static_cast<size_t>(nj - jj));
  }
}

// softplus(x) = x above 20, else log1p(e^x), with log1p(t) = log(1 + t) * t / ((1 + t) - 1) (exact up to
// the log's ulps: the quotient corrects the rounding of 1 + t) and t itself when 1 + t rounds to 1.
SWS_AVX2 inline __m256 softplus8(__m256 x) {
  const __m256 t = exp_ps(_mm256_min_ps(x, set1(20.0f)));
  const __m256 u = _mm256_add_ps(set1(1.0f), t);
  const __m256 d = _mm256_sub_ps(u, set1(1.0f));
  const __m256 one = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
  // log(u) * (t / d), with d replaced by t where it is 0 (the blend then picks t anyway)
  const __m256 l = _mm256_mul_ps(log_ps(u), _mm256_div_ps(t, _mm256_blendv_ps(d, t, one)));
  const __m256 sp = _mm256_blendv_ps(l, t, one);
  // x itself above 20, and where x is NaN: exp_ps's clamps (min/max return their second operand on NaN) would
  // otherwise turn a NaN parameter into a finite weight; PyTorch's softplus gives NaN.
  const __m256 pass = _mm256_or_ps(_mm256_cmp_ps(x, set1(20.0f), _CMP_GT_OQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_ps(sp, x, pass);
}

SWS_AVX2 inline __m256 softplus_grad8(__m256 x) {
  const __m256 sg = _mm256_div_ps(set1(1.0f), _mm256_add_ps(set1(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
  const __m256 g = _mm256_blendv_ps(sg, set1(1.0f), _mm256_cmp_ps(x, set1(20.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(g, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out (see softplus8)
}

SWS_AVX2 void softplus_avx2(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, softplus8(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail through the same vector code (position-independent results)
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, x + i, sizeof(float) * static_cast<size_t>(n - i));
    _mm256_store_ps(tmp, softplus8(_mm256_load_ps(tmp)));
    std::memcpy(out + i, tmp, sizeof(float) * static_cast<size_t>(n - i));
  }
}

SWS_AVX2 void softplus_grad_avx2(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, softplus_grad8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, x + i, sizeof(float) * static_cast<size_t>(n - i));
    _mm256_store_ps(tmp, softplus_grad8(_mm256_load_ps(tmp)));
    std::memcpy(out + i, tmp, sizeof(float) * static_cast<size_t>(n - i));
  }
}

SWS_AVX2 inline __m256i idx8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
SWS_AVX2 inline __m256i idx8(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
SWS_AVX2 inline __m256i idx8(const int16_t* p) { return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
SWS_AVX2 inline __m256i idx8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <class L>
SWS_AVX2 void gather1_avx2(const L* lab, int64_t n, const float* z, float* out, bool stream) {
  int64_t i = 0;
  if (stream) {
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(out + i, _mm256_i32gather_ps(z, idx8(lab + i), 4));
  } else {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_i32gather_ps(z, idx8(lab + i), 4));
  }
  for (; i < n; ++i) out[i] = z[static_cast<int64_t>(lab[i])];
}

// ---- issue 14 (histogram.cpp): normals at scattered elements, out[o * S + s] = element pos[o] of sample s ----
// One Philox call per normal (scattered elements rarely share a counter), 8 lanes per call; only the word pair an
// element needs goes through Box-Muller, and its cos or sin is kept. S >= 8: the lanes are 8 samples of one
// element (counter words 0 and 1 from registers); S < 8: 8 (element, sample) pairs. Lanes past the end are
// computed and dropped.
SWS_AVX2 inline __m256 normal8_at(const uint32_t* ks0, const uint32_t* ks1, __m256i c0, __m256i c1, __m256i c2,
                                  __m256i c3, __m256i t) {
  philox8(ks0, ks1, c0, c1, c2, c3);
  const __m256i upper = _mm256_cmpgt_epi32(t, _mm256_set1_epi32(1));  // element % 4 >= 2: words 2, 3
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(t, _mm256_set1_epi32(1)), _mm256_set1_epi32(1));
  __m256 x, y;
  box_muller8(_mm256_blendv_epi8(c0, c2, upper), _mm256_blendv_epi8(c1, c3, upper), x, y);
  return _mm256_blendv_ps(x, y, _mm256_castsi256_ps(odd));
}

SWS_AVX2 void normals_at_avx2(Key key, const int64_t* pos, int64_t npos, int64_t S, uint32_t owner, uint32_t purpose,
                              float* out) {
  uint32_t ks0[10], ks1[10];
  ks0[0] = key.k0;
  ks1[0] = key.k1;
  for (int r = 1; r < 10; ++r) {
    ks0[r] = ks0[r - 1] + kPhiloxW0;
    ks1[r] = ks1[r - 1] + kPhiloxW1;
  }
  const __m256i c2 = _mm256_set1_epi32(static_cast<int>(owner)), c3 = _mm256_set1_epi32(static_cast<int>(purpose));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) float res[8];
  if (S >= 8) {
    for (int64_t o = 0; o < npos; ++o) {
      const uint64_t p = static_cast<uint64_t>(pos[o]);
      const __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p >> 2)));
      const __m256i t = _mm256_set1_epi32(static_cast<int>(p & 3));
      float* dst = out + o * S;
      int64_t s0 = 0;
      for (; s0 + 8 <= S; s0 += 8)
        _mm256_storeu_ps(dst + s0, normal8_at(ks0, ks1, c0, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(s0)),
                                                                              lane), c2, c3, t));
      if (s0 < S) {
        _mm256_store_ps(res, normal8_at(ks0, ks1, c0, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(s0)), lane),
                                        c2, c3, t));
        std::memcpy(dst + s0, res, sizeof(float) * static_cast<size_t>(S - s0));
      }
    }
    return;
  }
  const int64_t total = npos * S;
  int64_t o = 0, s = 0;  // the (element, sample) pair of the next lane: no divisions
  int32_t jv[8], sv[8], tv[8];
  for (int64_t t0 = 0; t0 < total; t0 += 8) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, total - t0));
    for (int l = 0; l < 8; ++l) {
      if (l < lanes) {
        jv[l] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(pos[o]) >> 2));
        sv[l] = static_cast<int32_t>(s);
        tv[l] = static_cast<int32_t>(pos[o] & 3);
        if (++s == S) s = 0, ++o;
      } else {
        jv[l] = jv[0], sv[l] = sv[0], tv[l] = tv[0];
      }
    }
    const __m256i c0 = _mm256_setr_epi32(jv[0], jv[1], jv[2], jv[3], jv[4], jv[5], jv[6], jv[7]);
    const __m256i c1 = _mm256_setr_epi32(sv[0], sv[1], sv[2], sv[3], sv[4], sv[5], sv[6], sv[7]);
    const __m256i t = _mm256_setr_epi32(tv[0], tv[1], tv[2], tv[3], tv[4], tv[5], tv[6], tv[7]);
    _mm256_store_ps(res, normal8_at(ks0, ks1, c0, c1, c2, c3, t));
    std::memcpy(out + t0, res, sizeof(float) * static_cast<size_t>(lanes));
  }
}
// ---- end issue 14 ----

// GCC 12 flags the intrinsics' own _mm512_undefined_* (self-initialised on purpose) as maybe-uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ------------------------------------------------------------------------------------------------------
// AVX-512 (F/DQ/BW/VL) versions: 16 lanes, and several independent Philox chains in flight per step.
// Why several chains: one Philox4x32-10 block is a dependency chain of 10 rounds (a 32x32->64 multiply, a
// blend and an xor each, ~8 cycles of latency per round), then the Box-Muller polynomials; one chain per step
// left the AVX2 scattered-normal loop latency-bound (~7 ns per normal, ~1 vector op per cycle retired).
// The arithmetic is a lane-for-lane port of the AVX2 functions above, with the same operations in the same
// order (the uniforms, and so the words, are bit-exact; the normals are those of the AVX2 path).
// ------------------------------------------------------------------------------------------------------

SWS_AVX512_INLINE __m512 set1z(float v) { return _mm512_set1_ps(v); }
SWS_AVX512_INLINE __m512i set1i(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// horner8 on 16 lanes.
template <size_t N>
SWS_AVX512_INLINE __m512 horner16(__m512 x, const float (&c)[N]) {
  __m512 y = set1z(c[0]);
  for (size_t i = 1; i < N; ++i) y = _mm512_fmadd_ps(y, x, set1z(c[i]));
  return y;
}

// log_ps on 16 lanes (see log_ps for the method and accuracy).
SWS_AVX512_INLINE __m512 log16(__m512 x) {
  const __m512i xi = _mm512_castps_si512(x);
  const __m512i e_i = _mm512_sub_epi32(_mm512_srli_epi32(xi, 23), set1i(0x7e));
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(xi, set1i(0x007fffff)), set1i(0x3f000000)));
  __m512 e = _mm512_cvtepi32_ps(e_i);
  const __mmask16 small = _mm512_cmp_ps_mask(m, set1z(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm512_sub_ps(e, _mm512_maskz_mov_ps(small, set1z(1.0f)));
  const __m512 f = _mm512_add_ps(_mm512_sub_ps(m, set1z(1.0f)), _mm512_maskz_mov_ps(small, m));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = horner16(f, cephes::kLog);
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, set1z(cephes::kLn2Lo), y);
  y = _mm512_fnmadd_ps(set1z(0.5f), z, y);
  return _mm512_fmadd_ps(e, set1z(cephes::kLn2Hi), _mm512_add_ps(f, y));
}

// The Cephes reduction of sincos_ps on 16 lanes: the even quadrant count q and x - q pi/4.
SWS_AVX512_INLINE __m512 reduce16(__m512 x, __m512i& q) {
  q = _mm512_cvttps_epi32(_mm512_mul_ps(x, set1z(cephes::kFourOverPi)));
  q = _mm512_and_si512(_mm512_add_epi32(q, set1i(1)), set1i(~1u));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 r = _mm512_fnmadd_ps(qf, set1z(cephes::kDP[0]), x);
  r = _mm512_fnmadd_ps(qf, set1z(cephes::kDP[1]), r);
  return _mm512_fnmadd_ps(qf, set1z(cephes::kDP[2]), r);
}

// sincos_ps' cos (pc) and sin (ps) polynomials of the reduced argument r.
SWS_AVX512_INLINE void polys16(__m512 r, __m512& pc, __m512& ps) {
  const __m512 z = _mm512_mul_ps(r, r);
  pc = horner16(z, cephes::kCos);
  pc = _mm512_mul_ps(_mm512_mul_ps(pc, z), z);
  pc = _mm512_fnmadd_ps(set1z(0.5f), z, pc);
  pc = _mm512_add_ps(pc, set1z(1.0f));
  ps = horner16(z, cephes::kSin);
  ps = _mm512_fmadd_ps(_mm512_mul_ps(ps, z), r, r);
}

// sincos_ps on 16 lanes: (sin x, cos x).
SWS_AVX512_INLINE void sincos16(__m512 x, __m512& s, __m512& c) {
  __m512i q;
  const __m512 r = reduce16(x, q);
  const __m512 sign_sin = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(q, set1i(4)), 29));
  const __m512 sign_cos =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_andnot_si512(_mm512_sub_epi32(q, set1i(2)), set1i(4)), 29));
  const __mmask16 swap = _mm512_test_epi32_mask(q, set1i(2));
  __m512 pc, ps;
  polys16(r, pc, ps);
  s = _mm512_xor_ps(_mm512_mask_blend_ps(swap, ps, pc), sign_sin);
  c = _mm512_xor_ps(_mm512_mask_blend_ps(swap, pc, ps), sign_cos);
}

// One output per lane: sin x where `odd`, else cos x; the value sincos16 gives for it (sin x = cos(x - pi/2): a
// sin lane takes the cos branch with the quadrant count moved back by 2, which picks the same polynomial and sign).
SWS_AVX512_INLINE __m512 sin_or_cos16(__m512 x, __mmask16 odd) {
  __m512i q;
  const __m512 r = reduce16(x, q);
  const __m512i qq = _mm512_mask_sub_epi32(q, odd, q, set1i(2));
  const __m512 sign =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_andnot_si512(_mm512_sub_epi32(qq, set1i(2)), set1i(4)), 29));
  const __mmask16 use_sin_poly = _mm512_test_epi32_mask(qq, set1i(2));
  __m512 pc, ps;
  polys16(r, pc, ps);
  return _mm512_xor_ps(_mm512_mask_blend_ps(use_sin_poly, pc, ps), sign);
}

SWS_AVX512_INLINE __m512 uniform16(__m512i w) {
  const __m512i v = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), set1i(1));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), set1z(5.9604644775390625e-08f));
}

// r = sqrt(-2 log u(wa)), th = float32(2 pi) u(wb), as box_muller8.
SWS_AVX512_INLINE __m512 bm_radius16(__m512i wa) {
  return _mm512_sqrt_ps(_mm512_mul_ps(set1z(-2.0f), log16(uniform16(wa))));
}
SWS_AVX512_INLINE __m512 bm_angle16(__m512i wb) { return _mm512_mul_ps(set1z(kTwoPiF), uniform16(wb)); }

// Philox4x32-10 on N independent groups of 16 counters, the rounds interleaved (N chains in flight).
// (hi, lo) of m * x per lane: mul_epu32 on the even lanes and on the odd lanes shifted down (64-bit products),
// then one two-source permute each picks every lane's high or low half (5 ops per product where mulhilo8's
// shift-and-blend takes 7; measured ~5% faster at 4 chains).
template <int N>
SWS_AVX512_INLINE void philox16(const uint32_t* ks0, const uint32_t* ks1, __m512i (&c)[N][4]) {
  const __m512i m0 = set1i(kPhiloxM0), m1 = set1i(kPhiloxM1);
  const __m512i ihi = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  const __m512i ilo = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m512i k0 = set1i(ks0[r]), k1 = set1i(ks1[r]);
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) {
      const __m512i pe0 = _mm512_mul_epu32(c[n][0], m0);
      const __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(c[n][0], 32), m0);
      const __m512i pe1 = _mm512_mul_epu32(c[n][2], m1);
      const __m512i po1 = _mm512_mul_epu32(_mm512_srli_epi64(c[n][2], 32), m1);
      const __m512i hi0 = _mm512_permutex2var_epi32(pe0, ihi, po0);
      const __m512i lo0 = _mm512_permutex2var_epi32(pe0, ilo, po0);
      const __m512i hi1 = _mm512_permutex2var_epi32(pe1, ihi, po1);
      const __m512i lo1 = _mm512_permutex2var_epi32(pe1, ilo, po1);
      c[n][0] = _mm512_ternarylogic_epi32(hi1, c[n][1], k0, 0x96);  // three-way xor
      c[n][2] = _mm512_ternarylogic_epi32(hi0, c[n][3], k1, 0x96);
      c[n][1] = lo1;
      c[n][3] = lo0;
    }
  }
}

SWS_AVX512 void round_keys(Key key, uint32_t* ks0, uint32_t* ks1) {
  ks0[0] = key.k0;
  ks1[0] = key.k1;
  for (int r = 1; r < 10; ++r) {
    ks0[r] = ks0[r - 1] + kPhiloxW0;
    ks1[r] = ks1[r - 1] + kPhiloxW1;
  }
}

// Bulk: the 64 normals of counters j .. j+15 in stream order, for N consecutive groups (j, j + 16, ...).
template <int N>
SWS_AVX512_INLINE void normals16(const uint32_t* ks0, const uint32_t* ks1, uint32_t j, __m512i c1, __m512i c2,
                                 __m512i c3, float* out) {
  __m512i c[N][4];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) {
    c[n][0] = _mm512_add_epi32(set1i(j + 16u * static_cast<uint32_t>(n)), lane);
    c[n][1] = c1, c[n][2] = c2, c[n][3] = c3;
  }
  philox16<N>(ks0, ks1, c);
  // element 4 (j + l) + t = lane l of output t: interleave (v0, v1, v2, v3) lane by lane with two rounds of
  // two-source permutes.
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i plo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i phi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) {
    __m512 s01, c01, s23, c23;
    sincos16(bm_angle16(c[n][1]), s01, c01);
    sincos16(bm_angle16(c[n][3]), s23, c23);
    const __m512 r01 = bm_radius16(c[n][0]), r23 = bm_radius16(c[n][2]);
    const __m512 v0 = _mm512_mul_ps(r01, c01), v1 = _mm512_mul_ps(r01, s01);
    const __m512 v2 = _mm512_mul_ps(r23, c23), v3 = _mm512_mul_ps(r23, s23);
    // pairs (v0[l], v1[l]) and (v2[l], v3[l]) as 64-bit units, then the pairs of pairs
    const __m512d a_lo = _mm512_castps_pd(_mm512_permutex2var_ps(v0, ilo, v1));  // (v0 v1) of lanes 0..7
    const __m512d a_hi = _mm512_castps_pd(_mm512_permutex2var_ps(v0, ihi, v1));  // lanes 8..15
    const __m512d b_lo = _mm512_castps_pd(_mm512_permutex2var_ps(v2, ilo, v3));
    const __m512d b_hi = _mm512_castps_pd(_mm512_permutex2var_ps(v2, ihi, v3));
    float* o = out + 64 * n;
    _mm512_storeu_pd(reinterpret_cast<double*>(o), _mm512_permutex2var_pd(a_lo, plo, b_lo));
    _mm512_storeu_pd(reinterpret_cast<double*>(o + 16), _mm512_permutex2var_pd(a_lo, phi, b_lo));
    _mm512_storeu_pd(reinterpret_cast<double*>(o + 32), _mm512_permutex2var_pd(a_hi, plo, b_hi));
    _mm512_storeu_pd(reinterpret_cast<double*>(o + 48), _mm512_permutex2var_pd(a_hi, phi, b_hi));
  }
}

constexpr int kBulkChains = 2;  // groups of 16 counters in flight: 0.63 / 0.50 ns per normal with 1 / 2 chains

SWS_AVX512 void normals_avx512(Key key, uint64_t j0, int64_t nj, uint32_t sample, uint32_t owner, uint32_t purpose,
                               float* out) {
  uint32_t ks0[10], ks1[10];
  round_keys(key, ks0, ks1);
  const __m512i c1 = set1i(sample), c2 = set1i(owner), c3 = set1i(purpose);
  constexpr int64_t step = 16 * kBulkChains;
  int64_t jj = 0;
  for (; jj + step <= nj; jj += step)
    normals16<kBulkChains>(ks0, ks1, static_cast<uint32_t>(j0 + jj), c1, c2, c3, out + 4 * jj);
  for (; jj + 16 <= nj; jj += 16) normals16<1>(ks0, ks1, static_cast<uint32_t>(j0 + jj), c1, c2, c3, out + 4 * jj);
  // the last < 16 counters: the AVX2 groups of 8 (the same normals; a tiny call computes 32, not 64)
  if (jj < nj) normals_avx2(key, j0 + static_cast<uint64_t>(jj), nj - jj, sample, owner, purpose, out + 4 * jj);
}

// ---- issue 14: scattered normals (normals_at_fill) on 16 lanes, kAtChains jobs in flight ----
// A job is 16 lanes of (element, sample) pairs whose outputs are contiguous in out: S >= 16: 16 samples of one
// element (the last job of an element masked); S < 16: 16 / S whole elements, S samples each. Only the word
// pair a lane's element needs goes through Box-Muller, and only its cos or sin (sin_or_cos16).
constexpr int kAtChains = 4;  // 1.9 / 1.5 / 1.4 / 1.3 ns per normal with 1 / 2 / 3 / 4 chains (S = 16)

struct AtJob {
  __m512i c0, c1;           // counter words 0 (element >> 2) and 1 (sample)
  __mmask16 upper, odd;     // element % 4 >= 2 (words 2, 3), element odd (sin)
  __mmask16 store;          // lanes written
  float* dst;
};

template <int N>
SWS_AVX512_INLINE void normals_at_jobs(const uint32_t* ks0, const uint32_t* ks1, __m512i c2, __m512i c3,
                                       const AtJob* jobs) {
  __m512i c[N][4];
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) c[n][0] = jobs[n].c0, c[n][1] = jobs[n].c1, c[n][2] = c2, c[n][3] = c3;
  philox16<N>(ks0, ks1, c);
#pragma GCC unroll 8
  for (int n = 0; n < N; ++n) {
    const __m512i wa = _mm512_mask_blend_epi32(jobs[n].upper, c[n][0], c[n][2]);
    const __m512i wb = _mm512_mask_blend_epi32(jobs[n].upper, c[n][1], c[n][3]);
    const __m512 v = _mm512_mul_ps(bm_radius16(wa), sin_or_cos16(bm_angle16(wb), jobs[n].odd));
    _mm512_mask_storeu_ps(jobs[n].dst, jobs[n].store, v);
  }
}

// Runs jobs[0 .. nj) (idle chains, when nj < kAtChains, store nothing); returns 0.
SWS_AVX512_INLINE int flush_at_jobs(const uint32_t* ks0, const uint32_t* ks1, __m512i c2, __m512i c3, AtJob* jobs,
                                    int nj) {
  for (int n = nj; n < kAtChains; ++n) jobs[n] = jobs[0], jobs[n].store = 0;
  normals_at_jobs<kAtChains>(ks0, ks1, c2, c3, jobs);
  return 0;
}

SWS_AVX512 void normals_at_avx512(Key key, const int64_t* pos, int64_t npos, int64_t S, uint32_t owner,
                                  uint32_t purpose, float* out) {
  uint32_t ks0[10], ks1[10];
  round_keys(key, ks0, ks1);
  const __m512i c2 = set1i(owner), c3 = set1i(purpose);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  AtJob jobs[kAtChains];
  int nj = 0;
  if (S >= 16) {
    for (int64_t o = 0; o < npos; ++o) {
      const uint64_t p = static_cast<uint64_t>(pos[o]);
      const __m512i c0 = set1i(static_cast<uint32_t>(p >> 2));
      const __mmask16 upper = (p & 2) ? 0xFFFF : 0, odd = (p & 1) ? 0xFFFF : 0;
      for (int64_t s0 = 0; s0 < S; s0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, S - s0);
        jobs[nj++] = AtJob{c0, _mm512_add_epi32(set1i(static_cast<uint32_t>(s0)), lane), upper, odd,
                           static_cast<__mmask16>((1u << cnt) - 1u), out + o * S + s0};
        if (nj == kAtChains) nj = flush_at_jobs(ks0, ks1, c2, c3, jobs, nj);
      }
    }
  } else {
    // lane l: element o0 + l / S, sample l % S, for l < per * S
    const int per = static_cast<int>(16 / S);
    alignas(64) int32_t lo[16], ls[16];
    for (int l = 0; l < 16; ++l) lo[l] = l < per * S ? l / static_cast<int>(S) : 0, ls[l] = l % static_cast<int>(S);
    const __m512i lane_o = _mm512_load_si512(lo), lane_s = _mm512_load_si512(ls);
    for (int64_t o0 = 0; o0 < npos; o0 += per) {
      const int64_t ne = std::min<int64_t>(per, npos - o0);
      // the ne positions as 32-bit (p >> 2, p & 3), then spread over the lanes
      const __mmask8 m0 = static_cast<__mmask8>((1u << std::min<int64_t>(ne, 8)) - 1u);
      const __m512i p0 = _mm512_maskz_loadu_epi64(m0, pos + o0);
      __m512i pp = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(p0));
      if (ne > 8) {
        const __mmask8 m1 = static_cast<__mmask8>((1u << (ne - 8)) - 1u);
        pp = _mm512_inserti64x4(pp, _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(m1, pos + o0 + 8)), 1);
      }
      // positions < 2^34: bits 2..33 are the counter word, so take them from the 64-bit values
      __m512i j32 = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(p0, 2)));
      if (ne > 8) {
        const __mmask8 m1 = static_cast<__mmask8>((1u << (ne - 8)) - 1u);
        j32 = _mm512_inserti64x4(
            j32, _mm512_cvtepi64_epi32(_mm512_srli_epi64(_mm512_maskz_loadu_epi64(m1, pos + o0 + 8), 2)), 1);
      }
      const __m512i t = _mm512_permutexvar_epi32(lane_o, pp);
      jobs[nj++] = AtJob{_mm512_permutexvar_epi32(lane_o, j32), lane_s, _mm512_test_epi32_mask(t, set1i(2)),
                         _mm512_test_epi32_mask(t, set1i(1)),
                         static_cast<__mmask16>((1u << (ne * S)) - 1u), out + o0 * S};
      if (nj == kAtChains) nj = flush_at_jobs(ks0, ks1, c2, c3, jobs, nj);
    }
  }
  if (nj) flush_at_jobs(ks0, ks1, c2, c3, jobs, nj);
}
// ---- end issue 14 (AVX-512) ----
#pragma GCC diagnostic pop

bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif  // SWS_X86_DISPATCH

// SWS_SIMD caps the level: "scalar", "avx2", anything else (or unset) no cap; read at every set_simd(true).
int best_level() {
  int best = kScalar;
#if SWS_X86_DISPATCH
  if (cpu_has_avx512()) best = kAvx512;
  else if (cpu_has_avx2()) best = kAvx2;
#endif
  const char* cap = std::getenv("SWS_SIMD");
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return kScalar;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min<int>(best, kAvx2);
  return best;
}

inline int level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l < 0) {
    l = best_level();
    g_level.store(l, std::memory_order_relaxed);
  }
  return l;
}

inline bool use_avx2() { return level() >= kAvx2; }
inline bool use_avx512() { return level() >= kAvx512; }

}  // namespace

void normals_fill(Key key, uint64_t j0, int64_t nj, uint32_t sample, uint32_t owner, uint32_t purpose, float* out) {
  if (nj <= 0) return;
#if SWS_X86_DISPATCH
  if (use_avx512()) return normals_avx512(key, j0, nj, sample, owner, purpose, out);
  if (use_avx2()) return normals_avx2(key, j0, nj, sample, owner, purpose, out);
#endif
  normals_scalar(key, j0, nj, sample, owner, purpose, out);
}

void softplus_fill(const float* x, float* out, int64_t n) {
  if (n <= 0) return;
#if SWS_X86_DISPATCH
  if (use_avx2()) return softplus_avx2(x, out, n);
#endif
  softplus_scalar(x, out, n);
}

void softplus_grad_fill(const float* x, float* out, int64_t n) {
  if (n <= 0) return;
#if SWS_X86_DISPATCH
  if (use_avx2()) return softplus_grad_avx2(x, out, n);
#endif
  softplus_grad_scalar(x, out, n);
}

// issue 14: see vecmath.h
void normals_at_fill(Key key, const int64_t* pos, int64_t npos, int64_t S, uint32_t owner, uint32_t purpose,
                     float* out) {
  if (npos <= 0 || S <= 0) return;
#if SWS_X86_DISPATCH
  if (use_avx512()) return normals_at_avx512(key, pos, npos, S, owner, purpose, out);
  if (use_avx2()) return normals_at_avx2(key, pos, npos, S, owner, purpose, out);
#endif
  for (int64_t o = 0; o < npos; ++o)
    for (int64_t s = 0; s < S; ++s)
      out[o * S + s] = normal_at(key, static_cast<uint64_t>(pos[o]), static_cast<uint32_t>(s), owner, purpose);
}

template <class L>
bool gather1_dispatch(const L* lab, int64_t n, const float* z, float* out, bool stream) {
#if SWS_X86_DISPATCH
  if (use_avx2()) {
    gather1_avx2(lab, n, z, out, stream && (reinterpret_cast<uintptr_t>(out) & 31) == 0);
    return true;
  }
#endif
  (void)lab, (void)n, (void)z, (void)out, (void)stream;
  return false;
}

bool gather1(const uint8_t* lab, int64_t n, const float* z, float* out, bool stream) { return gather1_dispatch(lab, n, z, out, stream); }
bool gather1(const int8_t* lab, int64_t n, const float* z, float* out, bool stream) { return gather1_dispatch(lab, n, z, out, stream); }
bool gather1(const int16_t* lab, int64_t n, const float* z, float* out, bool stream) { return gather1_dispatch(lab, n, z, out, stream); }
bool gather1(const int32_t* lab, int64_t n, const float* z, float* out, bool stream) { return gather1_dispatch(lab, n, z, out, stream); }

const char* simd_level() { return use_avx2() ? "avx2" : "scalar"; }

const char* simd_isa() {
  const int l = level();
  return l >= kAvx512 ? "avx512" : l >= kAvx2 ? "avx2" : "scalar";
}

void set_simd(bool enabled) { g_level.store(enabled ? best_level() : kScalar, std::memory_order_relaxed); }

}  // namespace sws
