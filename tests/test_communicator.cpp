// The in-process communicator: every collective against values computed on one thread, the
// differentiable collectives against a single-process autograd reference, failure propagation
// (a throwing rank, a silent rank, a rank that returned early) and data-parallel gradient averaging.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "nn/dist/communicator.h"
#include "nn/dist/data_parallel.h"
#include "nn/dist/functional.h"
#include "nn/layers.h"
#include "tensor/ops.h"

using namespace longtape;
using dist::Communicator;

namespace {

double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  auto x = a.to_vector(), y = b.to_vector();
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

dist::CommOptions short_timeout(int ms = 2000) {
  dist::CommOptions o;
  o.timeout = std::chrono::milliseconds(ms);
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Errors a rank saw, collected on the rank's thread and checked on the main thread.
struct RankErrors {
  std::mutex mutex;
  std::vector<std::string> messages;
  void add(const std::string& m) {
    std::lock_guard<std::mutex> lock(mutex);
    messages.push_back(m);
  }
};

}  // namespace

TEST_CASE("send and recv pass tensors around a ring, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(100 + p);
    std::vector<Tensor> inputs;
    for (int r = 0; r < p; ++r) inputs.push_back(Tensor::randn({2, 3 + r}, DType::f64));
    std::vector<Tensor> got(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const int r = comm.rank();
      CHECK(comm.size() == p);
      comm.send(inputs[static_cast<size_t>(r)], (r + 1) % p, 3);
      const int prev = (r - 1 + p) % p;
      got[static_cast<size_t>(r)] = comm.recv_like(inputs[static_cast<size_t>(prev)], prev, 3);
    }, short_timeout());
    for (int r = 0; r < p; ++r) {
      const Tensor& sent = inputs[static_cast<size_t>((r - 1 + p) % p)];
      CHECK(max_abs_diff(got[static_cast<size_t>(r)], sent) == 0.0);
      CHECK(got[static_cast<size_t>(r)].storage() != sent.storage());  // a copy, never shared
    }
  }
}

TEST_CASE("all_gather, all_to_all, all_reduce, broadcast equal their definitions, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(200 + p);
    std::vector<Tensor> mine;
    for (int r = 0; r < p; ++r) mine.push_back(Tensor::randn({3, 2}, DType::f64));
    // pairs[s][d]: what rank s sends rank d (shapes differ per pair).
    std::vector<std::vector<Tensor>> pairs(static_cast<size_t>(p));
    for (int s = 0; s < p; ++s)
      for (int d = 0; d < p; ++d) pairs[static_cast<size_t>(s)].push_back(Tensor::randn({s + 1, d + 2}, DType::f64));
    std::vector<Tensor> split_in;
    for (int r = 0; r < p; ++r) split_in.push_back(Tensor::randn({2 * p, 3}, DType::f64));

    struct Result {
      std::vector<Tensor> gathered, exchanged;
      Tensor split_exchanged, sum, mean, broadcast;
    };
    std::vector<Result> results(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      Result& out = results[r];
      out.gathered = comm.all_gather(mine[r]);
      out.exchanged = comm.all_to_all(pairs[r]);
      out.split_exchanged = comm.all_to_all(split_in[r], 0, 1);
      out.sum = comm.all_reduce(mine[r], dist::ReduceOp::sum);
      out.mean = comm.all_reduce(mine[r], dist::ReduceOp::mean);
      out.broadcast = comm.broadcast(mine[r], p - 1);
      comm.barrier();
    }, short_timeout());

    Tensor expected_sum = Tensor::zeros({3, 2}, DType::f64);
    for (const Tensor& t : mine) expected_sum = add(expected_sum, t);
    for (int r = 0; r < p; ++r) {
      const Result& out = results[static_cast<size_t>(r)];
      REQUIRE(out.gathered.size() == static_cast<size_t>(p));
      for (int s = 0; s < p; ++s) {
        CHECK(max_abs_diff(out.gathered[static_cast<size_t>(s)], mine[static_cast<size_t>(s)]) == 0.0);
        CHECK(max_abs_diff(out.exchanged[static_cast<size_t>(s)], pairs[static_cast<size_t>(s)][static_cast<size_t>(r)]) ==
              0.0);
        // Rank s's rows [2r, 2r + 2) arrive as columns [3s, 3s + 3).
        CHECK(max_abs_diff(out.split_exchanged.narrow(1, 3 * s, 3),
                           split_in[static_cast<size_t>(s)].narrow(0, 2 * r, 2)) == 0.0);
      }
      CHECK(max_abs_diff(out.sum, expected_sum) < 1e-14);
      CHECK(max_abs_diff(out.mean, mul(expected_sum, 1.0 / p)) < 1e-14);
      CHECK(max_abs_diff(out.broadcast, mine[static_cast<size_t>(p - 1)]) == 0.0);
      // Every rank holds bitwise the same reduction.
      CHECK(max_abs_diff(out.sum, results[0].sum) == 0.0);
    }
  }
}

