// The parallel variants (docs/attention.md, parallel variants) against the single-device variants,
// forward and backward: ring (dense and dilated, both mixings, causal and not) and head_parallel,
// P = 1, 2, 3, 4 ranks, simulated by the registered modules and rank-local inside run_ranks.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/head_parallel.h"
#include "attention/multihead.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "io/tensor_io.h"
#include "nn/dist/data_parallel.h"
#include "nn/layers.h"
#include "nn/dist/communicator.h"
#include "support/parallel_configs.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::parallel_cases;

namespace {

using testing::max_diff;

using Inner = testing::InnerVariant;

AttentionConfig make_config(const Inner& inner, int64_t heads, int64_t dim, bool causal, int64_t ranks) {
  return testing::parallel_config(inner, heads, dim, causal, ranks);
}

std::string label(const std::string& variant, const Inner& inner, int64_t n, bool causal, int64_t p) {
  return variant + " over " + inner.name + (inner.mixing == Mixing::head_groups ? " (head_groups)" : "") +
         ", N = " + std::to_string(n) + (causal ? ", causal" : "") + ", P = " + std::to_string(p);
}

// `wrapper` ("ring", "head_parallel") around `inner` against `inner` alone, on the same inputs of
// h heads of dim d, split over p ranks.
void check_wrapper_matches_inner(const std::string& wrapper, const Inner& inner, const AttentionInputs& in, int64_t h,
                                 int64_t d, bool causal, int64_t p) {
  const AttentionConfig config = make_config(inner, h, d, causal, p);
  auto reference = make_attention(inner.name, config);
  auto wrapped = make_attention(wrapper, config);
  const AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
  const AttentionResults got = run_with_gradients(*wrapped, in.q, in.k, in.v, in.dout, in.dlse);
  check_results(got, want, 1e-12, label(wrapper, inner, in.q.size(1), causal, p));
}

// Runs `variant` rank-locally: each of p ranks gets its token chunk, calls the module (which picks
// up the rank's communicator) and runs backward with its chunk of the gradients.
AttentionResults run_rank_local(const std::string& variant, const AttentionConfig& config, const AttentionInputs& in,
                                int p) {
  const std::vector<int64_t> starts = sequence_chunk_starts(in.q.size(1), p);
  std::vector<AttentionResults> parts(static_cast<size_t>(p));
  dist::CommOptions options;
  options.timeout = std::chrono::milliseconds(20000);
  dist::run_ranks(p, [&](dist::Communicator& comm) {
    const size_t r = static_cast<size_t>(comm.rank());
    auto chunk = [&](const Tensor& x, int64_t dim) { return x.narrow(dim, starts[r], starts[r + 1] - starts[r]).contiguous(); };
    auto attention = make_attention(variant, config);
    parts[r] = run_with_gradients(*attention, chunk(in.q, 1), chunk(in.k, 1), chunk(in.v, 1), chunk(in.dout, 1),
                                  chunk(in.dlse, 2));
  }, options);
  return join_rank_chunks(parts);
}

}  // namespace

TEST_CASE("ring and head_parallel are registered and take the parallel settings from the config") {
  auto names = registered_attention_names();
  CHECK(std::find(names.begin(), names.end(), "ring") != names.end());
  CHECK(std::find(names.begin(), names.end(), "head_parallel") != names.end());
  CHECK(attention_description("ring").find("parallel variants") != std::string::npos);
  AttentionConfig c;
  c.num_heads = 4;
  c.head_dim = 8;
  c.ranks = 2;
  CHECK(make_attention("ring", c)->variant_name() == "ring");
  CHECK(make_attention("head_parallel", c)->variant_name() == "head_parallel");
}

TEST_CASE("sequence chunks: rank r holds [r*N/P, (r+1)*N/P)") {
  CHECK(sequence_chunk_starts(10, 4) == std::vector<int64_t>{0, 2, 5, 7, 10});
  CHECK(sequence_chunk_starts(8, 1) == std::vector<int64_t>{0, 8});
  CHECK_THROWS_WITH_AS(sequence_chunk_starts(3, 4), doctest::Contains("at least one token each"), Error);
}

