#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"
#include "tensor/philox.h"

namespace longtape::cpu {

// Random values are generated in row-major element order of `out`, so a strided output gets the
// same values as a contiguous one.
void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high) {
  dispatch_float(is_half_precision(out.dtype) ? DType::f32 : out.dtype, "uniform", [&]<typename T>() {
    int64_t i = 0;
    const View* views[1] = {&out};
    for_each_offset<1>(views, [&](int64_t o) {
      double v = low + (high - low) * philox::uniform_at(seed, offset, i++);
      if (out.dtype == DType::bf16) static_cast<bfloat16*>(out.data)[o] = bfloat16(static_cast<float>(v));
      else if (out.dtype == DType::f16) static_cast<float16*>(out.data)[o] = float16(static_cast<float>(v));
      else static_cast<T*>(out.data)[o] = static_cast<T>(v);
    });
  });
}

void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std) {
  dispatch_float(is_half_precision(out.dtype) ? DType::f32 : out.dtype, "normal", [&]<typename T>() {
    int64_t i = 0;
    const View* views[1] = {&out};
    for_each_offset<1>(views, [&](int64_t o) {
      double v = mean + std * philox::normal_at(seed, offset, i++);
      if (out.dtype == DType::bf16) static_cast<bfloat16*>(out.data)[o] = bfloat16(static_cast<float>(v));
      else if (out.dtype == DType::f16) static_cast<float16*>(out.data)[o] = float16(static_cast<float>(v));
      else static_cast<T*>(out.data)[o] = static_cast<T>(v);
    });
  });
}

}  // namespace longtape::cpu