TEST_CASE("start_all_to_all: several under way at once, beside blocking collectives, land in place, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(700 + p);
    // first[s][d] (s + 1, 2) and second[s][d] (3, d + 1): what rank s sends rank d in each exchange.
    std::vector<std::vector<Tensor>> first(static_cast<size_t>(p)), second(static_cast<size_t>(p));
    for (int s = 0; s < p; ++s)
      for (int d = 0; d < p; ++d) {
        first[static_cast<size_t>(s)].push_back(Tensor::randn({s + 1, 2}, DType::f64));
        second[static_cast<size_t>(s)].push_back(Tensor::randn({3, d + 1}, DType::f32));
      }
    std::vector<Tensor> rows(static_cast<size_t>(p)), cols(static_cast<size_t>(p)), sums(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const int r = comm.rank();
      // Rank s's piece of the first lands in rows [s(s+1)/2, ...) of one buffer; of the second, in
      // columns [s(r+1), ...) of another, transposed (a strided target).
      Tensor row_buffer = Tensor::zeros({p * (p + 1) / 2, 2}, DType::f64);
      Tensor col_buffer = Tensor::zeros({r + 1, 3 * p}, DType::f32);
      std::vector<Tensor> row_slots, col_slots;
      for (int s = 0; s < p; ++s) {
        row_slots.push_back(row_buffer.narrow(0, s * (s + 1) / 2, s + 1));
        col_slots.push_back(col_buffer.narrow(1, 3 * s, 3).permute({1, 0}));
      }
      auto a = comm.start_all_to_all(first[static_cast<size_t>(r)], row_slots);
      auto b = comm.start_all_to_all(second[static_cast<size_t>(r)], col_slots);
      sums[static_cast<size_t>(r)] = comm.all_reduce(Tensor::ones({2}, DType::f64));  // a collective in between
      b->wait();
      a->wait();
      a->wait();  // a second wait changes nothing
      rows[static_cast<size_t>(r)] = row_buffer;
      cols[static_cast<size_t>(r)] = col_buffer;
    }, short_timeout());
    for (int r = 0; r < p; ++r) {
      CHECK(max_abs_diff(sums[static_cast<size_t>(r)], Tensor::full({2}, p, DType::f64)) == 0.0);
      for (int s = 0; s < p; ++s) {
        CHECK(max_abs_diff(rows[static_cast<size_t>(r)].narrow(0, s * (s + 1) / 2, s + 1),
                           first[static_cast<size_t>(s)][static_cast<size_t>(r)]) == 0.0);
        CHECK(max_abs_diff(cols[static_cast<size_t>(r)].narrow(1, 3 * s, 3).permute({1, 0}),
                           second[static_cast<size_t>(s)][static_cast<size_t>(r)]) == 0.0);
      }
    }
  }
  // A target of the wrong shape, or the wrong number of targets: clear errors.
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    comm.start_all_to_all({Tensor::randn({2, 3}), Tensor::randn({2, 3})}, {Tensor::zeros({2, 3}), Tensor::zeros({3, 2})})
        ->wait();
  }, short_timeout()), doctest::Contains("expected [3, 2] f32 on cpu from rank 1, got [2, 3] f32 on cpu"), Error);
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    comm.start_all_to_all({Tensor::randn({1}), Tensor::randn({1})}, {Tensor::zeros({1})});
  }, short_timeout()), doctest::Contains("one to receive into per rank (2)"), Error);
}