TEST_CASE("ring equals the single-device variant forward and backward, P = 1..4 (f64)") {
  const std::vector<Inner> inners = {
      {"dense", Mixing::lse, {}, {}},
      // Segments shorter than, equal to and longer than a chunk; unaligned with some P.
      {"dilated", Mixing::lse, {3, 4, 8, 64}, {1, 2, 3, 2}},
      {"dilated", Mixing::head_groups, {4, 6, 100}, {2, 1, 3}},
      // Only short segments: chunks travel a few steps each way, not around the whole ring.
      {"dilated", Mixing::lse, {3, 5}, {1, 2}},
  };
  const int64_t b = 2, h = 4, d = 5;
  int checked = 0;
  for (const int64_t n : {12, 10}) {
    for (int p = 1; p <= 4; ++p) {
      for (const bool causal : {false, true}) {
        for (const Inner& inner : inners) {
          manual_seed(1000 + checked);
          check_wrapper_matches_inner("ring", inner, random_attention_inputs(b, n, h, d), h, d, causal, p);
          ++checked;
        }
      }
    }
  }
  CHECK(checked == 64);
}

TEST_CASE("ring computes large blocks in pieces with the same result (tiny score budget)") {
  const int64_t previous = set_ring_score_budget(7);  // forces splitting by segments and by query runs
  const std::vector<Inner> inners = {{"dense", Mixing::lse, {}, {}}, {"dilated", Mixing::lse, {2, 6, 13}, {1, 2, 1}}};
  for (const Inner& inner : inners) {
    for (const bool causal : {false, true}) {
      manual_seed(causal ? 55 : 56);
      AttentionInputs in = random_attention_inputs(2, 13, 2, 3);
      AttentionConfig config = make_config(inner, 2, 3, causal, 2);
      auto reference = make_attention(inner.name, config);
      config.impl = "composed";  // the fused kernels form no scores: the budget is the composed path's
      auto ring = make_attention("ring", config);
      AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
      AttentionResults got = run_with_gradients(*ring, in.q, in.k, in.v, in.dout, in.dlse);
      CHECK(ring->last_backend() == "composed");
      check_results(got, want, 1e-12, label("ring, budget 7", inner, 13, causal, 2));
    }
  }
  CHECK(set_ring_score_budget(previous) == 7);
  CHECK_THROWS_AS(set_ring_score_budget(0), Error);
}

namespace {

// Forwards every call to the rank's communicator and counts the point-to-point sends.
class CountingCommunicator : public dist::Communicator {
 public:
  explicit CountingCommunicator(dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const dist::CommOptions& options() const override { return inner_.options(); }
  void send(const Tensor& t, int dst, int tag) override {
    ++sends;
    inner_.send(t, dst, tag);
  }
  Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag) override {
    return inner_.recv(shape, dtype, device, src, tag);
  }
  std::vector<Tensor> all_gather(const Tensor& t) override { return inner_.all_gather(t); }
  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override { return inner_.all_to_all(to_each); }
  Tensor all_reduce(const Tensor& t, dist::ReduceOp op) override { return inner_.all_reduce(t, op); }
  Tensor broadcast(const Tensor& t, int root) override { return inner_.broadcast(t, root); }
  void barrier() override { inner_.barrier(); }
  void abort(const std::string& why) override { inner_.abort(why); }
  std::shared_ptr<dist::Communicator> split(int64_t color, int64_t key) override { return inner_.split(color, key); }
  int sends = 0;

 private:
  dist::Communicator& inner_;
};

}  // namespace

