#include "case.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

namespace qmedsam {

namespace {

constexpr int64_t kMaxImageAxis = 65535;           // qmedsam.data.cases.MAX_IMAGE_AXIS: OpenCV indexes with int
constexpr int64_t kMaxBoxCoordinate = 2147483647;  // qmedsam.data.cases.MAX_BOX_COORDINATE

std::string file_name(const std::string& path) { return std::filesystem::path(path).filename().string(); }

std::string join_ints(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

int dimension_from_name(const std::string& path) {
  const std::string name = file_name(path);
  if (name.size() < 2) return 0;
  const std::string prefix = {static_cast<char>(std::toupper(name[0])), static_cast<char>(std::toupper(name[1]))};
  return prefix == "2D" ? 2 : prefix == "3D" ? 3 : 0;
}

int image_dimension(const Array& image) {
  const auto n = image.ndim();
  return (n == 2 || (n == 3 && (image.shape[2] == 1 || image.shape[2] == 3 || image.shape[2] == 4))) ? 2 : 3;
}

// (H, W, C) of `image` -> (H, W, 3), channel c of the output read from channel `source(c)` of the input.
Array to_three_channels(const Array& image, int64_t channels, bool repeat) {
  Array out = image;
  const int64_t pixels = image.shape[0] * image.shape[1];
  out.shape = {image.shape[0], image.shape[1], 3};
  out.data.assign(static_cast<size_t>(pixels) * 3 * image.itemsize, 0);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int c = 0; c < 3; ++c) {
      const int64_t from = p * channels + (repeat ? 0 : c);
      std::memcpy(&out.data[(p * 3 + c) * image.itemsize], &image.data[from * image.itemsize], image.itemsize);
    }
  }
  return out;
}

Array validate_image(const std::string& path, Array image, int dimension, std::vector<std::string>& warnings) {
  if (!image.numeric() && image.kind != 'b') {
    throw CaseError(path + ": key 'imgs' has dtype " + image.dtype_name() + "; expected a numeric image (uint8 preferred)");
  }
  if (dimension == 2) {
    if (image.ndim() == 2) {
      image.shape.push_back(1);
      image = to_three_channels(image, 1, true);
    } else if (image.ndim() == 3 && image.shape[2] == 1) {
      image = to_three_channels(image, 1, true);
    } else if (image.ndim() == 3 && image.shape[2] == 4) {
      image = to_three_channels(image, 4, false);
      warnings.push_back(file_name(path) + ": key 'imgs' is RGBA (" + std::to_string(image.shape[0]) + ", " +
                         std::to_string(image.shape[1]) + ", 4); alpha channel dropped");
    } else if (!(image.ndim() == 3 && image.shape[2] == 3)) {
      throw CaseError(path + ": key 'imgs' has shape " + image.shape_text() +
                      "; expected (H, W, 3), (H, W, 4) RGBA, (H, W, 1) or (H, W) for a 2D case");
    }
  } else if (image.ndim() != 3) {
    throw CaseError(path + ": key 'imgs' has shape " + image.shape_text() + "; expected (D, H, W) for a 3D case");
  }
  if (*std::min_element(image.shape.begin(), image.shape.end()) == 0) {
    throw CaseError(path + ": key 'imgs' is empty (shape " + image.shape_text() + ")");
  }
  if (*std::max_element(image.shape.begin(), image.shape.end()) > kMaxImageAxis) {
    throw CaseError(path + ": key 'imgs' has shape " + image.shape_text() + "; expected at most " +
                    std::to_string(kMaxImageAxis) + " along each axis");
  }
  if (image.kind == 'f') {
    for (int64_t i = 0; i < image.size(); ++i) {
      if (!std::isfinite(image.at(i))) throw CaseError(path + ": key 'imgs' contains NaN or infinite values");
    }
  }
  if (image.kind == 'b') {  // bool -> uint8 (same bytes: 0 / 1)
    image.kind = 'u';
    image.descr = "|u1";
  }
  return image;
}

std::vector<std::array<int64_t, 6>> validate_boxes(const std::string& path, Array boxes, int dimension,
                                                   const std::vector<int64_t>& shape, std::vector<std::string>& warnings) {
  const int width = dimension == 2 ? 4 : 6;
  if (!boxes.numeric()) throw CaseError(path + ": key 'boxes' has dtype " + boxes.dtype_name() + "; expected numbers");
  if (boxes.ndim() == 1 && boxes.size() == width) boxes.shape = {1, width};
  if (boxes.size() == 0) {
    throw CaseError(path + ": key 'boxes' is empty; expected at least one box of " + std::to_string(width) + " numbers");
  }
  if (boxes.ndim() != 2 || boxes.shape[1] != width) {
    throw CaseError(path + ": key 'boxes' has shape " + boxes.shape_text() + "; expected (N, " + std::to_string(width) +
                    ") for a " + std::to_string(dimension) + "D case");
  }
  const int64_t n = boxes.shape[0];
  std::set<int64_t> bad_rows;
  for (int64_t i = 0; i < boxes.size(); ++i) {
    if (!std::isfinite(boxes.at(i))) bad_rows.insert(i / width);
  }
  if (!bad_rows.empty()) {
    throw CaseError(path + ": key 'boxes' has NaN or infinite values in rows " +
                    join_ints(std::vector<int64_t>(bad_rows.begin(), bad_rows.end())));
  }
  std::set<int64_t> beyond_rows;
  for (int64_t i = 0; i < boxes.size(); ++i) {
    if (std::fabs(boxes.at(i)) > static_cast<double>(kMaxBoxCoordinate)) beyond_rows.insert(i / width);
  }
  if (!beyond_rows.empty()) {
    throw CaseError(path + ": key 'boxes' has values beyond +-" + std::to_string(kMaxBoxCoordinate) + " in rows " +
                    join_ints(std::vector<int64_t>(beyond_rows.begin(), beyond_rows.end())) + "; expected pixel coordinates");
  }
  const int half = width / 2;
  // Box columns are x, y(, z); array axes are (y, x) or (z, y, x).
  const std::vector<int64_t> extents = dimension == 2 ? std::vector<int64_t>{shape[1], shape[0]}
                                                      : std::vector<int64_t>{shape[2], shape[1], shape[0]};
  const char* axis_names = "xyz";
  std::vector<std::vector<int64_t>> rows(n, std::vector<int64_t>(width));
  for (int64_t r = 0; r < n; ++r) {
    for (int c = 0; c < width; ++c) rows[r][c] = static_cast<int64_t>(std::nearbyint(boxes.at(r * width + c)));  // np.rint
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int a = 0; a < half; ++a) {
      const int64_t lo = rows[r][a], hi = rows[r][half + a];
      if (hi < lo) {
        throw CaseError(path + ": key 'boxes' row " + std::to_string(r) + " is inverted (" + axis_names[a] + "_max " +
                        std::to_string(hi) + " < " + axis_names[a] + "_min " + std::to_string(lo) + ")");
      }
      if (hi < 0 || lo > extents[a] - 1) {
        throw CaseError(path + ": key 'boxes' row " + std::to_string(r) + " lies outside the image along " + axis_names[a] +
                        " ([" + std::to_string(lo) + ", " + std::to_string(hi) + "] vs size " + std::to_string(extents[a]) + ")");
      }
    }
    if (rows[r][half] == rows[r][0] || rows[r][half + 1] == rows[r][1]) {
      throw CaseError(path + ": key 'boxes' row " + std::to_string(r) + " has zero width or height (" + join_ints(rows[r]) +
                      "); expected x_max > x_min and y_max > y_min");
    }
  }
  std::vector<int64_t> changed;
  std::vector<std::array<int64_t, 6>> out(n, std::array<int64_t, 6>{0, 0, 0, 0, 0, 0});
  for (int64_t r = 0; r < n; ++r) {
    bool any = false;
    for (int a = 0; a < half; ++a) {
      const int64_t lo = std::clamp<int64_t>(rows[r][a], 0, extents[a] - 1);
      const int64_t hi = std::clamp<int64_t>(rows[r][half + a], 0, extents[a] - 1);
      any |= lo != rows[r][a] || hi != rows[r][half + a];
      out[r][a] = lo;
      out[r][half + a] = hi;
    }
    if (any) changed.push_back(r);
  }
  if (!changed.empty()) warnings.push_back(file_name(path) + ": boxes " + join_ints(changed) + " extend outside the image; clipped to it");
  return out;
}