TEST_CASE("barrier: no rank passes it before every rank has reached it") {
  const int p = 4;
  std::atomic<int> arrived{0};
  std::vector<int> seen(p, -1);
  dist::run_ranks(p, [&](Communicator& comm) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20 * comm.rank()));
    arrived.fetch_add(1);
    comm.barrier();
    seen[static_cast<size_t>(comm.rank())] = arrived.load();
  }, short_timeout());
  for (int s : seen) CHECK(s == p);
}

TEST_CASE("bad calls raise clear errors on every rank") {
  // recv of the wrong shape
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    if (comm.rank() == 0) comm.send(Tensor::randn({2, 3}), 1);
    else comm.recv({3, 2}, DType::f32, Device::cpu(), 0);
  }, short_timeout()), doctest::Contains("expected [3, 2] f32 from rank 0"), Error);
  // different collectives at the same position
  RankErrors errors;
  CHECK_THROWS_WITH_AS(dist::run_ranks(3, [&](Communicator& comm) {
    try {
      if (comm.rank() == 1) comm.all_reduce(Tensor::randn({2}));
      else comm.all_gather(Tensor::randn({2}));
    } catch (const Error& e) {
      errors.add(e.what());
      throw;
    }
  }, short_timeout()), doctest::Contains("collective mismatch"), Error);
  CHECK(errors.messages.size() == 3);
  // all_gather needs one shape on every rank
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    comm.all_gather(Tensor::randn({comm.rank() + 1}));
  }, short_timeout()), doctest::Contains("same shape"), Error);
  // peers out of range, wrong number of all_to_all pieces, bad rank counts
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) { comm.send(Tensor::randn({1}), 2); }),
                       doctest::Contains("destination rank must be in [0, 2)"), Error);
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) { comm.all_to_all({Tensor::randn({1})}); }),
                       doctest::Contains("one tensor per rank"), Error);
  CHECK_THROWS_WITH_AS(dist::run_ranks(0, [](Communicator&) {}), doctest::Contains("at least 1 rank"), Error);
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) { comm.all_to_all(Tensor::randn({3, 2}), 0, 1); }),
                       doctest::Contains("divide evenly"), Error);
}

TEST_CASE("split forms sub-groups by color, ranked by key, as on a 2-D grid of ranks") {
  const int p = 6;  // a 3 x 2 grid: rows by rank / 2, columns by rank % 2
  manual_seed(700);
  std::vector<Tensor> xs;
  for (int r = 0; r < p; ++r) xs.push_back(Tensor::randn({3}, DType::f64));
  struct Seen {
    int row_rank = -1, row_size = 0, col_rank = -1, col_size = 0;
    Tensor row_sum, col_gathered;
  };
  std::vector<Seen> seen(p);
  dist::run_ranks(p, [&](Communicator& comm) {
    const int r = comm.rank();
    Seen& me = seen[static_cast<size_t>(r)];
    auto row = comm.split(r / 2, r % 2);
    auto col = comm.split(r % 2, -r);  // reversed order inside a column
    me.row_rank = row->rank();
    me.row_size = row->size();
    me.col_rank = col->rank();
    me.col_size = col->size();
    me.row_sum = row->all_reduce(xs[static_cast<size_t>(r)]);
    me.col_gathered = cat(col->all_gather(xs[static_cast<size_t>(r)]), 0);
    comm.barrier();  // the parent group still works alongside its sub-groups
  }, short_timeout());
  for (int r = 0; r < p; ++r) {
    const Seen& me = seen[static_cast<size_t>(r)];
    CHECK(me.row_size == 2);
    CHECK(me.row_rank == r % 2);
    CHECK(me.col_size == 3);
    CHECK(me.col_rank == 2 - r / 2);
    const int partner = r ^ 1;
    CHECK(max_abs_diff(me.row_sum, add(xs[static_cast<size_t>(r - r % 2)], xs[static_cast<size_t>(r - r % 2 + 1)])) <
          1e-15);
    CHECK(max_abs_diff(me.row_sum, seen[static_cast<size_t>(partner)].row_sum) == 0.0);
    // Column members in rank order of the column: global ranks 4 + c, 2 + c, c.
    const int c = r % 2;
    CHECK(max_abs_diff(me.col_gathered, cat({xs[static_cast<size_t>(4 + c)], xs[static_cast<size_t>(2 + c)],
                                             xs[static_cast<size_t>(c)]}, 0)) == 0.0);
  }
  // A failure anywhere reaches ranks waiting in a sub-group, and messages name the sub-group.
  RankErrors errors;
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::run_ranks(4, [&](Communicator& comm) {
    auto half = comm.split(comm.rank() % 2, comm.rank());
    try {
      if (comm.rank() == 3) {
        // Late enough that rank 1 waits in the sub-group (a rank failing while others are still
        // in split would abort them there, as it should, but this checks the sub-group's message).
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        throw Error("row failure");
      }
      half->all_reduce(Tensor::randn({2}));
    } catch (const Error& e) {
      errors.add(e.what());
      throw;
    }
  }, short_timeout(3000)), doctest::Contains("rank 3 of 4 failed: row failure"), Error);
  CHECK(seconds_since(start) < 2.5);  // well before the timeout
  bool named = false;
  for (const std::string& m : errors.messages)
    named = named || m.find("of sub-group [1, 3] (global rank 1)") != std::string::npos;
  CHECK(named);
}

