// Bulk normals of a shard's elements under its global element mapping (common.h ElemMap; tensor parallelism,
// issue 18): the CPU kernels' block loops call mapped_normals_fill where they call normals_fill for the
// identity. A block of local elements splits into row segments, each a contiguous run of global elements; a run
// is drawn with the bulk normals_fill (one Philox call per 4 elements) over the counters that cover it, so an
// unaligned run costs at most one extra counter at each end, never a Philox call per element. vecmath.h's
// contract (element i of a stream gets the same float whichever call produced it) makes the values those of
// the unsharded layer's own blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common.h"
#include "vecmath.h"

namespace sws {

// out[0 .. len) = normals of global elements g .. g + len - 1 of stream (key, sample, owner, purpose).
inline void global_normals_fill(Key key, uint64_t g, int64_t len, uint32_t sample, uint32_t owner, uint32_t purpose,
                                float* out) {
  if ((g & 3) == 0 && (len & 3) == 0) {
    normals_fill(key, g >> 2, len >> 2, sample, owner, purpose, out);
    return;
  }
  constexpr int64_t kTmp = 256;  // a multiple of 4
  alignas(64) float tmp[kTmp];
  while (len > 0) {
    const int64_t skip = static_cast<int64_t>(g & 3);
    const int64_t take = std::min<int64_t>(len, kTmp - skip);
    normals_fill(key, g >> 2, (skip + take + 3) >> 2, sample, owner, purpose, tmp);
    std::memcpy(out, tmp + skip, static_cast<size_t>(take) * sizeof(float));
    out += take;
    g += static_cast<uint64_t>(take);
    len -= take;
  }
}

// out[0 .. len) = normals of local elements i0 .. i0 + len - 1 under the mapping m.
inline void mapped_normals_fill(Key key, const ElemMap& m, int64_t i0, int64_t len, uint32_t sample, uint32_t owner,
                                uint32_t purpose, float* out) {
  if (m.contiguous()) {
    global_normals_fill(key, m(i0), len, sample, owner, purpose, out);
    return;
  }
  const int64_t end = i0 + len;
  for (int64_t i = i0; i < end;) {
    const int64_t c = i % m.row_len;
    const int64_t take = std::min(end - i, m.row_len - c);
    global_normals_fill(key, m(i), take, sample, owner, purpose, out + (i - i0));
    i += take;
  }
}

}  // namespace sws
