// The Python predictor's pipeline in C++: the same preprocessing (qmedsam.data.preprocess), the same OpenVINO
// configuration (qmedsam.inference.runtime.OpenVINOEngine) and the same prompt rules (qmedsam.inference.segment).
#pragma once

#include <openvino/openvino.hpp>

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "case.hpp"

namespace qmedsam {

constexpr int kModelSize = 256;

struct Geometry {
  int height = 0, width = 0;          // original
  int new_height = 0, new_width = 0;  // resized (longest side = 256)
  double scale() const { return static_cast<double>(kModelSize) / std::max(height, width); }
};

Geometry geometry_for(int height, int width);

struct Engine {
  Engine(const std::string& model_dir, const std::string& precision, int threads, const std::string& cache_dir);
  std::vector<float> encode(const std::vector<float>& image);  // (1, 3, 256, 256) -> (1, 256, 64, 64)
  std::vector<float> decode(const std::vector<float>& embedding, const std::vector<std::array<float, 4>>& boxes);
  ov::Core core;
  ov::CompiledModel encoder, decoder;
  ov::InferRequest encode_request, decode_request;
  // A decoder exported with clicks also takes `points` (B, N, 2) and `point_labels` (B, N); boxes alone
  // feed N = 0 (the same tokens and cost as a box-only decoder). Older model folders lack both inputs.
  bool decoder_takes_clicks = false;
};

// Label map of a validated case: (H, W) or (D, H, W), label i + 1 for box i, later boxes on top.
std::vector<uint32_t> segment_case(Engine& engine, const Case& c, const std::string& prompt_mode, int batch);

}  // namespace qmedsam
