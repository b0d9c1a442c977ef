// Views of the `longtape bench` JSON document: CSV, markdown, a terminal table and gnuplot plots.
// The same functions read the document of benchmarks/torch_bench.py, which shares the schema.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/report.h"
#include "tensor/error.h"

namespace longtape::bench {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string fixed(double value, int digits) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(digits) << value;
  return os.str();
}

// About three significant digits, scientific notation for very large or small values.
std::string sig3(double value) {
  std::ostringstream os;
  const double a = std::abs(value);
  if (a != 0.0 && (a >= 1e7 || a < 1e-3)) {
    os << std::scientific << std::setprecision(2) << value;
  } else if (a >= 100.0) {
    os << std::fixed << std::setprecision(0) << value;
  } else if (a >= 10.0) {
    os << std::fixed << std::setprecision(1) << value;
  } else if (a >= 1.0) {
    os << std::fixed << std::setprecision(2) << value;
  } else {
    os << std::setprecision(3) << value;  // three significant digits below 1
  }
  return os.str();
}

std::string text_of(const Json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "";
  const Json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) {
    std::ostringstream os;
    os << std::setprecision(10) << v.get<double>();
    return os.str();
  }
  return v.dump();
}

double number_at(const Json& j, const char* object, const char* key) {
  if (!j.contains(object) || !j[object].is_object() || !j[object].contains(key) || !j[object][key].is_number()) return -1.0;
  return j[object][key].get<double>();
}

bool measured(const Json& row) { return row.value("status", "") == "measured"; }

// What ran a row (`key` "implementation" or "compute_precision"): the forward's, followed by the
// forward+backward's when that phase ran differently, so no cell claims more than ran.
std::string ran_cell(const Json& row, const char* key) {
  std::string cell = text_of(row, key);
  if (row.contains("forward_backward") && row["forward_backward"].is_object()) {
    const std::string fwdbwd = text_of(row["forward_backward"], key);
    if (!fwdbwd.empty() && fwdbwd != cell) cell += " (fwd+bwd: " + fwdbwd + ")";
  }
  return cell;
}

// Key joining a timing row with its max-length row.
std::string series_key(const Json& row) {
  return text_of(row, "variant") + "|" + text_of(row, "config_label") + "|" + text_of(row, "dtype") + "|" +
         text_of(row, "batch") + "|" + text_of(row, "heads") + "|" + text_of(row, "head_dim");
}

std::map<std::string, const Json*> max_len_by_series(const Json& doc) {
  std::map<std::string, const Json*> out;
  if (doc.contains("max_seq_len"))
    for (const Json& row : doc["max_seq_len"]) out[series_key(row)] = &row;
  return out;
}

std::string max_len_cell(const std::map<std::string, const Json*>& max_len, const Json& row) {
  auto it = max_len.find(series_key(row));
  if (it == max_len.end()) return "";
  const Json& m = *it->second;
  if (!measured(m)) return "-";
  std::string cell = text_of(m, "max_seq_len");
  if (m.value("reached_cap", false)) cell = ">=" + cell;
  return cell;
}

std::string csv_escape(const std::string& text) {
  if (text.find_first_of(",\"\n") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string md_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += "\\|";
    else if (c == '\n') out += ' ';
    else out += c;
  }
  return out;
}

std::string machine_summary(const Json& doc) {
  const Json& m = doc.value("machine", Json::object());
  std::string text;
  if (m.contains("gpu") && m["gpu"].is_object()) {
    const Json& g = m["gpu"];
    text += text_of(g, "name") + " (driver " + text_of(g, "driver_version") + ", CUDA " +
            text_of(g, "cuda_runtime_version") + ")";
  } else {
    text += "CPU only";
  }
  text += "; CPU " + text_of(m, "cpu") + " (" + text_of(m, "cpu_threads") + " threads)";
  return text;
}

}  // namespace

