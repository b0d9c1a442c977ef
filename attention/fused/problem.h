#pragma once
// The one contract between the attention layers and the fused attention kernels (CPU and CUDA):
// raw pointers with element strides plus a description of which keys every query row sees.
// No tensors, no CUDA headers. docs/attention.md states what each key set computes.
//
// Layout: q, out, dq, do, dout are (B, Nq, H, D); k, v, dk, dv are (B, Nk, H, D), each with its own
// batch / row / head strides in elements and a contiguous last dim. lse, delta are (B, H, Nq) f32
// (f64 for f64 inputs), contiguous.
//
// Every key set is a set of *streams*: strided runs of positions inside which attention is ordinary
// (optionally causal) softmax attention.
//  - dense:    one stream per (b, h): all Nq queries, all Nk keys.
//  - dilated:  branch i cuts the sequence into segments of w_i tokens; the stream of segment t for
//              offset o holds positions t*w_i + o + j*r_i inside the segment. The kernels read these
//              rows in place through (row stride * r_i): no gather, no scatter.
//  - blocks:   one stream per (b, h) whose keys are limited per query block by a block list (CSR),
//              with an optional additive bias per (b, h, query block, key block).
// Causal: key index <= query index inside a stream (positions are increasing along a stream).
#include <cstdint>

#include "tensor/dtype.h"

namespace longtape::attention::fused {

constexpr int kMaxBranches = 8;
constexpr int kMaxHeads = 256;

struct Strides {
  int64_t batch = 0, row = 0, head = 0;  // elements; the last dim is contiguous
};

enum class KeySet : uint8_t { dense, dilated, blocks };

// How the branches of one dilated problem are combined (see docs/attention.md):
//  lse:         every head runs every branch (offset (head_offset + h) mod r_i); the results merge by
//               log-sum-exp into one softmax over the union of the keys.
//  head_groups: head h runs only branch branch_of_head[h] with offset offset_of_head[h]; its output
//               is scaled by out_scale (1/G). Heads with branch -1 see no key.
enum class BranchMixing : uint8_t { lse, head_groups };

struct DilatedSpec {
  int num_branches = 0;
  int64_t segment[kMaxBranches] = {};   // effective segment lengths (<= max(Nq, Nk)), > 0
  int64_t dilation[kMaxBranches] = {};  // > 0
  BranchMixing mixing = BranchMixing::lse;
  int64_t head_offset = 0;              // global index of local head 0 (lse offsets)
  // head_groups only, per local head:
  int8_t branch_of_head[kMaxHeads] = {};
  int32_t offset_of_head[kMaxHeads] = {};
};

// Block lists in CSR form (FlexAttention-style), int32, device-resident for CUDA kernels.
// There are `num_lists` lists (1 = shared by every (b, h), H = one per head, B*H = one per (b, h),
// list index b*H + h). List l of query blocks: keys of query block I are key blocks
// col_index[row_begin[l*(nqb+1) + I] .. row_begin[l*(nqb+1) + I + 1]) (sorted, no duplicates;
// offsets are global into col_index). The transposed lists (for backward) give, per key block J,
// the query blocks that see it.
struct BlockSpec {
  int64_t block_size = 64;
  int64_t num_query_blocks = 0, num_key_blocks = 0;
  int64_t num_lists = 1;
  const int32_t* row_begin = nullptr;   // num_lists * (nqb + 1)
  const int32_t* col_index = nullptr;
  const int32_t* col_begin = nullptr;   // num_lists * (nkb + 1)   (transposed, for backward)
  const int32_t* row_index = nullptr;
  // Optional additive bias (B, H, nqb, nkb) contiguous, f32 (f64 for f64 inputs), added to the
  // logits (after the scale) of every key of block J for the queries of block I; null = none.
  const void* bias = nullptr;
};

struct Problem {
  DType dtype = DType::bf16;  // q, k, v, out and their gradients
  int64_t batch = 0, heads = 0, head_dim = 0;
  int64_t seq_q = 0, seq_k = 0;
  double scale = 1.0;
  bool causal = false;
  KeySet key_set = KeySet::dense;
  DilatedSpec dilated;  // key_set == dilated
  BlockSpec blocks;     // key_set == blocks

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_stride, k_stride, v_stride;
  void* out = nullptr;
  Strides out_stride;
  void* lse = nullptr;  // (B, H, Nq) float (double for f64)
  // Optional (bf16 and f16 only): out's rounding residual, out_f32 - out, in out's dtype and
  // strides. The backward's delta = rowsum(dO * O) then sees O to about twice the format's bits.
  void* out_residual = nullptr;
};

// The backward of one Problem: the forward's out and lse are inputs, with dout and the gradient of
// lse (optional, null = 0). dq, dk, dv and dbias (optional, only with a block bias) are written
// (not accumulated); every element is written.
struct BackwardProblem {
  Problem forward;
  const void* dout = nullptr;
  Strides dout_stride;
  const void* dlse = nullptr;  // (B, H, Nq) like lse, or null
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides dq_stride, dk_stride, dv_stride;
  void* dbias = nullptr;  // (B, H, nqb, nkb) like BlockSpec::bias; zero at inactive pairs
  bool deterministic = true;
};

}  // namespace longtape::attention::fused
