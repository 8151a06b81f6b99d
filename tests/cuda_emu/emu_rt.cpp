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
