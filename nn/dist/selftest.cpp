#include "nn/dist/selftest.h"

#include <algorithm>
#include <cmath>

#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

// Rank r's input number `which`: standard normal values of its own stream, on the CPU.
Tensor input(uint64_t seed, int rank, int which, const Shape& shape, DType dtype = DType::f32) {
  ThreadGeneratorScope stream({derive_stream_seed(seed, static_cast<uint64_t>(which), static_cast<uint64_t>(rank)), 0});
  Tensor t = Tensor::randn(shape, DType::f64);
  if (dtype == DType::i64 || dtype == DType::i32) t = mul(t, 1000.0);
  return t.to(dtype);
}

void expect_exact(const Tensor& got, const Tensor& want, const std::string& what, int rank) {
  LT_CHECK(got.shape() == want.shape() && got.dtype() == want.dtype(), "dist-check: ", what, " on rank ", rank,
           ": expected ", shape_str(want.shape()), " ", dtype_name(want.dtype()), ", got ", shape_str(got.shape()), " ",
           dtype_name(got.dtype()));
  const std::vector<double> g = got.to(Device::cpu()).to_vector(), w = want.to_vector();
  for (size_t i = 0; i < g.size(); ++i)
    LT_CHECK(g[i] == w[i] || (std::isnan(g[i]) && std::isnan(w[i])), "dist-check: ", what, " on rank ", rank,
             ": element ", i, " is ", g[i], ", expected exactly ", w[i]);
}

void expect_close(const Tensor& got, const Tensor& want_f64, double tolerance, const std::string& what, int rank) {
  LT_CHECK(got.shape() == want_f64.shape(), "dist-check: ", what, " on rank ", rank, ": expected shape ",
           shape_str(want_f64.shape()), ", got ", shape_str(got.shape()));
  const std::vector<double> g = got.to(Device::cpu()).to_vector(), w = want_f64.to_vector();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double d = std::abs(g[i] - w[i]) / (1.0 + std::abs(w[i]));
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  LT_CHECK(worst <= tolerance, "dist-check: ", what, " on rank ", rank, ": element ", at, " is ", g[at],
           ", the float64 reference ", w[at], " (relative difference ", worst, " > ", tolerance, ")");
}