std::string csv_report(const Json& doc) {
  std::ostringstream out;
  const char* header =
      "tool,variant,status,reason,config_label,device,dtype,implementation,compute_precision,batch,seq_len,heads,"
      "head_dim,causal,attended_pairs,pairs_method,fwd_median_ms,fwd_min_ms,fwd_tokens_per_s,fwd_tflops,"
      "fwd_peak_allocated_bytes,fwd_peak_reserved_bytes,fwdbwd_median_ms,fwdbwd_min_ms,fwdbwd_tokens_per_s,"
      "fwdbwd_tflops,fwdbwd_peak_allocated_bytes,fwdbwd_peak_reserved_bytes,fwdbwd_implementation,"
      "fwdbwd_compute_precision,max_seq_len\n";
  out << header;
  const auto max_len = max_len_by_series(doc);
  const std::string tool = text_of(doc, "tool");
  for (const Json& row : doc.value("results", Json::array())) {
    std::vector<std::string> cells = {tool,
                                      text_of(row, "variant"),
                                      text_of(row, "status"),
                                      text_of(row, "reason"),
                                      text_of(row, "config_label"),
                                      text_of(row, "device"),
                                      text_of(row, "dtype"),
                                      text_of(row, "implementation"),
                                      text_of(row, "compute_precision"),
                                      text_of(row, "batch"),
                                      text_of(row, "seq_len"),
                                      text_of(row, "heads"),
                                      text_of(row, "head_dim"),
                                      text_of(row, "causal"),
                                      text_of(row, "attended_pairs"),
                                      text_of(row, "pairs_method")};
    for (const char* phase : {"forward", "forward_backward"})
      for (const char* key : {"median_ms", "min_ms", "tokens_per_s", "tflops", "peak_allocated_bytes", "peak_reserved_bytes"}) {
        if (row.contains(phase) && row[phase].is_object() && row[phase].contains(key)) {
          cells.push_back(text_of(row[phase], key));
        } else {
          cells.push_back("");
        }
      }
    const bool has_fwdbwd = row.contains("forward_backward") && row["forward_backward"].is_object();
    for (const char* key : {"implementation", "compute_precision"})
      cells.push_back(has_fwdbwd ? text_of(row["forward_backward"], key) : "");
    cells.push_back(max_len_cell(max_len, row));
    for (size_t i = 0; i < cells.size(); ++i) out << (i ? "," : "") << csv_escape(cells[i]);
    out << "\n";
  }
  return out.str();
}

