// CUDA runtime calls used by csrc/cuda/common.cuh, for the emulation (see emu.h).
#include "emu.h"

extern "C" cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

extern "C" const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch error";
}

extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = emu::device;
  return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kDevices) return cudaErrorInvalidDevice;
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = emu::kDeviceCcMajor[device];
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = device == 1 ? 5 : 0;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Stream-ordered allocation: plain malloc, filled with 0xFF bytes (NaN) so that reading what was
// never written shows; live_allocs lets the driver check that every allocation was freed.
extern "C" cudaError_t cudaMallocAsync(void** p, size_t size, cudaStream_t) {
  *p = std::malloc(size ? size : 1);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, size);
  ++emu::live_allocs;
  emu::alloc_log.push_back(size);
  return cudaSuccess;
}

extern "C" cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  --emu::live_allocs;
  return cudaSuccess;
}

extern "C" cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}
