#include "tensor/capture_retain.h"

namespace longtape {

namespace {
thread_local std::vector<Tensor>* t_sink = nullptr;
}

RetainDuringCapture::RetainDuringCapture(std::vector<Tensor>& sink) : previous_(t_sink) { t_sink = &sink; }
RetainDuringCapture::~RetainDuringCapture() { t_sink = previous_; }

void retain_during_capture(const Tensor& t) {
  if (t_sink && t.defined()) t_sink->push_back(t);
}

}  // namespace longtape