TEST_CASE("a rank that throws makes every rank throw, quickly") {
  for (int p = 2; p <= 4; ++p) {
    RankErrors errors;
    const auto start = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH_AS(dist::run_ranks(p, [&](Communicator& comm) {
      try {
        if (comm.rank() == 1) throw Error("boom on purpose");
        Tensor x = Tensor::randn({4});
        for (int i = 0; i < 3; ++i) x = comm.all_reduce(x);  // waits for rank 1, which never comes
      } catch (const Error& e) {
        errors.add(e.what());
        throw;
      }
    }, short_timeout()), doctest::Contains(("rank 1 of " + std::to_string(p) + " failed: boom on purpose").c_str()), Error);
    CHECK(seconds_since(start) < 5.0);
    REQUIRE(errors.messages.size() == static_cast<size_t>(p));  // every rank threw
    int aborted = 0;
    for (const std::string& m : errors.messages)
      if (m.find("aborted because rank 1 failed: boom on purpose") != std::string::npos) ++aborted;
    CHECK(aborted == p - 1);
  }
}

TEST_CASE("a rank that never calls the collective: the others time out, nothing hangs") {
  RankErrors errors;
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::run_ranks(3, [&](Communicator& comm) {
    if (comm.rank() == 2) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2000));  // alive, but silent
      return;
    }
    try {
      comm.all_gather(Tensor::randn({2}));
    } catch (const Error& e) {
      errors.add(e.what());
      throw;
    }
  }, short_timeout(800)), doctest::Contains("timed out after 0.8 s waiting for all_gather (collective #0) from rank 2"),
                       Error);
  CHECK(seconds_since(start) < 5.0);
  CHECK(errors.messages.size() == 2);
}

TEST_CASE("a rank that returned without sending fails its peers at once, without waiting for the timeout") {
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    if (comm.rank() == 0) comm.recv({2}, DType::f32, Device::cpu(), 1);
  }, short_timeout(10000)), doctest::Contains("has already returned from its body without sending it"), Error);
  CHECK(seconds_since(start) < 5.0);
}

