#include "segment.hpp"

#include <opencv2/imgproc.hpp>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

namespace qmedsam {

namespace {

constexpr int kEmbeddingSize = 256 * 64 * 64;
constexpr int kPropagationMargin = 3;
constexpr size_t kCachedSlices = 256;  // as SliceEncoder's default

// Slice z of the case as (H, W, 3): uint8 stays uint8, float32 stays float32, every other dtype becomes
// float32 (preprocess_image: `if image.dtype not in (uint8, float32): image = image.astype(float32)`).
cv::Mat slice_rgb(const Case& c, int64_t z) {
  const Array& image = c.image;
  const int h = static_cast<int>(c.height()), w = static_cast<int>(c.width());
  const int64_t pixels = static_cast<int64_t>(h) * w;
  const int channels_in = c.dimension == 2 ? 3 : 1;
  const int64_t base = c.dimension == 2 ? 0 : z * pixels;
  const bool is_u8 = image.kind == 'u' && image.itemsize == 1;
  const bool is_f32 = image.kind == 'f' && image.itemsize == 4;
  cv::Mat out(h, w, is_u8 ? CV_8UC3 : CV_32FC3);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int ch = 0; ch < 3; ++ch) {
      const int64_t from = base + p * channels_in + (channels_in == 3 ? ch : 0);
      if (is_u8) {
        out.data[p * 3 + ch] = image.data[from];
      } else if (is_f32) {
        std::memcpy(reinterpret_cast<float*>(out.data) + p * 3 + ch, &image.data[from * 4], 4);
      } else {
        reinterpret_cast<float*>(out.data)[p * 3 + ch] = static_cast<float>(image.at(from));
      }
    }
  }
  return out;
}

cv::Mat resize_to(const cv::Mat& source, const Geometry& g, int interpolation) {
  if (source.rows == g.new_height && source.cols == g.new_width) return source.clone();
  cv::Mat out;
  cv::resize(source, out, cv::Size(g.new_width, g.new_height), 0, 0, interpolation);
  return out;
}

// (1, 3, 256, 256) float32 in [0, 1]: INTER_AREA to the longest side 256, min-max, zero pad bottom/right.
std::vector<float> preprocess(const cv::Mat& rgb, const Geometry& g) {
  cv::Mat resized;
  resize_to(rgb, g, cv::INTER_AREA).convertTo(resized, CV_32FC3);
  const float* values = reinterpret_cast<const float*>(resized.data);
  const size_t count = static_cast<size_t>(resized.total()) * 3;
  float low = values[0], high = values[0];
  for (size_t i = 1; i < count; ++i) {
    low = std::min(low, values[i]);
    high = std::max(high, values[i]);
  }
  // numpy: (resized - low) / max(high - low, 1e-8), float32 arithmetic with the Python floats as float32
  const float denominator = static_cast<float>(std::max(static_cast<double>(high) - static_cast<double>(low), 1e-8));
  std::vector<float> tensor(3 * kModelSize * kModelSize, 0.0f);
  for (int y = 0; y < g.new_height; ++y) {
    for (int x = 0; x < g.new_width; ++x) {
      for (int ch = 0; ch < 3; ++ch) {
        const float v = values[(static_cast<size_t>(y) * g.new_width + x) * 3 + ch];
        tensor[(static_cast<size_t>(ch) * kModelSize + y) * kModelSize + x] = (v - low) / denominator;
      }
    }
  }
  return tensor;
}

std::array<float, 4> scale_box(int64_t x0, int64_t y0, int64_t x1, int64_t y1, const Geometry& g) {
  const double s = g.scale();
  return {static_cast<float>(std::floor(x0 * s)), static_cast<float>(std::floor(y0 * s)),
          static_cast<float>(std::floor(x1 * s)), static_cast<float>(std::floor(y1 * s))};
}