TEST_CASE("ring moves K/V only as far as some segment reaches: local aligned branches send nothing") {
  struct Case {
    Inner inner;
    int64_t n;
    int p;
    bool causal;
    int expected_sends;  // per rank, forward + backward
  };
  // Sends of one pass of `steps` steps: forward K, V per step; backward K, V per step, the dK, dV
  // buffers from the second step on (the first rank to meet a chunk starts them at zero), then
  // dK, dV straight home.
  auto pass = [](int steps) { return steps == 0 ? 0 : 2 * steps + 2 * steps + 2 * (steps - 1) + 2; };
  const std::vector<Case> cases = {
      // Segments inside the chunks and aligned with them: local, no K/V moves.
      {{"dilated", Mixing::lse, {3, 6}, {1, 2}}, 12, 2, false, 0},
      {{"dilated", Mixing::lse, {2, 4}, {2, 1}}, 12, 3, true, 0},
      // Segments of 2 straddle the edges of 3-token chunks: causal needs the previous chunk only
      // (one step), non-causal the next one too (one step each way), not a trip around the ring.
      {{"dilated", Mixing::lse, {2}, {1}}, 12, 4, true, pass(1)},
      {{"dilated", Mixing::lse, {2}, {1}}, 12, 4, false, 2 * pass(1)},
      // Dense: P - 1 ring steps.
      {{"dense", Mixing::lse, {}, {}}, 12, 3, true, pass(2)},
      {{"dense", Mixing::lse, {}, {}}, 12, 4, false, pass(3)},
  };
  for (const Case& c : cases) {
    manual_seed(c.n + c.p);
    AttentionInputs in = random_attention_inputs(1, c.n, 2, 4);
    AttentionConfig config = make_config(c.inner, 2, 4, c.causal, c.p);
    auto reference = make_attention(c.inner.name, config);
    AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
    const std::vector<int64_t> starts = sequence_chunk_starts(c.n, c.p);
    std::vector<int> sends(static_cast<size_t>(c.p));
    std::vector<AttentionResults> parts(static_cast<size_t>(c.p));
    dist::run_ranks(c.p, [&](dist::Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      auto counting = std::make_shared<CountingCommunicator>(comm);
      auto chunk = [&](const Tensor& x, int64_t dim) {
        return x.narrow(dim, starts[r], starts[r + 1] - starts[r]).contiguous().detach();
      };
      Tensor q = chunk(in.q, 1).requires_grad_(), k = chunk(in.k, 1).requires_grad_(), v = chunk(in.v, 1).requires_grad_();
      AttentionOutput res = ring_attention(*counting, config, q, k, v);
      autograd::run_backward({res.out, res.lse}, {chunk(in.dout, 1), chunk(in.dlse, 2)}, false);
      parts[r] = {res.out.detach(), res.lse.detach(), q.grad(), k.grad(), v.grad()};
      sends[r] = counting->sends;
    });
    const std::string what = label("ring send count", c.inner, c.n, c.causal, c.p);
    INFO(what);
    for (int r = 0; r < c.p; ++r) CHECK(sends[static_cast<size_t>(r)] == c.expected_sends);
    check_results(join_rank_chunks(parts), want, 1e-12, what);
  }
}

TEST_CASE("ring rank-local inside run_ranks equals the single-device variant, uneven chunks") {
  const Inner dilated{"dilated", Mixing::lse, {4, 16}, {1, 3}};
  const Inner dense{"dense", Mixing::lse, {}, {}};
  for (const Inner& inner : {dense, dilated}) {
    for (const bool causal : {false, true}) {
      manual_seed(causal ? 77 : 78);
      AttentionInputs in = random_attention_inputs(1, 11, 3, 4);
      AttentionConfig config = make_config(inner, 3, 4, causal, 3);
      auto reference = make_attention(inner.name, config);
      AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
      AttentionResults got = run_rank_local("ring", config, in, 3);
      check_results(got, want, 1e-12, label("rank-local ring", inner, 11, causal, 3));
    }
  }
}

TEST_CASE("head_parallel equals the single-device variant with global head indices, P = 1..4 (f64)") {
  // 12 heads split over 1, 2, 3, 4 ranks; dilation rates 2 and 3 make the head offsets h mod r
  // differ between local and global head indices, and 3 head groups straddle rank boundaries.
  const std::vector<Inner> inners = {
      {"dense", Mixing::lse, {}, {}},
      {"dilated", Mixing::lse, {4, 6, 9}, {1, 2, 3}},
      {"dilated", Mixing::head_groups, {3, 9, 6}, {1, 3, 2}},
  };
  const int64_t h = 12, d = 3, n = 9;
  for (int p = 1; p <= 4; ++p) {
    for (const bool causal : {false, true}) {
      for (const Inner& inner : inners) {
        manual_seed(2000 + p * 10 + (causal ? 1 : 0));
        check_wrapper_matches_inner("head_parallel", inner, random_attention_inputs(1, n, h, d), h, d, causal, p);
      }
    }
  }
}

