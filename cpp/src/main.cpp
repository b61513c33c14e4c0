// qmedsam-cpp: `qmedsam predict` for challenge case files, in C++ on the OpenVINO C++ API.
// Same inputs (case .npz files, model folders), same outputs (segs npz per case, timing.csv), same checks.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "case.hpp"
#include "npz.hpp"
#include "segment.hpp"

#ifndef QMEDSAM_DEFAULT_MODEL_DIR
#define QMEDSAM_DEFAULT_MODEL_DIR ""
#endif
#ifndef QMEDSAM_SOURCE_MODEL_DIR
#define QMEDSAM_SOURCE_MODEL_DIR ""
#endif

namespace fs = std::filesystem;
using namespace qmedsam;

namespace {

const char* kUsage =
    "usage: qmedsam-cpp -i INPUT -o OUTPUT [-m MODEL_DIR] [--prompt-mode fixed|propagate] [--precision f32|bf16]\n"
    "                   [--threads N] [--batch N]\n"
    "\n"
    "Segment challenge case files (.npz with imgs and boxes) with an exported OpenVINO model, exactly as\n"
    "`qmedsam predict` does: OUTPUT/<case>.npz holds `segs` (label i = box i), OUTPUT/timing.csv one row per case.\n"
    "A bad case is reported and skipped; the exit code is 1 if any case failed, 2 for a usage error.\n"
    "\n"
    "  -i INPUT          a case .npz or a folder of them\n"
    "  -o OUTPUT         output folder (created)\n"
    "  -m MODEL_DIR      encoder.xml + decoder.xml from `qmedsam export` (default: the shipped int8 model,\n"
    "                    installed in " QMEDSAM_DEFAULT_MODEL_DIR ",\n"
    "                    else the source tree's " QMEDSAM_SOURCE_MODEL_DIR ")\n"
    "  --prompt-mode     3D rule: fixed (default; the box on every slice of its z range) or propagate\n"
    "  --precision       OpenVINO inference precision hint: f32 (default) or bf16\n"
    "  --threads N       inference threads (default: all cores)\n"
    "  --batch N         boxes per decoder call (default 16)\n";

std::string default_model() {
  for (const char* candidate : {QMEDSAM_DEFAULT_MODEL_DIR, QMEDSAM_SOURCE_MODEL_DIR}) {
    if (*candidate && fs::is_regular_file(fs::path(candidate) / "encoder.xml")) return candidate;
  }
  return "";
}

struct Options {
  std::string input, output, model = default_model(), prompt_mode = "fixed", precision = "f32";
  int threads = 0, batch = 16;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << kUsage << "qmedsam-cpp: error: " << message << "\n";
  std::exit(2);
}

int positive_int(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const int value = std::stoi(text, &used);
    if (used == text.size() && value >= 1) return value;
  } catch (const std::exception&) {
  }
  usage_error(flag + " expects a whole number >= 1, got '" + text + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "-i" || flag == "--input") o.input = value;
    else if (flag == "-o" || flag == "--output") o.output = value;
    else if (flag == "-m" || flag == "--model") o.model = value;
    else if (flag == "--prompt-mode") o.prompt_mode = value;
    else if (flag == "--precision") o.precision = value;
    else if (flag == "--threads") o.threads = positive_int(flag, value);
    else if (flag == "--batch") o.batch = positive_int(flag, value);
    else usage_error("unknown option " + flag);
  }
  if (o.input.empty() || o.output.empty()) usage_error("-i and -o are required");
  if (o.prompt_mode != "fixed" && o.prompt_mode != "propagate") usage_error("--prompt-mode must be fixed or propagate");
  if (o.precision != "f32" && o.precision != "bf16") usage_error("--precision must be f32 or bf16");
  if (o.model.empty()) usage_error("no model: the shipped int8 model is not installed; pass -m MODEL_DIR");
  if (!fs::is_regular_file(fs::path(o.model) / "encoder.xml") || !fs::is_regular_file(fs::path(o.model) / "decoder.xml")) {
    usage_error(o.model + ": not a model directory (expected encoder.xml and decoder.xml from `qmedsam export`)");
  }
  return o;
}

std::vector<std::string> list_cases(const std::string& input) {
  if (fs::is_regular_file(input)) return {input};
  if (!fs::is_directory(input)) usage_error(input + ": no such file or folder");
  std::vector<std::string> cases;
  for (const auto& entry : fs::directory_iterator(input)) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() == ".npz" && name[0] != '.') cases.push_back((fs::path(input) / name).string());
  }
  std::sort(cases.begin(), cases.end());
  if (cases.empty()) usage_error(input + ": no .npz case files found");
  return cases;
}

