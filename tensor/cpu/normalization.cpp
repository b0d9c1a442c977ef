// Softmax and LayerNorm rows: forward and backward.
#include <cmath>
#include <limits>
#include <vector>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"
#include "tensor/cpu/vector_math.h"

namespace longtape::cpu {


void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log) {
  dispatch_float(dtype, "softmax", [&]<typename T>() {
    const T* x = static_cast<const T*>(in);
    T* y = static_cast<T*>(out);
#pragma omp parallel for if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < cols; ++c) m = std::max(m, xr[c]);
      if (m == -std::numeric_limits<T>::infinity()) m = 0;  // all -inf row: avoid inf - inf
      // One exp per element, in a loop of its own (it vectorises; the double sum does not): the
      // exponentials go to y, then softmax scales them in place and log_softmax overwrites them.
      for (int64_t c = 0; c < cols; ++c) yr[c] = exp_of(xr[c] - m);
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) s += yr[c];
      if (log) {
        T lse = m + static_cast<T>(std::log(s));
        for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] - lse;
      } else {
        T inv = static_cast<T>(1.0 / s);
        for (int64_t c = 0; c < cols; ++c) yr[c] *= inv;
      }
    }
  });
}

void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols,
                      bool log) {
  dispatch_float(dtype, "softmax_backward", [&]<typename T>() {
    const T* yp = static_cast<const T*>(y);
    const T* gp = static_cast<const T*>(dy);
    T* out = static_cast<T*>(dx);
#pragma omp parallel for if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      const T* yr = yp + r * cols;
      const T* gr = gp + r * cols;
      T* o = out + r * cols;
      double s = 0;
      if (log) {
        for (int64_t c = 0; c < cols; ++c) s += gr[c];
        for (int64_t c = 0; c < cols; ++c) o[c] = gr[c] - exp_of(yr[c]) * static_cast<T>(s);
      } else {
        for (int64_t c = 0; c < cols; ++c) s += static_cast<double>(gr[c]) * yr[c];
        for (int64_t c = 0; c < cols; ++c) o[c] = yr[c] * (gr[c] - static_cast<T>(s));
      }
    }
  });
}

namespace {

// Runs body.template operator()<T, Other>() with T the data type (f32, f64) and Other = T, or
// bfloat16 when `other` is bf16 and the data f32 (a bf16 result written, or a bf16 gradient read).
template <typename Body>
void dispatch_with_bf16_side(DType dtype, DType other, const char* op, const char* what, Body&& body) {
  if (other != dtype) {
    LT_CHECK(dtype == DType::f32 && other == DType::bf16, op, ": ", what, " must be the data's dtype ",
             dtype_name(dtype), " or bf16 with f32 data, got ", dtype_name(other));
    body.template operator()<float, bfloat16>();
    return;
  }
  dispatch_float(dtype, op, [&]<typename T>() { body.template operator()<T, T>(); });
}

}  // namespace

void layer_norm(void* y, DType out_dtype, void* mean, void* rstd, const void* x, const void* weight,
                const void* bias, DType dtype, int64_t rows, int64_t cols, double eps) {
  dispatch_with_bf16_side(dtype, out_dtype, "layer_norm", "the output", [&]<typename T, typename Y>() {
    const T* xp = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight);
    const T* b = static_cast<const T*>(bias);
    Y* yp = static_cast<Y*>(y);
    T* mp = static_cast<T*>(mean);
    T* rp = static_cast<T*>(rstd);
#pragma omp parallel for if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = xp + r * cols;
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) s += xr[c];
      double mu = s / cols, v = 0;
      for (int64_t c = 0; c < cols; ++c) v += (xr[c] - mu) * (xr[c] - mu);
      double rs = 1.0 / std::sqrt(v / cols + eps);
      mp[r] = static_cast<T>(mu);
      rp[r] = static_cast<T>(rs);
      for (int64_t c = 0; c < cols; ++c) {
        T h = static_cast<T>((xr[c] - mu) * rs);
        yp[r * cols + c] = static_cast<Y>((w ? h * w[c] : h) + (b ? b[c] : T(0)));
      }
    }
  });
}

void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, DType dy_dtype,
                         const void* dx_addend, const void* x, const void* mean, const void* rstd,
                         const void* weight, DType dtype, int64_t rows, int64_t cols) {
  dispatch_with_bf16_side(dtype, dy_dtype, "layer_norm_backward", "the gradient dy", [&]<typename T, typename G>() {
    const G* g = static_cast<const G*>(dy);
    const T* addend = static_cast<const T*>(dx_addend);
    const T* xp = static_cast<const T*>(x);
    const T* mp = static_cast<const T*>(mean);
    const T* rp = static_cast<const T*>(rstd);
    const T* w = static_cast<const T*>(weight);
    T* out = static_cast<T*>(dx);
    // The gradient read as T (a bf16 gradient is widened to f32 as it is read).
    auto grad = [](const G* row, int64_t c) { return static_cast<T>(row[c]); };
    if (out) {
#pragma omp parallel for if (rows * cols > (1 << 16))
      for (int64_t r = 0; r < rows; ++r) {
        const G* gr = g + r * cols;
        const T* xr = xp + r * cols;
        double sum_g = 0, sum_gh = 0;
        for (int64_t c = 0; c < cols; ++c) {
          double gh = w ? grad(gr, c) * w[c] : grad(gr, c);
          double h = (xr[c] - mp[r]) * rp[r];
          sum_g += gh;
          sum_gh += gh * h;
        }
        for (int64_t c = 0; c < cols; ++c) {
          double gh = w ? grad(gr, c) * w[c] : grad(gr, c);
          double h = (xr[c] - mp[r]) * rp[r];
          double d = rp[r] * (gh - sum_g / cols - h * sum_gh / cols);
          if (addend) d += addend[r * cols + c];
          out[r * cols + c] = static_cast<T>(d);
        }
      }
    }
    // Parameter gradients: column sums in row order (fixed order, reproducible), one pass over
    // the rows with a running sum per column (contiguous loads).
    if (dweight || dbias) {
      T* dw = static_cast<T*>(dweight);
      T* db = static_cast<T*>(dbias);
      std::vector<double> sw(static_cast<size_t>(cols), 0.0), sb(static_cast<size_t>(cols), 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const G* gr = g + r * cols;
        const T* xr = xp + r * cols;
        const T m = mp[r], rs = rp[r];
        for (int64_t c = 0; c < cols; ++c) {
          const double gv = grad(gr, c);
          sw[c] += gv * (xr[c] - m) * rs;
          sb[c] += gv;
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        if (dw) dw[c] = static_cast<T>(sw[c]);
        if (db) db[c] = static_cast<T>(sb[c]);
      }
    }
  });
}

}  // namespace longtape::cpu