std::string markdown_report(const Json& doc) {
  std::ostringstream out;
  const Json& config = doc.value("config", Json::object());
  out << "# " << text_of(doc, "tool") << " attention benchmark\n\n";
  out << "- created: " << text_of(doc, "created_utc") << "\n";
  out << "- machine: " << machine_summary(doc) << "\n";
  out << "- command: `" << text_of(config, "command_line") << "`\n";
  out << "- timing: " << text_of(config, "timing") << "; " << text_of(config, "warmup") << " warm-up, "
      << text_of(config, "repeats") << " timed runs\n";
  out << "- useful FLOPs: " << text_of(config, "flops") << "\n";
  out << "- peak memory includes the inputs (q, k, v, output gradient)\n";
  out << "- implementation and precision: what ran each case, as reported after its timed runs (dtype is the "
         "dtype of the inputs)\n\n";

  const auto max_len = max_len_by_series(doc);
  out << "## Time and memory\n\n";
  out << "| variant | config | dtype | implementation | precision | B | N | H | D | fwd ms | fwd TFLOP/s | "
         "fwd+bwd ms | fwd+bwd TFLOP/s | tokens/s (fwd+bwd) | peak MiB (fwd+bwd) | max N | status |\n";
  out << "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n";
  for (const Json& row : doc.value("results", Json::array())) {
    out << "| " << md_escape(text_of(row, "variant")) << " | " << md_escape(text_of(row, "config_label")) << " | "
        << text_of(row, "dtype") << " | " << md_escape(ran_cell(row, "implementation")) << " | "
        << md_escape(ran_cell(row, "compute_precision")) << " | " << text_of(row, "batch") << " | "
        << text_of(row, "seq_len") << " | " << text_of(row, "heads") << " | " << text_of(row, "head_dim") << " | ";
    if (measured(row)) {
      auto tflops = [&](const char* phase) {
        const double t = number_at(row, phase, "tflops");
        return t >= 0 ? sig3(t) : std::string("-");
      };
      out << sig3(number_at(row, "forward", "median_ms")) << " | " << tflops("forward") << " | "
          << sig3(number_at(row, "forward_backward", "median_ms")) << " | " << tflops("forward_backward") << " | "
          << sig3(number_at(row, "forward_backward", "tokens_per_s")) << " | "
          << fixed(number_at(row, "forward_backward", "peak_allocated_bytes") / kMiB, 1) << " | "
          << max_len_cell(max_len, row) << " | ok |\n";
    } else {
      out << "- | - | - | - | - | - | " << max_len_cell(max_len, row) << " | " << text_of(row, "status") << ": "
          << md_escape(text_of(row, "reason")) << " |\n";
    }
  }

  if (doc.contains("max_seq_len") && !doc["max_seq_len"].empty()) {
    out << "\n## Longest sequence within " << text_of(config, "max_len_budget_gib")
        << " GiB (forward+backward peak allocated, binary search)\n\n";
    out << "| variant | config | dtype | B | H | D | max N | peak MiB at max N | probes | seconds | note |\n";
    out << "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|\n";
    for (const Json& row : doc["max_seq_len"]) {
      std::string note = text_of(row, "note");
      if (!measured(row)) note = text_of(row, "status") + ": " + text_of(row, "reason");
      if (row.value("reached_cap", false)) note = "reached the search cap " + text_of(row, "cap") + (note.empty() ? "" : "; " + note);
      out << "| " << md_escape(text_of(row, "variant")) << " | " << md_escape(text_of(row, "config_label")) << " | "
          << text_of(row, "dtype") << " | " << text_of(row, "batch") << " | " << text_of(row, "heads") << " | "
          << text_of(row, "head_dim") << " | " << text_of(row, "max_seq_len") << " | "
          << fixed(row.value("peak_allocated_bytes", 0.0) / kMiB, 1) << " | "
          << (row.contains("probes") ? row["probes"].size() : 0) << " | " << fixed(row.value("seconds", 0.0), 1)
          << " | " << md_escape(note) << " |\n";
    }
  }

  if (doc.contains("quality") && !doc["quality"].empty()) {
    out << "\n## Quality: recall accuracy after a fixed training budget\n\n";
    out << "| variant | config | implementation | precision | steps | T | batch | accuracy | chance | final loss | "
           "ms/step | status |\n";
    out << "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|\n";
    for (const Json& row : doc["quality"]) {
      out << "| " << md_escape(text_of(row, "variant")) << " | " << md_escape(text_of(row, "config_label")) << " | "
          << md_escape(text_of(row, "implementation")) << " | " << md_escape(text_of(row, "compute_precision")) << " | "
          << text_of(row, "steps") << " | " << text_of(row, "seq_len") << " | " << text_of(row, "batch") << " | ";
      if (measured(row)) {
        out << fixed(row["accuracy"].get<double>(), 3) << " | " << fixed(row["chance"].get<double>(), 3) << " | "
            << fixed(row["final_loss"].get<double>(), 3) << " | " << sig3(row["ms_per_step"].get<double>()) << " | ok |\n";
      } else {
        out << "- | - | - | - | " << text_of(row, "status") << ": " << md_escape(text_of(row, "reason")) << " |\n";
      }
    }
  }

  if (doc.contains("notes") && !doc["notes"].empty()) {
    out << "\n## Notes\n\n";
    for (const Json& note : doc["notes"]) out << "- " << note.get<std::string>() << "\n";
  }
  return out.str();
}

