#pragma once
// CPU implementations of tensor/kernels.h (same contracts, host memory).
#include "tensor/kernels.h"

namespace longtape::cpu {
using kernels::BinaryOp;
using kernels::GemmArgs;
using kernels::ReduceOp;
using kernels::UnaryOp;
using kernels::View;

void unary(UnaryOp op, const View& out, const View& in, double alpha);
void binary(BinaryOp op, const View& out, const View& a, const View& b);
void where(const View& out, const View& cond, const View& a, const View& b);
void copy(const View& dst, const View& src);
void fill(const View& dst, double value);
void reduce(ReduceOp op, const View& out, const View& in, int nreduce);
void gemm(const GemmArgs& args);
void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log);
void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols, bool log);
void layer_norm(void* y, void* mean, void* rstd, const void* x, const void* weight, const void* bias,
                DType dtype, int64_t rows, int64_t cols, double eps);
void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, const void* x,
                         const void* mean, const void* rstd, const void* weight, DType dtype,
                         int64_t rows, int64_t cols);
void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer,
                  int64_t in_dim, int64_t n, int64_t inner);
void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer,
               int64_t out_dim, int64_t n, int64_t inner);
void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
            int64_t n, int64_t inner);
void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer,
                 int64_t out_dim, int64_t n, int64_t inner);
void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high);
void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std);

}  // namespace longtape::cpu