// One box's (256, 256) logits -> (H, W) mask: crop to the resized extent, bilinear to (H, W), logit > 0.
std::vector<uint8_t> postprocess(const float* logits, const Geometry& g) {
  cv::Mat full(kModelSize, kModelSize, CV_32F, const_cast<float*>(logits));
  cv::Mat cropped = full(cv::Rect(0, 0, g.new_width, g.new_height));
  cv::Mat upscaled;
  if (g.new_height == g.height && g.new_width == g.width) {
    upscaled = cropped;
  } else {
    cv::resize(cropped, upscaled, cv::Size(g.width, g.height), 0, 0, cv::INTER_LINEAR);
  }
  std::vector<uint8_t> mask(static_cast<size_t>(g.height) * g.width);
  for (int y = 0; y < g.height; ++y) {
    const float* row = upscaled.ptr<float>(y);
    for (int x = 0; x < g.width; ++x) mask[static_cast<size_t>(y) * g.width + x] = row[x] > 0.0f;
  }
  return mask;
}

// Decode `boxes` against one embedding in chunks of `batch`, painting label labels[i] where box i's mask is.
void paint_boxes(Engine& engine, const std::vector<float>& embedding, const std::vector<std::array<float, 4>>& boxes,
                 const std::vector<uint32_t>& labels, const Geometry& g, uint32_t* target, int batch) {
  const size_t plane = static_cast<size_t>(kModelSize) * kModelSize;
  for (size_t start = 0; start < boxes.size(); start += batch) {
    const size_t stop = std::min(boxes.size(), start + static_cast<size_t>(batch));
    const std::vector<std::array<float, 4>> chunk(boxes.begin() + start, boxes.begin() + stop);
    const std::vector<float> logits = engine.decode(embedding, chunk);
    for (size_t i = 0; i < chunk.size(); ++i) {
      const std::vector<uint8_t> mask = postprocess(logits.data() + i * plane, g);
      for (size_t p = 0; p < mask.size(); ++p) {
        if (mask[p]) target[p] = labels[start + i];
      }
    }
  }
}

// Embeddings of recently encoded slices (least recently used dropped first), as SliceEncoder.
class SliceEncoder {
 public:
  SliceEncoder(Engine& engine, const Case& c, size_t capacity) : engine_(engine), case_(c), capacity_(capacity) {
    geometry = geometry_for(static_cast<int>(c.height()), static_cast<int>(c.width()));
  }
  const std::vector<float>& operator()(int64_t z) {
    auto found = cache_.find(z);
    if (found != cache_.end()) {
      order_.splice(order_.end(), order_, found->second.second);
      return found->second.first;
    }
    std::vector<float> embedding = engine_.encode(preprocess(slice_rgb(case_, z), geometry));
    order_.push_back(z);
    auto inserted = cache_.emplace(z, std::make_pair(std::move(embedding), std::prev(order_.end()))).first;
    if (cache_.size() > capacity_) {
      cache_.erase(order_.front());
      order_.pop_front();
    }
    return inserted->second.first;
  }
  Geometry geometry;

 private:
  Engine& engine_;
  const Case& case_;
  size_t capacity_;
  std::list<int64_t> order_;
  std::unordered_map<int64_t, std::pair<std::vector<float>, std::list<int64_t>::iterator>> cache_;
};

void segment_fixed(Engine& engine, const Case& c, std::vector<uint32_t>& segs, int batch) {
  SliceEncoder encoder(engine, c, 1);
  const size_t plane = static_cast<size_t>(c.height()) * c.width();
  for (int64_t z = 0; z < c.depth(); ++z) {
    std::vector<std::array<float, 4>> boxes;
    std::vector<uint32_t> labels;
    for (size_t i = 0; i < c.boxes.size(); ++i) {
      const auto& b = c.boxes[i];
      if (b[2] <= z && b[5] >= z) {
        boxes.push_back(scale_box(b[0], b[1], b[3], b[4], encoder.geometry));
        labels.push_back(static_cast<uint32_t>(i + 1));
      }
    }
    if (boxes.empty()) continue;
    const std::vector<float> embedding = encoder(z);
    paint_boxes(engine, embedding, boxes, labels, encoder.geometry, segs.data() + z * plane, batch);
  }
}

