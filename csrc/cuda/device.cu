// What sws_kernels.native needs to say whether, and why not, the CUDA kernels can run here. No kernels.
//
// Nothing here runs at import: python/module.cpp only binds these, and sws_kernels/native.py calls
// cuda_probe() lazily (first CUDA launch, backends(), `sws-kernels info`), once per process.
// cuda_probe() initialises the driver (cuInit, inside cudaGetDeviceCount) but creates no context: it only
// calls device-query functions. The runtime creates a device's primary context at the first call that needs
// one (cudaSetDevice, an allocation, a launch, cudaFuncGetAttributes): a context here would take memory on
// GPU 0 in every DDP rank and break CUDA in children forked afterwards.
#include <cuda_runtime.h>

#include <string>

#include "../common.h"

namespace sws {

int cuda_runtime_build_version() { return CUDART_VERSION; }  // a header constant: no runtime call

CudaProbe cuda_probe() {
  CudaProbe p;
  // First, because it works without any device: 0 when no driver library (libcuda) can be loaded.
  if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) p.driver_version = 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  p.count_error = static_cast<int>(err);
  if (err != cudaSuccess) {
    p.count_error_name = cudaGetErrorName(err);
    p.count_error_string = cudaGetErrorString(err);
    cudaGetLastError();  // the error is not sticky; leave the runtime's last-error slot clean
    return p;
  }
  p.device_count = count;
  for (int d = 0; d < count; ++d) {
    CudaDeviceInfo info;
    info.index = d;
    // Device queries (cuDeviceGetAttribute / cuDeviceGetName underneath): no context. The runtime has no
    // name-only query, hence cudaGetDeviceProperties for the name.
    cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, d);
    cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, d);
    cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, d);
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) info.name = prop.name;
    cudaGetLastError();
    p.devices.push_back(info);
  }
  return p;
}

}  // namespace sws
