// Philox4x32-10 and the stream rules of SPEC.md section 4, shared verbatim by the host (g++) and the
// device (nvcc) so both backends draw the same words. Nothing here may be compiled with fast-math:
// uniforms must be bit-exact across backends and normals within 1e-5 of the PyTorch reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SWS_HD __host__ __device__ __forceinline__
#else
#define SWS_HD inline
#endif

namespace sws {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies ctr[0]
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies ctr[2]
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps between rounds
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint64_t kMaxElement = 1ull << 34;  // per-stream element limit: counter word j must fit 32 bits

constexpr uint32_t kPurposeWeight = 0;     // eps[s, i], owner = layer rng_id
constexpr uint32_t kPurposeComponent = 1;  // xi[s, k], owner = codebook rng_id
constexpr uint32_t kPurposeBias = 2;       // mean-field bias noise

struct Words4 {
  uint32_t w[4];
};

SWS_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

SWS_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words4{{c0, c1, c2, c3}};
}

// The key of a 64-bit seed: (low word, high word).
struct Key {
  uint32_t k0, k1;
};
SWS_HD Key seed_key(uint64_t seed) { return Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}; }

// Where a kernel finds its seed (SPEC.md section 4: a seed given as a tensor is read from memory). `dev`, when
// set, points at the int64 seed in device memory: the kernel loads it, so the host never reads it (no sync)
// and a CUDA graph replays whatever value the tensor holds at replay. Otherwise `host` is the key.
struct SeedRef {
  const int64_t* dev;
  Key host;
#ifdef __CUDACC__
  __device__ __forceinline__ Key get() const { return dev ? seed_key(static_cast<uint64_t>(__ldg(dev))) : host; }
#endif
};

// Words of counter (j, sample, owner, purpose).
SWS_HD Words4 stream_words(Key key, uint32_t j, uint32_t sample, uint32_t owner, uint32_t purpose) {
  return philox4x32_10(j, sample, owner, purpose, key.k0, key.k1);
}

// u(w) = float32(2 * (w >> 9) + 1) * 2^-24: the integer is < 2^24 so the conversion and the power-of-two
// scale are exact; never 0 (log is finite) and never 1.
SWS_HD float word_to_uniform(uint32_t w) {
  return static_cast<float>(2u * (w >> 9) + 1u) * 5.9604644775390625e-08f;
}

constexpr float kTwoPiF = 6.2831855f;  // float32(2 pi), the constant the PyTorch reference multiplies by

// Box-Muller on one pair of uniforms, in float32 step by step exactly like the reference:
// r = sqrt(-2 * log(u0)); th = float32(2 pi) * u1; (r cos th, r sin th).
SWS_HD void box_muller(uint32_t wa, uint32_t wb, float& x, float& y) {
  const float ua = word_to_uniform(wa);
  const float ub = word_to_uniform(wb);
  const float r = sqrtf(-2.0f * logf(ua));
  const float th = kTwoPiF * ub;
  x = r * cosf(th);
  y = r * sinf(th);
}

// The four normals of one counter: elements 4j .. 4j+3 of a stream.
SWS_HD void words_to_normal4(const Words4& w, float out[4]) {
  box_muller(w.w[0], w.w[1], out[0], out[1]);
  box_muller(w.w[2], w.w[3], out[2], out[3]);
}

// One normal, element i of stream (key, sample, owner, purpose). Only the Box-Muller pair that holds
// element i is evaluated (half the transcendentals of words_to_normal4).
SWS_HD float normal_at(Key key, uint64_t i, uint32_t sample, uint32_t owner, uint32_t purpose) {
  const Words4 w = stream_words(key, static_cast<uint32_t>(i >> 2), sample, owner, purpose);
  const int t = static_cast<int>(i & 3);
  float x, y;
  if (t < 2) {
    box_muller(w.w[0], w.w[1], x, y);
  } else {
    box_muller(w.w[2], w.w[3], x, y);
  }
  return (t & 1) ? y : x;
}

SWS_HD float uniform_at(Key key, uint64_t i, uint32_t sample, uint32_t owner, uint32_t purpose) {
  const Words4 w = stream_words(key, static_cast<uint32_t>(i >> 2), sample, owner, purpose);
  return word_to_uniform(w.w[i & 3]);
}

}  // namespace sws