// The baseline's next-slice prompt (qmedsam.data.preprocess.propagation_box); nullopt when nothing survives.
std::optional<std::array<float, 4>> propagation_box(const std::vector<uint8_t>& mask, uint32_t label, const Geometry& g) {
  const uint8_t value = static_cast<uint8_t>(std::min<uint32_t>(std::max<uint32_t>(label, 1), 255));
  cv::Mat valued(g.height, g.width, CV_8U);
  for (size_t p = 0; p < mask.size(); ++p) valued.data[p] = mask[p] ? value : 0;
  const cv::Mat resized = resize_to(valued, g, cv::INTER_AREA);
  int x0 = resized.cols, y0 = resized.rows, x1 = -1, y1 = -1;
  for (int y = 0; y < resized.rows; ++y) {
    const uint8_t* row = resized.ptr<uint8_t>(y);
    for (int x = 0; x < resized.cols; ++x) {
      if (row[x]) {
        x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      }
    }
  }
  if (x1 < 0) return std::nullopt;
  return std::array<float, 4>{static_cast<float>(std::max(0, x0 - kPropagationMargin)),
                              static_cast<float>(std::max(0, y0 - kPropagationMargin)),
                              static_cast<float>(std::min(kModelSize, x1 + kPropagationMargin)),
                              static_cast<float>(std::min(kModelSize, y1 + kPropagationMargin))};
}

void segment_propagate(Engine& engine, const Case& c, std::vector<uint32_t>& segs) {
  SliceEncoder encoder(engine, c, kCachedSlices);
  const Geometry& g = encoder.geometry;
  const size_t plane = static_cast<size_t>(c.height()) * c.width();
  for (size_t index = 0; index < c.boxes.size(); ++index) {
    const auto& b = c.boxes[index];
    const uint32_t label = static_cast<uint32_t>(index + 1);
    const int64_t z0 = b[2], z1 = b[5];
    const int64_t z_mid = static_cast<int64_t>((z1 - z0) / 2.0 + z0);
    const std::array<float, 4> original = scale_box(b[0], b[1], b[3], b[4], g);
    std::map<int64_t, std::vector<uint8_t>> masks;
    auto walk = [&](int64_t from, int64_t to, int64_t step, const std::vector<uint8_t>* previous) {
      for (int64_t z = from; step > 0 ? z <= to : z >= to; z += step) {
        const std::vector<float>& embedding = encoder(z);
        std::optional<std::array<float, 4>> box;
        if (previous != nullptr) box = propagation_box(*previous, label, g);
        const std::vector<float> logits = engine.decode(embedding, {box ? *box : original});
        masks[z] = postprocess(logits.data(), g);
        previous = &masks[z];
      }
    };
    walk(z_mid, z1, 1, nullptr);
    walk(z_mid - 1, z0, -1, &masks.at(z_mid));
    for (const auto& [z, mask] : masks) {
      for (size_t p = 0; p < plane; ++p) {
        if (mask[p]) segs[z * plane + p] = label;
      }
    }
  }
}

}  // namespace

Geometry geometry_for(int height, int width) {
  Geometry g;
  g.height = height;
  g.width = width;
  const double scale = static_cast<double>(kModelSize) / std::max(height, width);
  g.new_height = static_cast<int>(height * scale + 0.5);
  g.new_width = static_cast<int>(width * scale + 0.5);
  return g;
}

