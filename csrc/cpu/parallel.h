// CPU threading of the native kernels (issue 17): CPU sources only (the CUDA sources never include it, so
// tuning a constant here recompiles no .cu file).
#pragma once

#include <cstdint>

namespace sws {

// One OpenMP runtime in the process: the module links torch's bundled libgomp (setup.py finds it, CMakeLists.txt
// links it and puts its directory on the RUNPATH), so torch.set_num_threads(n) / torch.get_num_threads() are this
// module's omp_set_num_threads / omp_get_max_threads too (tests/test_threading.py checks both).
// No parallel region below a grain: every region asks parallel_threads(estimated single-thread ns) for its team.
// Below kParallelGrainNs the region runs on the calling thread alone (no other thread is woken, nothing waits
// at a barrier); above it, at most one thread per grain of work, at most omp_get_max_threads(). Why a grain:
// on this 2-core machine under a concurrent CPU load (benchmarks/bench_overhead.py --threads-under-load, numbers
// in benchmarks/RESULTS.md) a 2-thread region costs milliseconds (the second thread waits for a time slice while
// the first spins at the barrier), so a 128x128, M = 8 sws_linear (~60 us) took a median 11.6 ms with 2 threads
// (185x its 1-thread time); with the grain it opens no region and takes the 1-thread time.
// Why not a pool of our own: torch's runtime is already the only one in the process (a second pool would add
// a second set of spinning threads), and with the grain every remaining region is >= 200 us of work per thread.
// SWS_CPU_GRAIN_US (read once) overrides the grain, for measurements (0: always parallel).
constexpr int64_t kParallelGrainNs = 200000;
// Estimated single-thread cost per element of the kernels' loops, ns (AVX2 build, AMD EPYC, 1 thread; measured
// by timing each op at 1 thread over sizes 64^2..512^2, rounded; an estimate only decides the team size).
constexpr double kNsLinearMac = 0.25;     // sws_linear_cpu: one multiply-add of the (row, padded M, input) loop
constexpr double kNsGather = 1.0;         // reconstruct paper/mean: one weight of one sample
constexpr double kNsNormal = 4.0;         // a bulk normal + its arithmetic (mean-field, hierarchical weights)
constexpr double kNsBackward = 3.0;       // reconstruct backward: one weight of one sample
constexpr double kNsScalarNormal = 25.0;  // one scalar normal_at (ellipse / outlier entries, codebook, per sample)
constexpr double kNsPhilox = 8.0;         // one scalar Philox4x32-10 block
int parallel_threads(double work_ns);

}  // namespace sws
