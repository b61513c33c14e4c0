// npz (a zip of .npy files) read and written with libzip: exactly the arrays numpy's np.load /
// np.savez_compressed exchange, without pickles. Arrays are held in C order, little-endian.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <zip.h>

namespace qmedsam {

// What np.load(allow_pickle=False) would refuse, or a file that is not a readable npz.
struct NpzError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Array {
  char kind = 'u';       // numpy dtype kind: 'u', 'i', 'f', 'b' (numeric), anything else is kept as-is
  int itemsize = 1;      // bytes per element
  std::string descr;     // numpy's dtype string as read, e.g. "<f4"
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // C order, native (little-endian) byte order

  int64_t size() const;
  size_t ndim() const { return shape.size(); }
  bool numeric() const { return kind == 'u' || kind == 'i' || kind == 'f'; }
  double at(int64_t index) const;  // element as double (numeric and bool kinds)
  std::string dtype_name() const;  // numpy's str(dtype), e.g. "uint8", "float32", "<U1"
  std::string shape_text() const;  // Python's tuple repr, e.g. "(40, 60, 4)" or "(3,)"
};

// The npz contract of qmedsam.data.npz (README "Input limits"), with the same rules and messages: at most 64
// members, stored or deflate, CRC-32 verified; .npy headers <= 10,000 bytes parsed by a bounded hand parser;
// bool / (u)int8-64 / float16-64 only; dimensions >= 0 whose checked byte product equals the member's data;
// everything decoded within `max_bytes` (default 4 GiB, env QMEDSAM_MAX_CASE_BYTES). NpzError names the rule.
constexpr const char* kMaxBytesEnv = "QMEDSAM_MAX_CASE_BYTES";
constexpr uint64_t kDefaultMaxBytes = 4ull << 30;
uint64_t max_case_bytes();
std::map<std::string, Array> read_npz(const std::string& path, uint64_t max_bytes);
std::map<std::string, Array> read_npz_bytes(const uint8_t* data, size_t size, uint64_t max_bytes);  // the fuzz target's entry
Array parse_npy(const std::vector<uint8_t>& raw, uint64_t max_bytes);  // one member's bytes (the other fuzz target)
std::map<std::string, Array> read_npz_source(zip_source_t* source, uint64_t max_bytes);  // takes the source

// Call `write(temporary)` to fill a temporary file beside `path`, then rename it into place (mode 0644), so
// readers never see half a file: every output of qmedsam-cpp goes through this.
void write_atomically(const std::string& path, const std::function<void(const std::string& temporary)>& write);

// Write one array as `<name>.npy` into a deflate-compressed npz, atomically.
void write_npz(const std::string& path, const std::string& name, const Array& array);

}  // namespace qmedsam