TEST_CASE("head_parallel rank-local inside run_ranks, head groups of unequal size") {
  // 10 heads in 3 groups (4, 3, 3), 2 ranks of 5 heads: group 1 spans both ranks.
  const Inner inner{"dilated", Mixing::head_groups, {4, 8, 2}, {2, 1, 2}};
  manual_seed(91);
  AttentionInputs in = random_attention_inputs(2, 8, 10, 4);
  AttentionConfig config = make_config(inner, 10, 4, true, 2);
  auto reference = make_attention("dilated", config);
  AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
  AttentionResults got = run_rank_local("head_parallel", config, in, 2);
  check_results(got, want, 1e-12, "rank-local head_parallel, head_groups 10 heads / 3 groups, P = 2");
}

TEST_CASE("ring and head_parallel in f32 agree with the f32 single-device variant") {
  const Inner inner{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  manual_seed(5);
  AttentionInputs in = random_attention_inputs(2, 16, 4, 8, DType::f32);
  for (const std::string variant : {"ring", "head_parallel"}) {
    AttentionConfig config = make_config(inner, 4, 8, true, 4);
    auto reference = make_attention("dilated", config);
    auto parallel = make_attention(variant, config);
    AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
    AttentionResults got = run_with_gradients(*parallel, in.q, in.k, in.v, in.dout, in.dlse);
    CHECK(got.out.dtype() == DType::f32);
    check_results(got, want, 2e-5, variant + " f32");
  }
}

TEST_CASE("a multihead layer takes ring and head_parallel by name: same output and parameter gradients") {
  AttentionConfig config;
  config.segment_lengths = {4, 8};
  config.dilation_rates = {1, 2};
  config.causal = true;
  config.ranks = 2;
  MultiheadAttention reference(8, 4, "dilated", config);
  reference.to(DType::f64);
  manual_seed(12);
  Tensor x = Tensor::randn({2, 8, 8}, DType::f64), w = Tensor::randn({2, 8, 8}, DType::f64);
  sum(mul(reference.forward(x), w)).backward();
  for (const std::string variant : {"ring", "head_parallel"}) {
    MultiheadAttention layer(8, 4, variant, config);
    layer.to(DType::f64);
    layer.load_state_dict(reference.state_dict());
    Tensor y = layer.forward(x);
    sum(mul(y, w)).backward();
    CHECK(max_diff(y.detach(), reference.forward(x).detach()) < 1e-12);
    const auto want = reference.named_parameters(), got = layer.named_parameters();
    REQUIRE(want.size() == got.size());
    for (size_t i = 0; i < want.size(); ++i) {
      INFO(variant << " " << want[i].first);
      CHECK(max_diff(got[i].second.grad(), want[i].second.grad()) < 1e-12);
    }
  }
}

TEST_CASE("data x sequence parallel on a 2 x 2 grid: ring over rows, gradient averaging over columns") {
  // Rank (d, s) = (rank / 2, rank % 2) holds sample d and token chunk s. The loss is the batch mean
  // of per-sample sums, so gradients are summed over the sequence group and averaged over the data group.
  const int64_t batch = 2, n = 10, heads = 2, dim = 4, embed = heads * dim;
  AttentionConfig config;
  config.num_heads = heads;
  config.head_dim = dim;
  config.causal = true;
  config.segment_lengths = {4, 10};
  config.dilation_rates = {1, 2};
  manual_seed(404);
  nn::Linear reference(embed, 3 * embed, false);
  reference.to(DType::f64);
  Tensor x = Tensor::randn({batch, n, embed}, DType::f64), w = Tensor::randn({batch, n, heads, dim}, DType::f64);
  auto attend = [&](nn::Linear& proj, Attention& attention, const Tensor& input) {
    std::vector<Tensor> qkv = split(proj.forward(input), embed, 2);
    auto heads_of = [&](const Tensor& t) { return t.reshape({t.size(0), t.size(1), heads, dim}); };
    return attention.forward(heads_of(qkv[0]), heads_of(qkv[1]), heads_of(qkv[2]));
  };
  auto single = make_attention("dilated", config);
  mul(sum(mul(attend(reference, *single, x), w)), 1.0 / batch).backward();

  const auto state = reference.state_dict();
  const std::vector<int64_t> starts = sequence_chunk_starts(n, 2);
  std::vector<Tensor> grads(4);
  dist::run_ranks(4, [&](dist::Communicator& comm) {
    const int64_t d = comm.rank() / 2, s = comm.rank() % 2;
    auto sequence = comm.split(d, s);
    auto data = comm.split(s, d);
    nn::Linear proj(embed, 3 * embed, false);
    proj.to(DType::f64);
    proj.load_state_dict(state);
    auto ring = make_attention("ring", config);
    const dist::CommunicatorScope scope(*sequence);  // the ring runs over this row of the grid
    auto local = [&](const Tensor& t) {
      return t.narrow(0, d, 1).narrow(1, starts[static_cast<size_t>(s)], starts[static_cast<size_t>(s) + 1] - starts[static_cast<size_t>(s)]);
    };
    sum(mul(attend(proj, *ring, local(x)), local(w))).backward();
    proj.weight.set_grad(sequence->all_reduce(proj.weight.grad()));
    dist::average_gradients(*data, proj);
    grads[static_cast<size_t>(comm.rank())] = proj.weight.grad();
  });
  for (int r = 0; r < 4; ++r) CHECK(max_diff(grads[static_cast<size_t>(r)], reference.weight.grad()) < 1e-12);
}

TEST_CASE("parallel variants reject what they cannot do, with clear errors") {
  AttentionConfig c;
  c.num_heads = 4;
  c.head_dim = 4;
  c.ranks = 3;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", c), doctest::Contains("must be divisible by the number of ranks"),
                       Error);
  CHECK_THROWS_WITH_AS(dist::run_ranks(3, [](dist::Communicator& comm) {
    AttentionConfig local;
    local.num_heads = 4;
    local.head_dim = 4;
    Tensor x = Tensor::randn({1, 2, 4, 4});
    head_parallel_attention(comm, local, x, x, x);
  }), doctest::Contains("num_heads (4) must be divisible by the number of ranks (3)"), Error);
  c.inner_variant = "block_sparse";
  CHECK_THROWS_WITH_AS(make_attention("ring", c), doctest::Contains("inner_variant must be \"dense\" or \"dilated\""),
                       Error);
  c.inner_variant = "ring";
  c.ranks = 2;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", c), doctest::Contains("single-device variant"), Error);
  c.inner_variant = "dense";
  c.ranks = 4;
  auto ring = make_attention("ring", c);
  Tensor short_seq = Tensor::randn({1, 3, 4, 4});
  CHECK_THROWS_WITH_AS(ring->forward(short_seq, short_seq, short_seq), doctest::Contains("at least one token each"),
                       Error);
  c.dropout = 0.1;
  auto with_dropout = make_attention("ring", c);
  Tensor x = Tensor::randn({1, 8, 4, 4});
  CHECK_THROWS_WITH_AS(with_dropout->forward(x, x, x), doctest::Contains("dropout is not supported"), Error);
  with_dropout->eval();
  CHECK(with_dropout->forward(x, x, x).shape() == x.shape());
  c.dropout = 0.0;
  c.segment_lengths = {4, 8};
  c.dilation_rates = {1};
  c.inner_variant = "dilated";
  CHECK_THROWS_WITH_AS(make_attention("ring", c), doctest::Contains("same length"), Error);
}

