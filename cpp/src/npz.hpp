// npz (a zip of .npy files) read and written with libzip: exactly the arrays numpy's np.load /
// np.savez_compressed exchange, without pickles. Arrays are held in C order, little-endian.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

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

std::map<std::string, Array> read_npz(const std::string& path);

// Write one array as `<name>.npy` into a deflate-compressed npz, atomically (temporary file + rename).
void write_npz(const std::string& path, const std::string& name, const Array& array);

}  // namespace qmedsam
