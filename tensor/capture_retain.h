#pragma once
// Tensors a captured CUDA graph reads but the captured code does not own: device copies that an op
// or a model keeps in a cache of its own (block lists, position indices) and may replace later. A
// graph replays raw pointers, so such a tensor must live as long as the graph: the code that
// captures (nn::Trainer with cuda_graph) opens a RetainDuringCapture scope, and caches hand their
// tensors to retain_during_capture(), which keeps them in the scope's list (a no-op outside one).
#include <vector>

#include "tensor/tensor.h"

namespace longtape {

class RetainDuringCapture {
 public:
  explicit RetainDuringCapture(std::vector<Tensor>& sink);
  ~RetainDuringCapture();
  RetainDuringCapture(const RetainDuringCapture&) = delete;
  RetainDuringCapture& operator=(const RetainDuringCapture&) = delete;

 private:
  std::vector<Tensor>* previous_;
};

// Keeps `t` alive as long as the innermost RetainDuringCapture scope's list on this thread.
void retain_during_capture(const Tensor& t);

}  // namespace longtape
