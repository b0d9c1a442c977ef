#include "attention/hilbert.h"

#include <cmath>
#include <string>

#include "tensor/error.h"

namespace longtape::attention {

namespace {

int64_t sign(int64_t v) { return (v > 0) - (v < 0); }
int64_t length(int64_t vx, int64_t vy) { return vx != 0 ? (vx < 0 ? -vx : vx) : (vy < 0 ? -vy : vy); }

// A rectangle still to be walked: start corner (x, y), the major axis (ax, ay) along which the
// walk ends, and the minor axis (bx, by). Exactly one component of each axis is nonzero; the
// walk starts at (x, y) and ends at (x, y) + (major length - 1) * major direction.
struct Span {
  int64_t x, y, ax, ay, bx, by;
};

}  // namespace

std::vector<int64_t> hilbert_permutation(int64_t height, int64_t width) {
  LT_CHECK(height >= 1 && width >= 1, "Hilbert grid must have height >= 1 and width >= 1, got ",
           height, "x", width);
  std::vector<int64_t> perm;
  perm.reserve(static_cast<size_t>(height * width));
  auto visit = [&](int64_t x, int64_t y) { perm.push_back(y * width + x); };

  // Explicit stack instead of recursion; sub-spans are pushed last-first so they pop in order.
  std::vector<Span> stack;
  stack.push_back(width >= height ? Span{0, 0, width, 0, 0, height} : Span{0, 0, 0, height, width, 0});
  while (!stack.empty()) {
    const Span s = stack.back();
    stack.pop_back();
    const int64_t major = length(s.ax, s.ay), minor = length(s.bx, s.by);
    const int64_t dax = sign(s.ax), day = sign(s.ay), dbx = sign(s.bx), dby = sign(s.by);
    if (minor == 1) {  // a single row: walk it
      for (int64_t i = 0; i < major; ++i) visit(s.x + i * dax, s.y + i * day);
      continue;
    }
    if (major == 1) {  // a single column: walk it
      for (int64_t i = 0; i < minor; ++i) visit(s.x + i * dbx, s.y + i * dby);
      continue;
    }
    if (2 * major > 3 * minor) {
      // Long and thin: cut across the major axis into two spans walked one after the other.
      // An even first part keeps both parts walkable with neighbour steps.
      int64_t first = major / 2;
      if (first % 2 == 1 && major > 2) ++first;
      const Span head{s.x, s.y, first * dax, first * day, s.bx, s.by};
      const Span tail{s.x + first * dax, s.y + first * day, (major - first) * dax,
                      (major - first) * day, s.bx, s.by};
      stack.push_back(tail);
      stack.push_back(head);
      continue;
    }
    // Hilbert step: go up the minor axis on the near side, across the full major axis, and
    // back down on the far side.
    int64_t up = minor / 2;
    if (up % 2 == 1 && minor > 2) ++up;
    const int64_t near = major / 2;
    const Span climb{s.x, s.y, up * dbx, up * dby, near * dax, near * day};
    const Span across{s.x + up * dbx, s.y + up * dby, s.ax, s.ay, (minor - up) * dbx,
                      (minor - up) * dby};
    const Span descend{s.x + (major - 1) * dax + (up - 1) * dbx,
                       s.y + (major - 1) * day + (up - 1) * dby,
                       -up * dbx, -up * dby, -(major - near) * dax, -(major - near) * day};
    stack.push_back(descend);
    stack.push_back(across);
    stack.push_back(climb);
  }
  LT_ASSERT(static_cast<int64_t>(perm.size()) == height * width);
  return perm;
}

std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& perm) {
  const int64_t n = static_cast<int64_t>(perm.size());
  std::vector<int64_t> inverse(perm.size(), -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = perm[i];
    LT_CHECK(p >= 0 && p < n, "not a permutation of 0..", n - 1, ": entry ", i, " is ", p);
    LT_CHECK(inverse[p] == -1, "not a permutation: value ", p, " appears twice");
    inverse[p] = i;
  }
  return inverse;
}

uint64_t hilbert_index(int64_t side, int64_t x, int64_t y) {
  LT_CHECK(side >= 1 && (side & (side - 1)) == 0, "Hilbert side must be a power of two, got ", side);
  LT_CHECK(x >= 0 && x < side && y >= 0 && y < side, "Hilbert cell (", x, ", ", y,
           ") outside the ", side, "x", side, " grid");
  uint64_t index = 0;
  for (int64_t half = side / 2; half > 0; half /= 2) {
    const int64_t right = (x & half) ? 1 : 0;
    const int64_t top = (y & half) ? 1 : 0;
    index += static_cast<uint64_t>(half) * static_cast<uint64_t>(half) *
             static_cast<uint64_t>((3 * right) ^ top);
    // Rotate the quadrant back into the curve's base orientation for the next level.
    if (top == 0) {
      if (right == 1) {
        x = side - 1 - x;
        y = side - 1 - y;
      }
      std::swap(x, y);
    }
  }
  return index;
}

namespace {
int64_t parse_positive(std::string_view digits, std::string_view whole) {
  LT_CHECK(!digits.empty() && digits.size() <= 12, "grid must look like HxW with positive integers ",
           "(e.g. 32x64), got '", whole, "'");
  int64_t value = 0;
  for (char c : digits) {
    LT_CHECK(c >= '0' && c <= '9', "grid must look like HxW with positive integers (e.g. 32x64), ",
             "got '", whole, "'");
    value = value * 10 + (c - '0');
  }
  LT_CHECK(value > 0, "grid sides must be > 0, got '", whole, "'");
  return value;
}
}  // namespace

std::pair<int64_t, int64_t> parse_grid(std::string_view text) {
  const size_t cut = text.find_first_of("xX");
  LT_CHECK(cut != std::string_view::npos, "grid must look like HxW (e.g. 32x64), got '", text, "'");
  return {parse_positive(text.substr(0, cut), text), parse_positive(text.substr(cut + 1), text)};
}

std::pair<int64_t, int64_t> square_grid(int64_t n) {
  LT_CHECK(n >= 1, "Hilbert ordering needs a sequence length >= 1, got ", n);
  int64_t side = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (side * side > n) --side;  // correct the floating-point estimate to the exact root
  while ((side + 1) * (side + 1) <= n) ++side;
  LT_CHECK(side * side == n, "Hilbert ordering without a grid needs a perfect-square sequence ",
           "length, got N = ", n, " (give grid = HxW with H * W = N)");
  return {side, side};
}

std::pair<int64_t, int64_t> grid_for(int64_t n, std::string_view grid) {
  if (grid.empty()) return square_grid(n);
  const auto hw = parse_grid(grid);
  LT_CHECK(hw.first * hw.second == n, "grid ", grid, " has ", hw.first * hw.second,
           " cells but the sequence has N = ", n, " tokens");
  return hw;
}

}  // namespace longtape::attention