TEST_CASE("a rank whose ring input is wrong makes every rank fail, not hang") {
  AttentionConfig c;
  c.num_heads = 2;
  c.head_dim = 4;
  c.inner_variant = "dense";
  dist::CommOptions options;
  options.timeout = std::chrono::milliseconds(2000);
  CHECK_THROWS_WITH_AS(dist::run_ranks(3, [&](dist::Communicator& comm) {
    const int64_t heads = comm.rank() == 2 ? 3 : 2;  // rank 2 has the wrong head count
    Tensor x = Tensor::randn({1, 4, heads, 4});
    ring_attention(comm, c, x, x, x);
  }, options), doctest::Contains("rank 2 of 3 failed"), Error);
}

TEST_CASE("ring and head_parallel on CUDA match the CPU (CPU/CUDA parity)") {
  if (!cuda_available()) {
    MESSAGE("skipped: no CUDA device available (or built without CUDA)");
    return;
  }
  const Inner inner{"dilated", Mixing::lse, {8, 32}, {1, 4}};
  manual_seed(9);
  AttentionInputs in = random_attention_inputs(2, 32, 4, 16, DType::f32);
  for (const std::string variant : {"ring", "head_parallel"}) {
    AttentionConfig config = make_config(inner, 4, 16, true, 4);
    auto cpu = make_attention(variant, config);
    auto gpu = make_attention(variant, config);
    AttentionResults want = run_with_gradients(*cpu, in.q, in.k, in.v, in.dout, in.dlse);
    const Device cuda = Device::cuda();
    AttentionResults got =
        run_with_gradients(*gpu, in.q.to(cuda), in.k.to(cuda), in.v.to(cuda), in.dout.to(cuda), in.dlse.to(cuda));
    CHECK(got.out.device() == cuda);
    check_results({got.out.cpu(), got.lse.cpu(), got.dq.cpu(), got.dk.cpu(), got.dv.cpu()}, want, 1e-4,
               variant + " on CUDA");
  }
}

