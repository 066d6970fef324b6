// CUDA's data type tags (library_types.h of the toolkit), as the emulated runtime and the
// reference cuBLASLt use them: the values are CUDA's.
#pragma once

enum cudaDataType_t {
  CUDA_R_32F = 0,
  CUDA_R_16BF = 14,
};