Tensor sum_f64(uint64_t seed, const std::vector<int>& ranks, int which, const Shape& shape) {
  Tensor total = Tensor::zeros(shape, DType::f64);
  for (int r : ranks) total = add(total, input(seed, r, which, shape).to(DType::f64));
  return total;
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> check_collectives(Communicator& comm, Device device, uint64_t seed) {
  NoGradGuard no_grad;
  const int rank = comm.rank(), size = comm.size();
  std::vector<int> everyone;
  for (int r = 0; r < size; ++r) everyone.push_back(r);
  std::vector<std::pair<std::string, Tensor>> results;
  auto keep = [&](const std::string& name, const Tensor& t) { results.emplace_back(name, t.to(Device::cpu())); };
  auto mine = [&](int which, const Shape& shape, DType dtype = DType::f32) {
    return input(seed, rank, which, shape, dtype).to(device);
  };

  // all_reduce: a small tensor (gathered whole) and a large one (reduced in chunks), sum and mean.
  const Shape small{37, 29}, large{301, 97};
  const Tensor sum_small = comm.all_reduce(mine(0, small), ReduceOp::sum);
  expect_close(sum_small, sum_f64(seed, everyone, 0, small), 1e-5 * size, "all_reduce sum (small)", rank);
  keep("all_reduce_sum_small", sum_small);
  const Tensor sum_large = comm.all_reduce(mine(1, large), ReduceOp::sum);
  expect_close(sum_large, sum_f64(seed, everyone, 1, large), 1e-5 * size, "all_reduce sum (large)", rank);
  keep("all_reduce_sum_large", sum_large);
  const Tensor mean_large = comm.all_reduce(mine(2, large), ReduceOp::mean);
  expect_close(mean_large, mul(sum_f64(seed, everyone, 2, large), 1.0 / size), 1e-5 * size, "all_reduce mean", rank);
  keep("all_reduce_mean", mean_large);
  const Tensor sum_i64 = comm.all_reduce(mine(3, {5, 7}, DType::i64), ReduceOp::sum);
  Tensor want_i64 = Tensor::zeros({5, 7}, DType::i64);
  for (int r = 0; r < size; ++r) want_i64 = add(want_i64, input(seed, r, 3, {5, 7}, DType::i64));
  expect_exact(sum_i64, want_i64, "all_reduce sum (i64)", rank);
  keep("all_reduce_sum_i64", sum_i64);
  // start_all_reduce: two reductions under way at once, waited for in the other order.
  const Tensor to_mean = mine(9, large), to_sum = mine(10, small);
  auto started_mean = comm.start_all_reduce(to_mean, ReduceOp::mean);
  auto started_sum = comm.start_all_reduce(to_sum, ReduceOp::sum);
  const Tensor sum_started = started_sum->wait(), mean_started = started_mean->wait();
  expect_close(sum_started, sum_f64(seed, everyone, 10, small), 1e-5 * size, "start_all_reduce sum", rank);
  expect_close(mean_started, mul(sum_f64(seed, everyone, 9, large), 1.0 / size), 1e-5 * size,
               "start_all_reduce mean", rank);
  keep("start_all_reduce_sum", sum_started);
  keep("start_all_reduce_mean", mean_started);

  // all_gather: every rank's tensor, bit for bit.
  const std::vector<Tensor> gathered = comm.all_gather(mine(4, {3, 11}));
  LT_CHECK(static_cast<int>(gathered.size()) == size, "dist-check: all_gather on rank ", rank, " returned ",
           gathered.size(), " tensors for ", size, " ranks");
  for (int s = 0; s < size; ++s) {
    expect_exact(gathered[static_cast<size_t>(s)], input(seed, s, 4, {3, 11}), "all_gather (from rank " +
                 std::to_string(s) + ")", rank);
    keep("all_gather_" + std::to_string(s), gathered[static_cast<size_t>(s)]);
  }

  // all_gather_sizes, three calls in a row (the shared-memory path takes turns between two slots).
  for (int64_t call = 0; call < 3; ++call) {
    const std::vector<int64_t> sizes = comm.all_gather_sizes(1000 * call + 7 * rank + 3);
    LT_CHECK(static_cast<int>(sizes.size()) == size, "dist-check: all_gather_sizes on rank ", rank, " returned ",
             sizes.size(), " values for ", size, " ranks");
    for (int s = 0; s < size; ++s)
      LT_CHECK(sizes[static_cast<size_t>(s)] == 1000 * call + 7 * s + 3, "dist-check: all_gather_sizes call ", call,
               " on rank ", rank, " got ", sizes[static_cast<size_t>(s)], " from rank ", s, ", expected ",
               1000 * call + 7 * s + 3);
  }

  // all_to_all with a different shape per pair: rank s sends rank d a (s + 1, d + 2) tensor.
  std::vector<Tensor> to_each;
  for (int d = 0; d < size; ++d) to_each.push_back(mine(100 + d, {rank + 1, d + 2}));
  const std::vector<Tensor> received = comm.all_to_all(to_each);
  for (int s = 0; s < size; ++s) {
    expect_exact(received[static_cast<size_t>(s)], input(seed, s, 100 + rank, {s + 1, rank + 2}),
                 "all_to_all (from rank " + std::to_string(s) + ")", rank);
    keep("all_to_all_" + std::to_string(s), received[static_cast<size_t>(s)]);
  }

  // start_all_to_all: two under way at once, waited for in the other order. The first receives into
  // contiguous rows of one buffer, the second into strided columns of another (transposed pieces).
  std::vector<Tensor> rows_to_each, cols_to_each;
  for (int d = 0; d < size; ++d) {
    rows_to_each.push_back(mine(200 + d, {2, rank + 3}));
    cols_to_each.push_back(mine(300 + d, {d + 1, 4}, DType::i64));
  }
  Tensor rows = Tensor::zeros({size * (size + 5)}, DType::f32, device);  // sum over s of 2 (s + 3)
  Tensor cols = Tensor::zeros({4, size * (rank + 1)}, DType::i64, device);
  std::vector<Tensor> rows_into, cols_into;
  for (int s = 0, at = 0; s < size; at += 2 * (s + 3), ++s) {
    rows_into.push_back(rows.narrow(0, at, 2 * (s + 3)).view({2, s + 3}));
    cols_into.push_back(cols.narrow(1, s * (rank + 1), rank + 1).permute({1, 0}));
  }
  auto started_rows = comm.start_all_to_all(rows_to_each, rows_into);
  auto started_cols = comm.start_all_to_all(cols_to_each, cols_into);
  started_cols->wait();
  started_rows->wait();
  for (int s = 0; s < size; ++s) {
    expect_exact(rows_into[static_cast<size_t>(s)], input(seed, s, 200 + rank, {2, s + 3}),
                 "start_all_to_all (from rank " + std::to_string(s) + ")", rank);
    expect_exact(cols_into[static_cast<size_t>(s)], input(seed, s, 300 + rank, {rank + 1, 4}, DType::i64),
                 "start_all_to_all into strided views (from rank " + std::to_string(s) + ")", rank);
  }
  keep("start_all_to_all_rows", rows);
  keep("start_all_to_all_cols", cols);

  // The same two exchanges as one start_all_to_all_many call, into fresh buffers.
  Tensor rows2 = Tensor::zeros(rows.shape(), DType::f32, device);
  Tensor cols2 = Tensor::zeros(cols.shape(), DType::i64, device);
  std::vector<Tensor> rows2_into, cols2_into;
  for (int s = 0, at = 0; s < size; at += 2 * (s + 3), ++s) {
    rows2_into.push_back(rows2.narrow(0, at, 2 * (s + 3)).view({2, s + 3}));
    cols2_into.push_back(cols2.narrow(1, s * (rank + 1), rank + 1).permute({1, 0}));
  }
  comm.start_all_to_all_many({rows_to_each, cols_to_each}, {rows2_into, cols2_into})->wait();
  expect_exact(rows2, rows, "start_all_to_all_many (rows)", rank);
  expect_exact(cols2, cols, "start_all_to_all_many (strided columns)", rank);

  // Head slices, as head_parallel moves them: rank s sends rank d heads 2d, 2d + 1 of its (5, 2P, 3)
  // tensor, received into the same heads of a (5, 2P, 3) buffer (rows at a pitch on both sides).
  const Tensor heads_full = mine(400, {5, 2 * size, 3});
  Tensor heads = Tensor::zeros({5, 2 * size, 3}, DType::f32, device);
  std::vector<Tensor> heads_to_each, heads_into;
  for (int d = 0; d < size; ++d) {
    heads_to_each.push_back(heads_full.narrow(1, 2 * d, 2));
    heads_into.push_back(heads.narrow(1, 2 * d, 2));
  }
  comm.start_all_to_all(heads_to_each, heads_into)->wait();
  for (int s = 0; s < size; ++s)
    expect_exact(heads_into[static_cast<size_t>(s)], input(seed, s, 400, {5, 2 * size, 3}).narrow(1, 2 * rank, 2),
                 "start_all_to_all of head slices (from rank " + std::to_string(s) + ")", rank);
  keep("start_all_to_all_heads", heads);
  // Rows of different lengths on the two sides: rank d's heads 2d, 2d + 1 (rows of 6 values) into a
  // (5, 2, 3) view of a (5, 2, 4) buffer (rows of 3 values at a pitch of 4).
  Tensor padded = Tensor::zeros({5, 2 * size, 4}, DType::f32, device);
  std::vector<Tensor> padded_into;
  for (int s = 0; s < size; ++s) padded_into.push_back(padded.narrow(1, 2 * s, 2).narrow(2, 0, 3));
  comm.start_all_to_all_many({heads_to_each}, {padded_into})->wait();
  for (int s = 0; s < size; ++s)
    expect_exact(padded_into[static_cast<size_t>(s)], input(seed, s, 400, {5, 2 * size, 3}).narrow(1, 2 * rank, 2),
                 "start_all_to_all_many into rows of another length (from rank " + std::to_string(s) + ")", rank);
  keep("start_all_to_all_padded", padded);
  // Many in a row, two under way at a time (backends may reuse what an exchange holds).
  for (int i = 0; i < 40; ++i) {
    std::vector<Tensor> a_to_each, b_to_each, a_into, b_into;
    for (int d = 0; d < size; ++d) {
      a_to_each.push_back(mine(500 + i, {d + 2}));
      b_to_each.push_back(mine(600 + i, {3, d + 1}));
      a_into.push_back(Tensor::empty({rank + 2}, DType::f32, device));
      b_into.push_back(Tensor::empty({3, rank + 1}, DType::f32, device));
    }
    auto a = comm.start_all_to_all(a_to_each, a_into);
    auto b = comm.start_all_to_all(b_to_each, b_into);
    a->wait();
    b->wait();
    if (i % 13 != 0) continue;
    for (int s = 0; s < size; ++s) {
      expect_exact(a_into[static_cast<size_t>(s)], input(seed, s, 500 + i, {rank + 2}),
                   "start_all_to_all number " + std::to_string(2 * i) + " (from rank " + std::to_string(s) + ")", rank);
      expect_exact(b_into[static_cast<size_t>(s)], input(seed, s, 600 + i, {3, rank + 1}),
                   "start_all_to_all number " + std::to_string(2 * i + 1) + " (from rank " + std::to_string(s) + ")",
                   rank);
    }
  }

  // broadcast from the last rank.
  const int root = size - 1;
  const Tensor broadcasted = comm.broadcast(rank == root ? mine(5, {4, 9}) : Tensor::zeros({4, 9}, DType::f32, device),
                                            root);
  expect_exact(broadcasted, input(seed, root, 5, {4, 9}), "broadcast", rank);
  keep("broadcast", broadcasted);

  // Point to point around the ring: plain sends then receives (buffered sends cannot deadlock),
  // then exchange() the other way round.
  const int next = (rank + 1) % size, previous = (rank + size - 1) % size;
  comm.send(mine(6, {8, 5}), next, 1);
  const Tensor from_previous = comm.recv({8, 5}, DType::f32, device, previous, 1);
  expect_exact(from_previous, input(seed, previous, 6, {8, 5}), "send/recv ring", rank);
  keep("ring_send_recv", from_previous);
  auto pending = comm.exchange(mine(7, {6, 3}), previous, {6, 3}, DType::f32, device, next, 2);
  const Tensor from_next = pending->wait();
  expect_exact(from_next, input(seed, next, 7, {6, 3}), "exchange", rank);
  keep("ring_exchange", from_next);

  comm.barrier();

  // split: even and odd ranks, ranked in reverse order within each.
  std::shared_ptr<Communicator> half = comm.split(rank % 2, -rank);
  std::vector<int> members;
  for (int r = size - 1; r >= 0; --r)
    if (r % 2 == rank % 2) members.push_back(r);
  LT_CHECK(half->size() == static_cast<int>(members.size()) && members[static_cast<size_t>(half->rank())] == rank,
           "dist-check: split on rank ", rank, " gave rank ", half->rank(), " of ", half->size(), ", expected ",
           "rank ", std::find(members.begin(), members.end(), rank) - members.begin(), " of ", members.size());
  const Tensor half_sum = half->all_reduce(mine(8, small), ReduceOp::sum);
  expect_close(half_sum, sum_f64(seed, members, 8, small), 1e-5 * size, "all_reduce in a split group", rank);
  keep("split_all_reduce", half_sum);
  half->barrier();
  comm.barrier();
  return results;
}

}  // namespace longtape::dist
