// PALMCORE_HD marks per-element math that the CPU and CUDA backends share: __host__ __device__
// under nvcc, nothing under a host compiler. The CPU tests then check the code a GPU runs.
#pragma once

#ifdef __CUDACC__
#define PALMCORE_HD __host__ __device__ __forceinline__
#else
#define PALMCORE_HD inline
#endif
