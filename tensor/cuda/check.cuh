#pragma once
// Error checking for CUDA, cuBLAS and cuRAND calls: throws longtape::Error with the library's text.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "tensor/error.h"

#define CUDA_CHECK(expr)                                                                     \
  do {                                                                                       \
    cudaError_t lt_err_ = (expr);                                                            \
    if (lt_err_ != cudaSuccess)                                                              \
      throw ::longtape::Error(::longtape::detail::concat("CUDA error in ", #expr, ": ",      \
                                                         cudaGetErrorString(lt_err_), " (",  \
                                                         __FILE__, ":", __LINE__, ")"));     \
  } while (0)

#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                       \
    cublasStatus_t lt_st_ = (expr);                                                          \
    if (lt_st_ != CUBLAS_STATUS_SUCCESS)                                                     \
      throw ::longtape::Error(::longtape::detail::concat("cuBLAS error in ", #expr, ": ",    \
                                                         cublasGetStatusString(lt_st_)));    \
  } while (0)
