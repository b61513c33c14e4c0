// libFuzzer target: one .npy member (header parser, dtype, checked sizes, byte order, Fortran order), then the
// case checks with it as the image and as the boxes. A zip member's CRC-32 would stop a mutated member before
// the parser, so the parser gets its own target.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../src/case.hpp"
#include "../src/npz.hpp"

namespace {

qmedsam::Array small(const std::vector<int64_t>& shape, const char* descr, char kind, int itemsize, int64_t fill) {
  qmedsam::Array array;
  array.kind = kind, array.itemsize = itemsize, array.descr = descr, array.shape = shape;
  array.data.assign(static_cast<size_t>(array.size()) * itemsize, 0);
  if (kind == 'i') {
    for (int64_t i = 0; i < array.size(); ++i) {
      const int64_t value = (i % 2 ? 6 : 1) * fill;  // [[1, 1, (1,) 6, 6, (6)]]-like rows
      std::memcpy(&array.data[i * itemsize], &value, itemsize);
    }
  }
  return array;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const qmedsam::Array array = qmedsam::parse_npy(std::vector<uint8_t>(data, data + size), 1u << 24);
    for (const char* name : {"2D_fuzz.npz", "3D_fuzz.npz"}) {
      const bool two_d = name[0] == '2';
      const auto image = two_d ? small({8, 8, 3}, "|u1", 'u', 1, 0) : small({2, 8, 8}, "|u1", 'u', 1, 0);
      const auto boxes = small({1, two_d ? 4 : 6}, "<i8", 'i', 8, 1);
      for (const auto& arrays : {std::map<std::string, qmedsam::Array>{{"imgs", array}, {"boxes", boxes}},
                                 std::map<std::string, qmedsam::Array>{{"imgs", image}, {"boxes", array}}}) {
        try {
          qmedsam::case_from_arrays(name, arrays);
        } catch (const qmedsam::CaseError&) {
        }
      }
    }
  } catch (const qmedsam::NpzError&) {
  }
  return 0;
}
