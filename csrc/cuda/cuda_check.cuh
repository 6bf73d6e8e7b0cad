// The CUDA error check every .cu file uses: a failing runtime call becomes std::runtime_error naming the
// entry point (fn) and the call, which pybind11 turns into a Python RuntimeError (never an abort).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define SWS_CUDA_CHECK(fn, call)                                                                               \
  do {                                                                                                         \
    const cudaError_t err_ = (call);                                                                           \
    if (err_ != cudaSuccess)                                                                                   \
      throw std::runtime_error(std::string(fn) + ": " #call " failed: " + cudaGetErrorString(err_) + " (" + \
                               std::to_string(static_cast<int>(err_)) + ")");                                  \
  } while (0)