TEST_CASE("all_to_all is differentiable: gradients equal a single-process reference, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(300 + p);
    std::vector<Tensor> xs, ws;
    for (int r = 0; r < p; ++r) {
      xs.push_back(Tensor::randn({2 * p, 3}, DType::f64));
      ws.push_back(Tensor::randn({2, 3 * p}, DType::f64));
    }
    // Reference on one thread: y_r = cat over s of rows [2r, 2r + 2) of x_s along dim 1.
    std::vector<Tensor> leaves;
    for (const Tensor& x : xs) leaves.push_back(x.detach().clone().requires_grad_());
    Tensor total = Tensor::zeros({}, DType::f64);
    for (int r = 0; r < p; ++r) {
      std::vector<Tensor> pieces;
      for (int s = 0; s < p; ++s) pieces.push_back(leaves[static_cast<size_t>(s)].narrow(0, 2 * r, 2));
      total = add(total, sum(mul(cat(pieces, 1), ws[static_cast<size_t>(r)])));
    }
    total.backward();

    std::vector<Tensor> grads(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      Tensor x = xs[r].detach().clone().requires_grad_();
      Tensor y = dist::all_to_all(comm, x, 0, 1);
      sum(mul(y, ws[r])).backward();  // this rank's part of the loss
      grads[r] = x.grad();
    }, short_timeout());
    for (int r = 0; r < p; ++r)
      CHECK(max_abs_diff(grads[static_cast<size_t>(r)], leaves[static_cast<size_t>(r)].grad()) < 1e-14);
  }
}

TEST_CASE("all_gather and all_reduce are differentiable: reduce-scatter backward, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(400 + p);
    std::vector<Tensor> xs, wg, wr;
    for (int r = 0; r < p; ++r) {
      xs.push_back(Tensor::randn({3, 2}, DType::f64));
      wg.push_back(Tensor::randn({3 * p, 2}, DType::f64));
      wr.push_back(Tensor::randn({3, 2}, DType::f64));
    }
    std::vector<Tensor> leaves;
    for (const Tensor& x : xs) leaves.push_back(x.detach().clone().requires_grad_());
    Tensor gathered = cat(leaves, 0), mean_x = Tensor::zeros({3, 2}, DType::f64);
    for (const Tensor& l : leaves) mean_x = add(mean_x, mul(l, 1.0 / p));
    Tensor total = Tensor::zeros({}, DType::f64);
    for (int r = 0; r < p; ++r)
      total = add(total, add(sum(mul(gathered, wg[static_cast<size_t>(r)])),
                             sum(mul(tanh(mean_x), wr[static_cast<size_t>(r)]))));
    total.backward();

    std::vector<Tensor> grads(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      Tensor x = xs[r].detach().clone().requires_grad_();
      Tensor all = dist::all_gather(comm, x, 0);
      Tensor m = dist::all_reduce(comm, x, dist::ReduceOp::mean);
      add(sum(mul(all, wg[r])), sum(mul(tanh(m), wr[r]))).backward();
      grads[r] = x.grad();
    }, short_timeout());
    for (int r = 0; r < p; ++r)
      CHECK(max_abs_diff(grads[static_cast<size_t>(r)], leaves[static_cast<size_t>(r)].grad()) < 1e-13);
  }
}

TEST_CASE("a backward that skips a collective on one rank fails the others instead of hanging") {
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    Tensor x = Tensor::randn({4}, DType::f64).requires_grad_();
    Tensor y = dist::all_gather(comm, x, 0);
    if (comm.rank() == 0) sum(y).backward();  // rank 1 never runs the reverse collective
  }, short_timeout(500)), doctest::Contains("rank 1"), Error);
  CHECK(seconds_since(start) < 5.0);
}

TEST_CASE("a graph kept past run_ranks cannot communicate: its backward throws") {
  Tensor kept;
  Tensor x = Tensor::randn({3}, DType::f64).requires_grad_();
  dist::run_ranks(1, [&](Communicator& comm) { kept = dist::all_reduce(comm, x); }, short_timeout());
  CHECK_THROWS_WITH_AS(sum(kept).backward(), doctest::Contains("after run_ranks returned"), Error);
}

