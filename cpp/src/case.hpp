// A challenge case read and validated exactly as qmedsam.data.cases.read_case does: the same checks in the
// same order, the same recoveries (grey -> RGB, RGBA -> RGB, boxes clipped) and the same verdicts.
#pragma once

#include <array>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "npz.hpp"

namespace qmedsam {

struct CaseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  std::string path;
  int dimension = 2;
  Array image;                               // 2D: (H, W, 3); 3D: (D, H, W); bool became uint8
  std::vector<std::array<int64_t, 6>> boxes;  // 2D rows use the first 4 entries
  std::vector<std::string> warnings;

  int64_t depth() const { return dimension == 3 ? image.shape[0] : 1; }
  int64_t height() const { return dimension == 3 ? image.shape[1] : image.shape[0]; }
  int64_t width() const { return dimension == 3 ? image.shape[2] : image.shape[1]; }
};

Case read_case(const std::string& path);

// The checks after the container: keys, dimension, image and boxes (what read_case does once the npz is read).
Case case_from_arrays(const std::string& path, const std::map<std::string, Array>& data);

std::string modality_of(const std::string& file_name);

}  // namespace qmedsam