std::string terminal_table(const Json& doc) {
  std::ostringstream out;
  const auto max_len = max_len_by_series(doc);
  auto cut = [](std::string s, size_t width) {
    if (s.size() > width) s = s.substr(0, width - 1) + "~";
    return s;
  };
  size_t config_width = 8;
  for (const Json& row : doc.value("results", Json::array()))
    config_width = std::max(config_width, text_of(row, "config_label").size() + 2);
  config_width = std::min<size_t>(config_width, 60);
  const int cw = static_cast<int>(config_width);
  // What ran each row; skipped rows that never ran say "none".
  size_t impl_width = 6, precision_width = 11;
  for (const Json& row : doc.value("results", Json::array())) {
    impl_width = std::max(impl_width, ran_cell(row, "implementation").size() + 2);
    precision_width = std::max(precision_width, ran_cell(row, "compute_precision").size() + 2);
  }
  impl_width = std::min<size_t>(impl_width, 40);
  precision_width = std::min<size_t>(precision_width, 60);
  const int iw = static_cast<int>(impl_width), pw = static_cast<int>(precision_width);
  out << std::left << std::setw(14) << "variant" << std::setw(cw) << "config" << std::setw(6) << "dtype"
      << std::setw(iw) << "impl" << std::setw(pw) << "precision" << std::right
      << std::setw(8) << "N" << std::setw(11) << "fwd ms" << std::setw(12) << "f+b ms" << std::setw(9) << "f+b TF/s"
      << std::setw(11) << "peak MiB" << std::setw(9) << "max N" << "  status\n";
  for (const Json& row : doc.value("results", Json::array())) {
    out << std::left << std::setw(14) << cut(text_of(row, "variant"), 13) << std::setw(cw)
        << cut(text_of(row, "config_label"), config_width - 1) << std::setw(6) << text_of(row, "dtype")
        << std::setw(iw) << cut(ran_cell(row, "implementation"), impl_width - 1) << std::setw(pw)
        << cut(ran_cell(row, "compute_precision"), precision_width - 1) << std::right << std::setw(8)
        << text_of(row, "seq_len");
    if (measured(row)) {
      const double tf = number_at(row, "forward_backward", "tflops");
      out << std::setw(11) << sig3(number_at(row, "forward", "median_ms")) << std::setw(12)
          << sig3(number_at(row, "forward_backward", "median_ms")) << std::setw(9) << (tf >= 0 ? sig3(tf) : "-")
          << std::setw(11) << fixed(number_at(row, "forward_backward", "peak_allocated_bytes") / kMiB, 1) << std::setw(9)
          << max_len_cell(max_len, row) << "  ok\n";
    } else {
      out << std::setw(11) << "-" << std::setw(12) << "-" << std::setw(9) << "-" << std::setw(11) << "-" << std::setw(9)
          << max_len_cell(max_len, row) << "  " << text_of(row, "status") << ": " << cut(text_of(row, "reason"), 100)
          << "\n";
    }
  }
  if (doc.contains("quality") && !doc["quality"].empty()) {
    out << "\nquality (recall accuracy):\n";
    for (const Json& row : doc["quality"]) {
      out << "  " << std::left << std::setw(14) << text_of(row, "variant");
      if (measured(row))
        out << "accuracy " << fixed(row["accuracy"].get<double>(), 3) << " (chance " << fixed(row["chance"].get<double>(), 3)
            << "), " << sig3(row["ms_per_step"].get<double>()) << " ms/step\n";
      else
        out << text_of(row, "status") << ": " << text_of(row, "reason") << "\n";
    }
  }
  return out.str();
}

bool program_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (dir.empty()) continue;
    const std::string candidate = dir + "/" + program;
    if (access(candidate.c_str(), X_OK) == 0) return true;
  }
  return false;
}