Engine::Engine(const std::string& model_dir, const std::string& precision, int threads, const std::string& cache_dir) {
  ov::AnyMap config{{ov::hint::inference_precision.name(), precision},
                    {ov::hint::performance_mode.name(), ov::hint::PerformanceMode::LATENCY},
                    {ov::cache_dir.name(), cache_dir}};
  if (threads > 0) {
    config[ov::inference_num_threads.name()] = threads;
    // OpenVINO pins a process using fewer threads than it may run on to its first cores: two such processes on one
    // machine shared a core, each at half speed. Unpinned, the OS spreads them (as the Python engine does).
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0 && threads < CPU_COUNT(&allowed)) {
      config[ov::hint::enable_cpu_pinning.name()] = false;
    }
  }
  encoder = core.compile_model(model_dir + "/encoder.xml", "CPU", config);
  decoder = core.compile_model(model_dir + "/decoder.xml", "CPU", config);
  encode_request = encoder.create_infer_request();
  decode_request = decoder.create_infer_request();
  bool has_points = false, has_labels = false;
  for (const auto& input : decoder.inputs()) {
    has_points = has_points || input.get_names().count("points") > 0;
    has_labels = has_labels || input.get_names().count("point_labels") > 0;
  }
  decoder_takes_clicks = has_points && has_labels;
}

std::vector<float> Engine::encode(const std::vector<float>& image) {
  ov::Tensor input(ov::element::f32, {1, 3, kModelSize, kModelSize}, const_cast<float*>(image.data()));
  encode_request.set_tensor("image", input);
  encode_request.infer();
  const ov::Tensor output = encode_request.get_output_tensor(0);
  const float* data = output.data<const float>();
  return std::vector<float>(data, data + kEmbeddingSize);
}

std::vector<float> Engine::decode(const std::vector<float>& embedding, const std::vector<std::array<float, 4>>& boxes) {
  std::vector<float> flat;
  for (const auto& box : boxes) flat.insert(flat.end(), box.begin(), box.end());
  ov::Tensor embedding_tensor(ov::element::f32, {1, 256, 64, 64}, const_cast<float*>(embedding.data()));
  ov::Tensor boxes_tensor(ov::element::f32, {boxes.size(), 1, 4}, flat.data());
  decode_request.set_tensor("image_embedding", embedding_tensor);
  decode_request.set_tensor("boxes", boxes_tensor);
  if (decoder_takes_clicks) {  // a box alone: zero clicks per box
    decode_request.set_tensor("points", ov::Tensor(ov::element::f32, {boxes.size(), 0, 2}));
    decode_request.set_tensor("point_labels", ov::Tensor(ov::element::f32, {boxes.size(), 0}));
  }
  decode_request.infer();
  const ov::Tensor output = decode_request.get_output_tensor(0);
  const float* data = output.data<const float>();
  return std::vector<float>(data, data + output.get_size());
}

std::vector<uint32_t> segment_case(Engine& engine, const Case& c, const std::string& prompt_mode, int batch) {
  // read_case caps every axis at 65,535 voxels; checked again here because OpenCV and the loops below use int.
  constexpr int64_t kIntMax = 2147483647;
  if (c.height() > kIntMax || c.width() > kIntMax || c.depth() > kIntMax || c.boxes.size() > 0xffffffffu) {
    throw CaseError(c.path + ": image or box count too large to segment");
  }
  const size_t plane = static_cast<size_t>(c.height()) * c.width();
  std::vector<uint32_t> segs(plane * c.depth(), 0);
  if (c.dimension == 2) {
    const Geometry g = geometry_for(static_cast<int>(c.height()), static_cast<int>(c.width()));
    const std::vector<float> embedding = engine.encode(preprocess(slice_rgb(c, 0), g));
    std::vector<std::array<float, 4>> boxes;
    std::vector<uint32_t> labels;
    for (size_t i = 0; i < c.boxes.size(); ++i) {
      boxes.push_back(scale_box(c.boxes[i][0], c.boxes[i][1], c.boxes[i][2], c.boxes[i][3], g));
      labels.push_back(static_cast<uint32_t>(i + 1));
    }
    paint_boxes(engine, embedding, boxes, labels, g, segs.data(), batch);
  } else if (prompt_mode == "propagate") {
    segment_propagate(engine, c, segs);
  } else {
    segment_fixed(engine, c, segs, batch);
  }
  return segs;
}

}  // namespace qmedsam