// Python's default cache: $QMEDSAM_CACHE, else $XDG_CACHE_HOME/qmedsam, else ~/.cache/qmedsam; + ov_cache.
std::string default_cache_dir() {
  fs::path root;
  if (const char* own = std::getenv("QMEDSAM_CACHE"); own && *own) {
    root = own;
  } else if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    root = fs::path(xdg) / "qmedsam";
  } else {
    const char* home = std::getenv("HOME");
    root = fs::path(home ? home : ".") / ".cache" / "qmedsam";
  }
  fs::create_directories(root / "ov_cache");
  return (root / "ov_cache").string();
}

std::string csv_field(const std::string& value) {
  if (value.find_first_of(",\"\r\n") == std::string::npos) return value;
  std::string quoted = "\"";
  for (char c : value) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

std::string seconds_text(double seconds) {  // Python's repr(round(x, 4))
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.4f", seconds);
  std::string text = buffer;
  while (text.back() == '0' && text[text.size() - 2] != '.') text.pop_back();
  return text;
}

// timing.csv with every row so far, replaced atomically (readers never see half a row).
void write_timing(const std::string& path, const std::string& text) {
  write_atomically(path, [&](const std::string& temporary) {
    std::ofstream stream(temporary, std::ios::binary);
    stream << text;
    if (!stream.flush()) throw std::runtime_error(path + ": cannot write");
  });
}

Array label_array(const std::vector<uint32_t>& segs, const Case& c) {
  Array out;
  const size_t n = c.boxes.size();
  out.itemsize = n <= 0xff ? 1 : n <= 0xffff ? 2 : 4;  // segmentation_dtype: the smallest that holds N
  out.kind = 'u';
  out.descr = out.itemsize == 1 ? "|u1" : out.itemsize == 2 ? "<u2" : "<u4";
  out.shape = c.dimension == 2 ? std::vector<int64_t>{c.height(), c.width()} : std::vector<int64_t>{c.depth(), c.height(), c.width()};
  out.data.resize(segs.size() * out.itemsize);
  for (size_t i = 0; i < segs.size(); ++i) std::memcpy(&out.data[i * out.itemsize], &segs[i], out.itemsize);  // little-endian
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const std::vector<std::string> cases = list_cases(options.input);
  const auto started = std::chrono::steady_clock::now();
  std::unique_ptr<Engine> engine;
  try {
    engine = std::make_unique<Engine>(options.model, options.precision, options.threads, default_cache_dir());
  } catch (const std::exception& error) {
    std::cerr << "qmedsam-cpp: error: cannot load the model in " << options.model << ": " << error.what() << "\n";
    return 2;
  }
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  fs::create_directories(options.output);
  const std::string timing_path = (fs::path(options.output) / "timing.csv").string();
  std::ostringstream timing;
  timing << "case,dimension,modality,objects,seconds,status,message\r\n";
  int failures = 0;
  for (const std::string& path : cases) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string name = fs::path(path).filename().string();
    std::string dimension, objects, status = "ok", message;
    try {
      const Case c = read_case(path);
      dimension = std::to_string(c.dimension) + "D";
      objects = std::to_string(c.boxes.size());
      for (const auto& warning : c.warnings) {
        std::cerr << "warning: " << warning << "\n";
        message += (message.empty() ? "" : "; ") + warning;
      }
      const std::vector<uint32_t> segs = segment_case(*engine, c, options.prompt_mode, options.batch);
      write_npz((fs::path(options.output) / name).string(), "segs", label_array(segs, c));
    } catch (const CaseError& error) {
      ++failures, status = "error", message = error.what();
      std::cerr << "error: " << error.what() << "\n";
    } catch (const std::exception& error) {  // one broken case must not end the batch
      ++failures, status = "error", message = std::string("unexpected failure: ") + error.what();
      std::cerr << "error: " << path << ": unexpected failure: " << error.what() << "\n";
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    timing << csv_field(name) << "," << dimension << "," << csv_field(modality_of(name)) << "," << objects << ","
           << seconds_text(seconds) << "," << status << "," << csv_field(message) << "\r\n";
    write_timing(timing_path, timing.str());  // as each case ends: a kill loses only the case in flight
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::fprintf(stderr, "%zu/%zu cases segmented with qmedsam-cpp (openvino %s) in %.1f s (engine load %.1f s); timing: %s\n",
               cases.size() - failures, cases.size(), options.precision.c_str(), total, load_seconds,
               (fs::path(options.output) / "timing.csv").c_str());
  if (failures) {
    std::fprintf(stderr, "%d case(s) failed; see the errors above and timing.csv\n", failures);
    return 1;
  }
  return 0;
}
