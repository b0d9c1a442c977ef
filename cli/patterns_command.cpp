// `longtape patterns`: one PNG per attention variant showing which (query, key) pairs it attends
// for a small N, read off the variant's own forward pass (attention/pattern_map.h).
//
//   longtape patterns [--variants dense,dilated] [--seq-len 64] [--heads 4] [--segments 16,32,64
//       --dilations 1,2,4] [--mixing lse] [--causal] --out-dir DIR
//
// Each image holds one panel per head (heads differ: dilated offsets, head groups, random
// blocks), rows = queries top to bottom, columns = keys left to right; white = not attended,
// blue = attended once, darker = attended by several branches. DIR/patterns.md lists the images
// with the configuration and the attended pairs of each head.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

#include "attention/config.h"
#include "attention/pattern_map.h"
#include "attention/registry.h"
#include "cli/command_registry.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "cli/variant_flags.h"
#include "io/atomic_file.h"
#include "tensor/error.h"

#ifdef LONGTAPE_WITH_STB
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBIW_WINDOWS_UTF8
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#endif

namespace longtape::cli {

namespace {

struct PatternsArgs {
  std::string variants;
  int64_t n = 64;
  int64_t heads = 4;
  std::string segments = "16,32,64";
  std::string dilations = "1,2,4";
  std::string mixing = "lse";
  bool causal = false;
  VariantFlags flags;
  int cell = 6;  // pixels per (query, key) cell
  std::string out_dir = "patterns";
};

struct Rgb {
  unsigned char r, g, b;
};

// White for "not attended", then darker blues for higher multiplicity.
Rgb color_for(int count) {
  static const Rgb palette[] = {{255, 255, 255}, {86, 150, 214}, {31, 86, 160}, {12, 40, 96}, {5, 15, 50}};
  return palette[std::clamp(count, 0, 4)];
}

// Heads side by side, a gap between panels.
std::vector<unsigned char> render(const attention::PatternMap& map, int cell, int& width, int& height) {
  const int n = static_cast<int>(map.n), heads = static_cast<int>(map.num_heads), gap = std::max(4, cell);
  width = heads * n * cell + (heads - 1) * gap;
  height = n * cell;
  std::vector<unsigned char> pixels(static_cast<size_t>(width) * static_cast<size_t>(height) * 3, 200);
  for (int h = 0; h < heads; ++h) {
    const int x0 = h * (n * cell + gap);
    for (int p = 0; p < n; ++p)
      for (int k = 0; k < n; ++k) {
        const Rgb c = color_for(map.count(h, p, k));
        for (int dy = 0; dy < cell; ++dy)
          for (int dx = 0; dx < cell; ++dx) {
            // A one-pixel grid line between cells when cells are large enough to keep them readable.
            const bool line = cell >= 5 && (dx == cell - 1 || dy == cell - 1);
            const size_t at = (static_cast<size_t>(p * cell + dy) * static_cast<size_t>(width) +
                               static_cast<size_t>(x0 + k * cell + dx)) * 3;
            pixels[at + 0] = line ? static_cast<unsigned char>(c.r * 0.92) : c.r;
            pixels[at + 1] = line ? static_cast<unsigned char>(c.g * 0.92) : c.g;
            pixels[at + 2] = line ? static_cast<unsigned char>(c.b * 0.92) : c.b;
          }
      }
  }
  return pixels;
}

// The picture of `a` (heads panels of n x n cells of cell x cell pixels, RGB) must stay at most
// kMaxImagePixels, checked before anything is computed or written.
constexpr int64_t kMaxImagePixels = int64_t{1} << 26;  // 64 Mpixel, 192 MiB of RGB

void check_image_size(const PatternsArgs& a) {
  const int64_t gap = std::max<int64_t>(4, a.cell);
  const long double width = static_cast<long double>(a.heads) * a.n * a.cell + static_cast<long double>(a.heads - 1) * gap;
  const long double pixels = width * static_cast<long double>(a.n) * a.cell;
  if (pixels <= static_cast<long double>(kMaxImagePixels)) return;
  char size[64];
  std::snprintf(size, sizeof size, "%.0Lf x %lld pixels", width, static_cast<long long>(a.n * a.cell));
  throw FlagError(terms_text({{"--heads", a.heads}, {"--seq-len", a.n}, {"--cell", a.cell}}) + " makes an image of " + size +
                  ", over the limit of " + std::to_string(kMaxImagePixels) + " pixels; lower --cell, --seq-len or --heads");
}

int run_patterns(const PatternsArgs& a) {
  check_image_size(a);
#ifndef LONGTAPE_WITH_STB
  (void)a;
  LT_CHECK(false,
           "longtape patterns: this build has no PNG writer (stb_image_write.h was not found when configuring); "
           "install libstb-dev and re-run cmake");
  return 1;
#else
  LT_CHECK(a.n >= 2 && a.n <= 1024, "--seq-len must be in [2, 1024] (the picture has N x N cells per head), got ", a.n);
  LT_CHECK(a.heads >= 1 && a.heads <= 64, "--heads must be in [1, 64], got ", a.heads);
  LT_CHECK(a.cell >= 1 && a.cell <= 64, "--cell must be in [1, 64] pixels, got ", a.cell);
  std::vector<std::string> variants;
  const std::vector<std::string> registered = attention::registered_attention_names();
  const bool all = a.variants.empty() || a.variants == "all";
  if (all) {
    variants = registered;
  } else {
    variants = split_list(a.variants, ',');
    for (const std::string& v : variants)
      LT_CHECK(std::find(registered.begin(), registered.end(), v) != registered.end(), "--variants: unknown variant '",
               v, "'");
  }

  attention::AttentionConfig config;
  apply_variant_flags(a.flags, config);
  config.num_heads = a.heads;
  config.segment_lengths = attention::parse_int_list(a.segments, "--segments");
  config.dilation_rates = a.dilations.empty() ? std::vector<int64_t>(config.segment_lengths.size(), 1)
                                              : attention::parse_int_list(a.dilations, "--dilations");
  check_list_bound(config.segment_lengths, "--segments");
  check_list_bound(config.dilation_rates, "--dilations");
  config.mixing = attention::parse_mixing(a.mixing);
  config.causal = a.causal;
  if (config.grid.empty()) {
    int64_t h = 1;
    for (int64_t d = 1; d * d <= a.n; ++d)
      if (a.n % d == 0) h = d;
    config.grid = std::to_string(h) + "x" + std::to_string(a.n / h);
  }

  // Every picture is drawn in memory first: a command that fails writes nothing, and each file is
  // replaced atomically, so a folder never holds a half-written PNG or an index of missing files.
  const std::filesystem::path dir(a.out_dir);
  std::ostringstream index;
  index << "# Attention patterns, N = " << a.n << ", " << a.heads << " heads\n\n"
        << "Rows are queries (top to bottom), columns keys (left to right), one panel per head. White: not "
           "attended; blue: attended once; darker: attended by several branches (counted twice in the softmax). "
           "Drawn by `longtape patterns` from each variant's own forward pass.\n\n";
  std::vector<std::pair<std::string, std::vector<unsigned char>>> pngs;
  std::vector<std::string> drawn;
  std::string named_failures;
  for (const std::string& variant : variants) {
    try {
      const attention::PatternMap map = attention::attention_pattern_map(variant, config, a.n);
      int width = 0, height = 0;
      const std::vector<unsigned char> pixels = render(map, a.cell, width, height);
      const std::string file = variant + ".png";
      std::vector<unsigned char> png;
      const int ok = stbi_write_png_to_func(
          [](void* context, void* data, int size) {
            auto* out = static_cast<std::vector<unsigned char>*>(context);
            out->insert(out->end(), static_cast<unsigned char*>(data), static_cast<unsigned char*>(data) + size);
          },
          &png, width, height, 3, pixels.data(), width * 3);
      LT_CHECK(ok != 0, "cannot encode ", file);
      pngs.emplace_back(file, std::move(png));
      std::string per_head;
      for (int64_t h = 0; h < map.num_heads; ++h)
        per_head += (h ? ", " : "") + std::to_string(map.pairs(h));
      index << "## " << variant << "\n\n`" << config_label(variant, config) << "`; attended pairs per head: " << per_head
            << " of " << a.n * a.n << "\n\n![" << variant << "](" << file << ")\n\n";
      drawn.push_back("patterns: " + variant + " -> " + (dir / file).string() + " (" + std::to_string(width) + "x" +
                      std::to_string(height) + ", pairs per head " + per_head + ")");
    } catch (const std::exception& e) {
      if (!all) named_failures += (named_failures.empty() ? "" : "; ") + variant + ": " + e.what();
      index << "## " << variant << "\n\nnot drawn: " << e.what() << "\n\n";
      std::cerr << "patterns: " << variant << " not drawn: " << e.what() << "\n";
    }
  }
  LT_CHECK(named_failures.empty(), "longtape patterns: nothing written to ", dir.string(),
           " because a variant named in --variants could not be drawn: ", named_failures);
  const int written = static_cast<int>(pngs.size());
  LT_CHECK(written > 0, "longtape patterns: no picture was drawn");
  std::filesystem::create_directories(dir);
  for (const auto& [file, png] : pngs) io::write_file_atomic((dir / file).string(), png.data(), png.size());
  const std::string index_text = index.str();
  io::write_file_atomic((dir / "patterns.md").string(), index_text.data(), index_text.size());
  for (const std::string& line : drawn) std::cout << line << "\n";
  return 0;
#endif
}

const RegisterCommand patterns_command(
    "patterns", "draw which (query, key) pairs each attention variant attends, one PNG per variant",
    [](CLI::App& sub) -> std::function<int()> {
      auto a = std::make_shared<PatternsArgs>();
      a->flags.block_size = 8;  // blocks and windows that show at N = 64
      a->flags.window = 16;
      sub.add_option("--variants", a->variants, "comma-separated variants (default: every registered one)");
      sub.add_option("--seq-len,--n", a->n, "sequence length (default 64; --n is a deprecated alias)")->transform(integer_in<int64_t>(2, 1024));
      sub.add_option("--heads", a->heads, "number of heads, one panel each (default 4)")
          ->transform(integer_in<int64_t>(1, 64));
      sub.add_option("--segments", a->segments, "dilated segment lengths (default 16,32,64)");
      sub.add_option("--dilations", a->dilations, "dilation rates (default 1,2,4)");
      sub.add_option("--mixing", a->mixing, "dilated mixing: lse (default) or head_groups");
      sub.add_flag("--causal", a->causal, "causal attention");
      add_variant_flags(sub, a->flags);
      sub.add_option("--cell", a->cell, "pixels per (query, key) cell (default 6)")->transform(integer_in<int>(1, 64));
      sub.add_option("--out-dir", a->out_dir, "folder for the PNG files and patterns.md (default patterns)");
      return [a] { return run_patterns(*a); };
    });

}  // namespace

}  // namespace longtape::cli