TEST_CASE("command line: `longtape attention --variant ring|head_parallel --inner X --ranks P` (and the deprecated "
          "--parallel spelling) equals the single-device run") {
  const char* bin_dir = std::getenv("LONGTAPE_BIN");
  const std::string bin = bin_dir ? std::string(bin_dir) + "/longtape" : "";
  if (bin.empty() || !std::filesystem::exists(bin)) {
    MESSAGE("skipped: LONGTAPE_BIN does not point at a built longtape executable (run through ctest)");
    return;
  }
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("longtape_ring_cli_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto at = [&](const std::string& name) { return (dir / name).string(); };
  manual_seed(31);
  AttentionInputs in = random_attention_inputs(2, 10, 4, 4);
  io::save_npy(at("q.npy"), in.q);
  io::save_npy(at("k.npy"), in.k);
  io::save_npy(at("v.npy"), in.v);
  io::save_npy(at("dout.npy"), in.dout);
  const std::string common = bin + " attention --segments 4,8 --dilations 1,2 --causal --q " +
                             at("q.npy") + " --k " + at("k.npy") + " --v " + at("v.npy") + " --dout " + at("dout.npy");
  auto run_cli = [&](const std::string& extra, const std::string& out) {
    const int status = std::system((common + extra + " --out-dir " + at(out) + " > " + at(out + ".log") + " 2>&1").c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  const Inner inner{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  auto reference = make_attention("dilated", make_config(inner, 4, 4, true, 1));
  Tensor ql = in.q.detach().clone().requires_grad_(), kl = in.k.detach().clone().requires_grad_(),
         vl = in.v.detach().clone().requires_grad_();
  AttentionOutput want = reference->forward_with_lse(ql, kl, vl);
  want.out.backward(in.dout);
  for (const auto& [extra, out] : std::vector<std::pair<std::string, std::string>>{
           {" --variant ring --inner dilated --ranks 3", "ring"},
           {" --variant ring --inner dilated --ranks 3 --ring-layout zigzag", "zigzag"},
           {" --variant head_parallel --inner dilated --ranks 2", "head"},
           {" --variant dilated --parallel ring --ranks 3", "ring_deprecated"},
           {" --variant dilated --parallel head --ranks 2", "head_deprecated"}}) {
    INFO(extra);
    REQUIRE(run_cli(extra, out) == 0);
    CHECK(max_diff(io::load_npy(at(out + "/o.npy")), want.out) < 1e-12);
    CHECK(max_diff(io::load_npy(at(out + "/lse.npy")), want.lse) < 1e-12);
    CHECK(max_diff(io::load_npy(at(out + "/dq.npy")), ql.grad()) < 1e-12);
    CHECK(max_diff(io::load_npy(at(out + "/dk.npy")), kl.grad()) < 1e-12);
    CHECK(max_diff(io::load_npy(at(out + "/dv.npy")), vl.grad()) < 1e-12);
  }
  CHECK(run_cli(" --variant dilated --ranks 3", "bad") != 0);
  std::ifstream log(at("bad.log"));
  std::stringstream text;
  text << log.rdbuf();
  CHECK(text.str().find("--ranks 3 needs --variant ring or head_parallel") != std::string::npos);
  CHECK(run_cli(" --variant head_parallel --inner dilated --ranks 3", "bad_heads") != 0);
  CHECK(run_cli(" --variant head_parallel --inner dilated --ranks 2 --ring-layout zigzag", "bad_layout") != 0);
  std::ifstream layout_log(at("bad_layout.log"));
  std::stringstream layout_text;
  layout_text << layout_log.rdbuf();
  CHECK(layout_text.str().find("--ring-layout zigzag needs --variant ring") != std::string::npos);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TEST_CASE("head_parallel over block_sparse_adaptive keeps one scorer per rank: same output every call, trained") {
  AttentionConfig config;
  config.num_heads = 4;
  config.head_dim = 8;
  config.block_size = 4;
  config.density = 0.5;
  config.inner_variant = "block_sparse_adaptive";
  config.ranks = 2;
  manual_seed(17);
  auto attention = make_attention("head_parallel", config);
  attention->to(DType::f64);
  // The inner modules are submodules: their scorers are parameters of the head_parallel module.
  const auto params = attention->named_parameters();
  std::vector<std::string> names;
  for (const auto& [name, t] : params) names.push_back(name);
  CHECK(names == std::vector<std::string>{"rank0.scorer_q", "rank0.scorer_k", "rank1.scorer_q", "rank1.scorer_k"});
  Tensor q = Tensor::randn({1, 32, 4, 8}, DType::f64).requires_grad_(), k = Tensor::randn({1, 32, 4, 8}, DType::f64),
         v = Tensor::randn({1, 32, 4, 8}, DType::f64), w = Tensor::randn({1, 32, 4, 8}, DType::f64);
  const AttentionOutput first = attention->forward_with_lse(q, k, v);
  const AttentionOutput second = attention->forward_with_lse(q, k, v);
  CHECK(max_diff(first.out.detach(), second.out.detach()) == 0.0);
  CHECK(max_diff(first.lse.detach(), second.lse.detach()) == 0.0);
  // The same as running each rank's module on its heads directly (global head h = rank * 2 + local).
  for (int64_t r = 0; r < 2; ++r) {
    auto inner = std::dynamic_pointer_cast<Attention>(attention->child("rank" + std::to_string(r)));
    REQUIRE(inner != nullptr);
    NoGradGuard no_grad;
    Tensor want = inner->forward(q.detach().narrow(2, 2 * r, 2), k.narrow(2, 2 * r, 2), v.narrow(2, 2 * r, 2));
    CHECK(max_diff(first.out.detach().narrow(2, 2 * r, 2), want) < 1e-12);
  }
  // The task loss trains every rank's scorer (and q still gets its gradient).
  sum(mul(first.out, w)).backward();
  REQUIRE(q.grad().defined());
  for (const auto& [name, param] : params) {
    INFO(name);
    REQUIRE(param.grad().defined());
    double norm = 0.0;
    for (double x : param.grad().to_vector()) norm += x * x;
    CHECK(norm > 1e-12);
  }
  // Scorer gradients equal those of the rank's module run on its heads alone.
  for (int64_t r = 0; r < 2; ++r) {
    auto inner = std::dynamic_pointer_cast<Attention>(attention->child("rank" + std::to_string(r)));
    std::vector<Tensor> scorer = inner->parameters();
    Tensor y = inner->forward(q.detach().narrow(2, 2 * r, 2), k.narrow(2, 2 * r, 2), v.narrow(2, 2 * r, 2));
    std::vector<Tensor> want = autograd::grad({sum(mul(y, w.narrow(2, 2 * r, 2)))}, scorer);
    for (size_t i = 0; i < scorer.size(); ++i) CHECK(max_diff(scorer[i].grad(), want[i]) < 1e-10);
  }
}