std::vector<std::string> write_plots(const Json& doc, const std::filesystem::path& dir, std::vector<std::string>& notes) {
  // Series: one line per (variant, config, and shape when the grid has several shapes), per dtype.
  struct Point {
    int64_t n;
    double ms;
    double mib;
  };
  std::map<std::string, std::map<std::string, std::vector<Point>>> by_dtype;  // dtype -> title -> points
  std::set<std::string> shapes;
  for (const Json& row : doc.value("results", Json::array()))
    shapes.insert(text_of(row, "batch") + "/" + text_of(row, "heads") + "/" + text_of(row, "head_dim"));
  for (const Json& row : doc.value("results", Json::array())) {
    if (!measured(row)) continue;
    const std::string label = text_of(row, "config_label");
    std::string title = text_of(row, "variant") + (label.empty() || label == "-" ? "" : " " + label);
    if (shapes.size() > 1)
      title += " B=" + text_of(row, "batch") + " H=" + text_of(row, "heads") + " D=" + text_of(row, "head_dim");
    by_dtype[text_of(row, "dtype")][title].push_back({row["seq_len"].get<int64_t>(),
                                                       number_at(row, "forward_backward", "median_ms"),
                                                       number_at(row, "forward_backward", "peak_allocated_bytes") / kMiB});
  }
  if (by_dtype.empty()) {
    notes.push_back("plots not drawn: no measured case");
    return {};
  }

  std::ostringstream script;
  script << "# gnuplot script written by `longtape bench`; run `gnuplot plots.gp` in this folder.\n"
         << "if (strstrt(GPVAL_TERMINALS, \"pngcairo\") > 0) {\n"
         << "  set terminal pngcairo size 1000,800 noenhanced font \",11\"\n"
         << "} else {\n"
         << "  set terminal png size 1000,800 noenhanced\n"
         << "}\n"
         << "set logscale x 2\nset logscale y 10\nset grid xtics ytics mxtics mytics\nset key below left Left reverse\n"
         << "set xlabel \"sequence length N\"\nset format x \"%.0f\"\n";
  const std::string where = text_of(doc, "tool") + ", " + machine_summary(doc);
  std::vector<std::string> pngs;
  for (const auto& [dtype, series] : by_dtype) {
    const std::string data = "plot_" + dtype + ".dat";
    std::ofstream out(dir / data);
    LT_CHECK(static_cast<bool>(out), "bench: cannot write ", (dir / data).string());
    std::vector<std::string> titles;
    for (const auto& [title, points] : series) {
      out << "# " << title << "\n# N fwd+bwd_ms peak_MiB\n";
      std::vector<Point> sorted = points;
      std::sort(sorted.begin(), sorted.end(), [](const Point& a, const Point& b) { return a.n < b.n; });
      for (const Point& p : sorted) out << p.n << " " << p.ms << " " << p.mib << "\n";
      out << "\n\n";
      titles.push_back(title);
    }
    auto plot = [&](const std::string& png, const std::string& ylabel, int column, const std::string& what) {
      script << "set output \"" << png << "\"\n"
             << "set title \"" << what << " (" << dtype << ")\\n" << where << "\"\n"
             << "set ylabel \"" << ylabel << "\"\nplot ";
      for (size_t i = 0; i < titles.size(); ++i) {
        std::string title = titles[i];
        std::replace(title.begin(), title.end(), '"', '\'');
        script << (i ? ", \\\n     " : "") << "\"" << data << "\" index " << i << " using 1:" << column
               << " with linespoints lw 2 title \"" << title << "\"";
      }
      script << "\nunset output\n";
      pngs.push_back(png);
    };
    plot("time_vs_n_" + dtype + ".png", "forward+backward time (ms, median)", 2, "forward+backward time vs N");
    plot("memory_vs_n_" + dtype + ".png", "forward+backward peak allocated (MiB)", 3, "peak memory vs N");
  }
  {
    std::ofstream out(dir / "plots.gp");
    LT_CHECK(static_cast<bool>(out), "bench: cannot write ", (dir / "plots.gp").string());
    out << script.str();
  }
  if (!program_on_path("gnuplot")) {
    notes.push_back("plots not drawn: gnuplot is not on PATH (install gnuplot-nox, then run `gnuplot plots.gp` in " +
                    dir.string() + ")");
    return {};
  }
  std::string quoted = std::filesystem::absolute(dir).string();
  std::string escaped;
  for (char c : quoted) escaped += c == '\'' ? std::string("'\\''") : std::string(1, c);
  const std::string command = "cd '" + escaped + "' && gnuplot plots.gp > plots.log 2>&1";
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    notes.push_back("plots not drawn: gnuplot failed (see " + (dir / "plots.log").string() + ")");
    return {};
  }
  return pngs;
}

size_t measured_rows(const Json& doc) {
  size_t n = 0;
  for (const char* section : {"results", "max_seq_len", "quality"})
    if (doc.contains(section))
      for (const Json& row : doc[section]) n += row.value("status", "") == "measured" ? 1 : 0;
  return n;
}

}  // namespace longtape::bench
