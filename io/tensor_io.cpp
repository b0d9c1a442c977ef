#include "io/tensor_io.h"

#include <cstring>

#include "io/npy.h"
#include "tensor/error.h"

namespace longtape::io {

Tensor tensor_from_raw(const RawArray& raw) {
  check_raw_array(raw, "tensor_from_raw");
  Tensor t = Tensor::empty(raw.shape, raw.dtype, Device::cpu());
  if (!raw.bytes.empty()) std::memcpy(t.raw_data(), raw.bytes.data(), raw.bytes.size());
  return t;
}

RawArray raw_from_tensor(const Tensor& t) {
  LT_CHECK(t.defined(), "raw_from_tensor: got an undefined tensor");
  RawArray raw;
  raw.dtype = t.dtype();
  raw.shape = t.shape();
  Tensor host = t.detach().contiguous().cpu();
  raw.bytes.resize(host.nbytes());
  if (!raw.bytes.empty()) std::memcpy(raw.bytes.data(), host.raw_data(), raw.bytes.size());
  return raw;
}

Tensor load_npy(const std::string& path) { return tensor_from_raw(read_npy(path)); }

void save_npy(const std::string& path, const Tensor& t) {
  LT_CHECK(t.defined(), "save_npy: cannot write an undefined tensor to ", path);
  LT_CHECK(t.dtype() != DType::bf16, "save_npy: .npy has no bfloat16 dtype; cast the tensor to f32 before writing ",
           path);
  write_npy(path, raw_from_tensor(t));
}

}  // namespace longtape::io