TEST_CASE("data parallel: averaged shard gradients equal the full-batch gradients, P = 1..4") {
  for (int p = 1; p <= 4; ++p) {
    manual_seed(500 + p);
    nn::Linear reference_first(5, 4), reference_second(4, 2);
    reference_first.to(DType::f64);
    reference_second.to(DType::f64);
    const int64_t per_rank = 3;
    Tensor x = Tensor::randn({per_rank * p, 5}, DType::f64), y = Tensor::randn({per_rank * p, 2}, DType::f64);
    auto loss_of = [](nn::Linear& a, nn::Linear& b, const Tensor& in, const Tensor& target) {
      Tensor d = sub(b.forward(tanh(a.forward(in))), target);
      return mean(mul(d, d));
    };
    loss_of(reference_first, reference_second, x, y).backward();

    const auto first_state = reference_first.state_dict(), second_state = reference_second.state_dict();
    std::vector<std::vector<Tensor>> grads(static_cast<size_t>(p));
    dist::run_ranks(p, [&](Communicator& comm) {
      const int r = comm.rank();
      nn::Linear a(5, 4), b(4, 2);
      a.to(DType::f64);
      b.to(DType::f64);
      if (r == 0) {  // rank 0 has the reference weights; the others get them by broadcast
        a.load_state_dict(first_state);
        b.load_state_dict(second_state);
      }
      dist::broadcast_parameters(comm, a);
      dist::broadcast_parameters(comm, b);
      loss_of(a, b, x.narrow(0, per_rank * r, per_rank), y.narrow(0, per_rank * r, per_rank)).backward();
      dist::average_gradients(comm, a);
      dist::average_gradients(comm, b);
      for (const Tensor& t : a.parameters()) grads[static_cast<size_t>(r)].push_back(t.grad());
      for (const Tensor& t : b.parameters()) grads[static_cast<size_t>(r)].push_back(t.grad());
    }, short_timeout());

    std::vector<Tensor> expected;
    for (const Tensor& t : reference_first.parameters()) expected.push_back(t.grad());
    for (const Tensor& t : reference_second.parameters()) expected.push_back(t.grad());
    for (int r = 0; r < p; ++r) {
      REQUIRE(grads[static_cast<size_t>(r)].size() == expected.size());
      for (size_t i = 0; i < expected.size(); ++i)
        CHECK(max_abs_diff(grads[static_cast<size_t>(r)][i], expected[i]) < 1e-13);
    }
  }
}

TEST_CASE("data parallel: a parameter with a gradient on some ranks only is averaged with zeros; models must match") {
  std::vector<Tensor> grads(2);
  dist::run_ranks(2, [&](Communicator& comm) {
    nn::Linear a(3, 2);
    a.to(DType::f64);
    if (comm.rank() == 1) a.weight.set_grad(Tensor::full({2, 3}, 4.0, DType::f64));
    dist::average_gradients(comm, a);
    grads[static_cast<size_t>(comm.rank())] = a.weight.grad();
    CHECK_FALSE(a.bias.grad().defined());  // no rank had one
  }, short_timeout());
  for (const Tensor& g : grads)
    for (double v : g.to_vector()) CHECK(v == 2.0);
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [](Communicator& comm) {
    nn::Linear a(3, comm.rank() + 1);
    dist::average_gradients(comm, a);
  }, short_timeout()), doctest::Contains("different parameter shapes"), Error);
}

