// libFuzzer target: a whole case file (zip container, .npy members, case validation) as the predictor reads it.
// Anything but NpzError / CaseError escaping, or any sanitizer report, is a finding.
#include <cstddef>
#include <cstdint>

#include "../src/case.hpp"
#include "../src/npz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto arrays = qmedsam::read_npz_bytes(data, size, 1u << 24);
    for (const char* name : {"fuzz.npz", "2D_fuzz.npz", "3D_fuzz.npz"}) {
      try {
        qmedsam::case_from_arrays(name, arrays);
      } catch (const qmedsam::CaseError&) {
      }
    }
  } catch (const qmedsam::NpzError&) {
  }
  return 0;
}