void validate_spacing(const std::string& path, const std::map<std::string, Array>& data, std::vector<std::string>& warnings) {
  const auto found = data.find("spacing");
  if (found == data.end()) return;
  const Array& spacing = found->second;
  bool ok = spacing.numeric() && spacing.size() == 3;
  for (int64_t i = 0; ok && i < 3; ++i) ok = std::isfinite(spacing.at(i)) && spacing.at(i) > 0;
  if (!ok) warnings.push_back(file_name(path) + ": key 'spacing' is not 3 positive numbers; expected 3 positive numbers, ignored");
}

}  // namespace

std::string modality_of(const std::string& name) {
  std::string stem = std::filesystem::path(name).stem().string();
  const auto first = stem.find('_');
  if (first == std::string::npos) return "unknown";
  const auto second = stem.find('_', first + 1);
  return stem.substr(first + 1, second == std::string::npos ? std::string::npos : second - first - 1);
}

Case read_case(const std::string& path) {
  std::map<std::string, Array> data;
  std::error_code ignored;
  if (!std::filesystem::exists(path, ignored)) throw CaseError(path + ": file not found");
  if (!std::filesystem::is_regular_file(path, ignored)) throw CaseError(path + ": not a regular file");
  try {
    data = read_npz(path, max_case_bytes());
  } catch (const NpzError& error) {
    throw CaseError(path + ": not a readable .npz (" + error.what() + ")");
  }
  return case_from_arrays(path, data);
}

Case case_from_arrays(const std::string& path, const std::map<std::string, Array>& data) {
  for (const char* key : {"imgs", "boxes"}) {
    if (!data.count(key)) {
      std::string found;
      for (const auto& [name, array] : data) found += (found.empty() ? "'" : ", '") + name + "'";
      throw CaseError(path + ": missing key '" + key + "' (found keys: [" + found + "])");
    }
  }
  const Array& boxes = data.at("boxes");
  int dimension = dimension_from_name(path);
  if (dimension == 0) {
    if (boxes.ndim() == 2 && (boxes.shape[1] == 4 || boxes.shape[1] == 6)) {
      dimension = boxes.shape[1] == 4 ? 2 : 3;
    } else {
      dimension = image_dimension(data.at("imgs"));
    }
  }
  Case result;
  result.path = path;
  result.dimension = dimension;
  result.image = validate_image(path, data.at("imgs"), dimension, result.warnings);
  const std::vector<int64_t> shape = dimension == 2 ? std::vector<int64_t>{result.image.shape[0], result.image.shape[1]}
                                                    : result.image.shape;
  result.boxes = validate_boxes(path, boxes, dimension, shape, result.warnings);
  validate_spacing(path, data, result.warnings);
  return result;
}

}  // namespace qmedsam
