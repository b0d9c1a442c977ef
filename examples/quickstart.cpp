// The README's first example: tensors, autograd, backward.
#include <iostream>

#include "tensor/ops.h"

using namespace longtape;

int main() {
  manual_seed(0);
  Tensor w = Tensor::randn({3, 2}).requires_grad_();   // a leaf parameter
  Tensor x = Tensor::randn({4, 3});                    // data, no gradient
  Tensor y = tanh(matmul(x, w));                       // recorded on the tape
  Tensor loss = mean(mul(y, y));                       // a scalar
  loss.backward();                                     // walks the tape in reverse
  std::cout << "loss = " << loss.item() << "\n" << w.grad();
  {
    NoGradGuard no_grad;                               // plain SGD step, not recorded
    w.copy_(sub(w, mul(w.grad(), 0.1)));
  }
  std::cout << "after one step: " << mean(mul(tanh(matmul(x, w)), tanh(matmul(x, w)))).item() << "\n";
}
