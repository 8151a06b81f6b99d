// Shared definitions of the linft native libraries (CPU and CUDA).
//
// The native libraries take raw pointers, never torch headers (see DESIGN.md section 2).
// Every tensor crossing this boundary is contiguous and row-major; the Python layer checks
// shapes, dtypes and devices before any pointer gets here.
#pragma once
#include <cstdint>

namespace linft {

// Element type of an input tensor. Keep in sync with linft_kernels/_native.py.
enum DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

// Which per-sample-gradient kernel psg_gram contracts (Malladi et al. 2023).
enum KernelKind : int {
  kSGD = 0,              // <F_i, F_j>
  kSignGD = 1,           // <sign F_i, sign F_j>
  kAsymmetricSignGD = 2  // <F_i, sign F_j>
};

}  // namespace linft