TEST_CASE("CUDA tensors travel between ranks sharing one GPU (CPU/CUDA parity)") {
  if (!cuda_available()) {
    MESSAGE("skipped: no CUDA device available (or built without CUDA)");
    return;
  }
  const int p = 3;
  manual_seed(600);
  std::vector<Tensor> xs;
  for (int r = 0; r < p; ++r) xs.push_back(Tensor::randn({64, 33}));
  std::vector<Tensor> sums(p), gathered(p), grads(p), started(p);
  dist::run_ranks(p, [&](Communicator& comm) {
    const size_t r = static_cast<size_t>(comm.rank());
    Tensor x = xs[r].to(Device::cuda()).requires_grad_();
    sums[r] = comm.all_reduce(x).cpu();
    // start_all_to_all into strided CUDA views: rank s's columns [11 r, 11 r + 11) land in rows [11 s, ...).
    Tensor into = Tensor::zeros({33, 64}, DType::f32, Device::cuda());
    std::vector<Tensor> to_each, slots;
    for (int d = 0; d < p; ++d) {
      to_each.push_back(x.detach().narrow(1, 11 * d, 11));
      slots.push_back(into.narrow(0, 11 * d, 11).permute({1, 0}));
    }
    comm.start_all_to_all(to_each, slots)->wait();
    started[r] = into.cpu();
    Tensor y = dist::all_to_all(comm, x, 1, 0, {11, 11, 11});
    gathered[r] = y.detach().cpu();
    sum(mul(y, y)).backward();
    grads[r] = x.grad().cpu();
  }, short_timeout(20000));
  Tensor expected = add(add(xs[0], xs[1]), xs[2]);
  for (int r = 0; r < p; ++r) {
    CHECK(max_abs_diff(sums[static_cast<size_t>(r)], expected) < 1e-5);
    for (int s = 0; s < p; ++s)
      CHECK(max_abs_diff(gathered[static_cast<size_t>(r)].narrow(0, 64 * s, 64),
                         xs[static_cast<size_t>(s)].narrow(1, 11 * r, 11)) == 0.0);
    CHECK(max_abs_diff(grads[static_cast<size_t>(r)], mul(xs[static_cast<size_t>(r)], 2.0)) < 1e-5);
    for (int s = 0; s < p; ++s)
      CHECK(max_abs_diff(started[static_cast<size_t>(r)].narrow(0, 11 * s, 11).permute({1, 0}),
                         xs[static_cast<size_t>(s)].narrow(1, 11 * r, 11)) == 0.0);
  }
}

TEST_CASE("every rank draws from a random stream of its own: reproducible whatever the thread interleaving") {
  constexpr int p = 4, draws = 200;
  // Each rank draws many small tensors, yielding between draws so the threads interleave
  // differently from run to run; with one shared generator the values a rank got depended on that.
  auto run = [&](uint64_t seed) {
    std::vector<std::vector<double>> got(p);
    manual_seed(seed);
    dist::run_ranks(p, [&](Communicator& comm) {
      std::vector<double>& mine = got[static_cast<size_t>(comm.rank())];
      for (int i = 0; i < draws; ++i) {
        for (double x : Tensor::randn({3}, DType::f64).to_vector()) mine.push_back(x);
        if ((i + comm.rank()) % 3 == 0) std::this_thread::yield();
      }
      // Dropout draws from the same stream.
      Tensor kept = dropout(Tensor::ones({64}, DType::f64), 0.5, true);
      for (double x : kept.to_vector()) mine.push_back(x);
    });
    return got;
  };
  const auto first = run(2024), second = run(2024), third = run(2024);
  for (int r = 0; r < p; ++r) {
    INFO("rank " << r);
    CHECK(first[static_cast<size_t>(r)] == second[static_cast<size_t>(r)]);
    CHECK(first[static_cast<size_t>(r)] == third[static_cast<size_t>(r)]);
    for (int s = 0; s < r; ++s) CHECK(first[static_cast<size_t>(r)] != first[static_cast<size_t>(s)]);
  }
  // Another seed gives other streams; so does the next run_ranks without reseeding.
  CHECK(run(2025)[0] != first[0]);
  manual_seed(2024);
  std::vector<double> again, next;
  dist::run_ranks(1, [&](Communicator&) { again = Tensor::randn({3}, DType::f64).to_vector(); });
  dist::run_ranks(1, [&](Communicator&) { next = Tensor::randn({3}, DType::f64).to_vector(); });
  CHECK(again != next);
}

TEST_CASE("manual_seed inside a rank reseeds that rank's stream only, like a process of its own") {
  manual_seed(42);
  const std::vector<double> want = Tensor::randn({5}, DType::f64).to_vector();
  manual_seed(9);
  std::vector<std::vector<double>> got(3);
  dist::run_ranks(3, [&](Communicator& comm) {
    manual_seed(42);
    got[static_cast<size_t>(comm.rank())] = Tensor::randn({5}, DType::f64).to_vector();
  });
  for (const auto& g : got) CHECK(g == want);
  // The caller's generator moved on by the one block run_ranks reserves, not by the ranks' draws.
  const std::vector<double> after = Tensor::randn({5}, DType::f64).to_vector();
  manual_seed(9);
  next_philox(1);
  CHECK(after == Tensor::randn({5}, DType::f64).to_vector());
}
