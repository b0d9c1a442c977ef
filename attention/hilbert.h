#pragma once
// Hilbert-curve token ordering (docs/attention.md, Hilbert ordering): tokens laid row-major on a
// height x width grid are visited along a space-filling curve, so that 2-D neighbours stay close in
// the 1-D order. Any rectangle is supported through a generalized Hilbert curve that splits the
// rectangle recursively, preferring even sub-rectangles so that consecutive cells stay grid
// neighbours.
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

namespace longtape::attention {

// perm[i] = row-major position (row * width + col) of the i-th cell along the curve.
// Every position appears exactly once. For power-of-two squares this is the classic Hilbert
// curve. Consecutive cells are 4-neighbours except when the longer side is odd and the shorter
// even (e.g. 4x5), where no such path between the curve's end corners exists and one diagonal
// step is taken. Requires height >= 1 and width >= 1.
std::vector<int64_t> hilbert_permutation(int64_t height, int64_t width);

// inverse[perm[i]] = i. Throws unless perm is a permutation of 0..size-1.
std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& perm);

// Index along the classic Hilbert curve of cell (x, y) of a side x side grid, side a power
// of two and 0 <= x, y < side.
uint64_t hilbert_index(int64_t side, int64_t x, int64_t y);

// "HxW" (or "HXW"), both positive integers -> {H, W}. Throws on anything else.
std::pair<int64_t, int64_t> parse_grid(std::string_view text);

// {side, side} with side * side == n. Throws when n is not a positive perfect square.
std::pair<int64_t, int64_t> square_grid(int64_t n);

// The grid for n tokens: square_grid(n) when `grid` is empty, else parse_grid(grid) whose
// H * W must equal n.
std::pair<int64_t, int64_t> grid_for(int64_t n, std::string_view grid);

}  // namespace longtape::attention
