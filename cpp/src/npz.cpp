#include "npz.hpp"

#include <zip.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <unistd.h>

namespace qmedsam {

namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mantissa;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <typename T>
T load(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

// An integer of `itemsize` bytes, read as the 1/2/4/8-byte type of the given signedness.
template <typename I8, typename I16, typename I32, typename I64>
std::optional<double> integer_at(const uint8_t* p, int itemsize) {
  switch (itemsize) {
    case 1: return load<I8>(p);
    case 2: return load<I16>(p);
    case 4: return load<I32>(p);
    case 8: return static_cast<double>(load<I64>(p));
  }
  return std::nullopt;
}

// Parse the .npy header dict: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
void parse_header(const std::string& header, Array& array, bool& fortran, char& byte_order) {
  std::smatch match;
  static const std::regex descr_re(R"('descr'\s*:\s*'([^']*)')");
  static const std::regex fortran_re(R"('fortran_order'\s*:\s*(True|False))");
  static const std::regex shape_re(R"('shape'\s*:\s*\(([^)]*)\))");
  if (!std::regex_search(header, match, descr_re)) throw NpzError("npy header without a plain 'descr' (a structured or object array)");
  array.descr = match[1];
  if (!std::regex_search(header, match, fortran_re)) throw NpzError("npy header without 'fortran_order'");
  fortran = match[1] == "True";
  if (!std::regex_search(header, match, shape_re)) throw NpzError("npy header without 'shape'");
  std::string dims = match[1];
  std::stringstream stream(dims);
  std::string token;
  while (std::getline(stream, token, ',')) {
    token.erase(std::remove_if(token.begin(), token.end(), ::isspace), token.end());
    if (token.empty()) continue;
    if (!token.empty() && token.back() == 'L') token.pop_back();
    array.shape.push_back(std::stoll(token));
  }
  const std::string& d = array.descr;
  if (d.size() < 3) throw NpzError("unsupported dtype '" + d + "'");
  byte_order = d[0];
  array.kind = d[1];
  array.itemsize = std::stoi(d.substr(2));
  if (array.kind == 'O' || array.kind == 'V') throw NpzError("Object arrays cannot be loaded when allow_pickle=False");
}

Array parse_npy(const std::vector<uint8_t>& raw) {
  static const char magic[] = "\x93NUMPY";
  if (raw.size() < 10 || std::memcmp(raw.data(), magic, 6) != 0) throw NpzError("not an .npy member");
  const int major = raw[6];
  size_t header_len, offset;
  if (major == 1) {
    header_len = raw[8] | (raw[9] << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (raw.size() < 12) throw NpzError("truncated .npy header");
    header_len = load<uint32_t>(raw.data() + 8);
    offset = 12;
  } else {
    throw NpzError("unsupported .npy version " + std::to_string(major));
  }
  if (raw.size() < offset + header_len) throw NpzError("truncated .npy header");
  Array array;
  bool fortran = false;
  char byte_order = '<';
  parse_header(std::string(raw.begin() + offset, raw.begin() + offset + header_len), array, fortran, byte_order);
  const size_t bytes = static_cast<size_t>(array.size()) * array.itemsize;
  const size_t start = offset + header_len;
  if (raw.size() - start < bytes) throw NpzError("array data is truncated");
  array.data.assign(raw.begin() + start, raw.begin() + start + bytes);
  if (byte_order == '>' && array.itemsize > 1) {
    for (size_t i = 0; i < bytes; i += array.itemsize) std::reverse(array.data.begin() + i, array.data.begin() + i + array.itemsize);
  }
  if (fortran && array.ndim() > 1) {  // to C order
    std::vector<uint8_t> c_order(bytes);
    const size_t n = array.ndim();
    std::vector<int64_t> index(n, 0);
    for (int64_t linear = 0; linear < array.size(); ++linear) {
      int64_t f_offset = 0, stride = 1;  // Fortran: first axis fastest
      for (size_t a = 0; a < n; ++a) {
        f_offset += index[a] * stride;
        stride *= array.shape[a];
      }
      std::memcpy(&c_order[linear * array.itemsize], &array.data[f_offset * array.itemsize], array.itemsize);
      for (size_t a = n; a-- > 0;) {  // C order: last axis fastest
        if (++index[a] < array.shape[a]) break;
        index[a] = 0;
      }
    }
    array.data.swap(c_order);
  }
  return array;
}

std::string npy_bytes(const Array& array) {
  std::string shape = "(";
  for (size_t i = 0; i < array.shape.size(); ++i) shape += std::to_string(array.shape[i]) + (array.shape.size() == 1 ? "," : (i + 1 < array.shape.size() ? ", " : ""));
  shape += ")";
  std::string header = "{'descr': '" + array.descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t unpadded = 10 + header.size() + 1;
  header += std::string((64 - unpadded % 64) % 64, ' ') + "\n";
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>((header.size() >> 8) & 0xff);
  out += header;
  out.append(reinterpret_cast<const char*>(array.data.data()), array.data.size());
  return out;
}

}  // namespace

int64_t Array::size() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

double Array::at(int64_t index) const {
  const uint8_t* p = data.data() + index * itemsize;
  std::optional<double> value;
  switch (kind) {
    case 'b':
      return *p ? 1.0 : 0.0;
    case 'u':
      value = integer_at<uint8_t, uint16_t, uint32_t, uint64_t>(p, itemsize);
      break;
    case 'i':
      value = integer_at<int8_t, int16_t, int32_t, int64_t>(p, itemsize);
      break;
    case 'f':
      switch (itemsize) {
        case 2: return half_to_float(load<uint16_t>(p));
        case 4: return load<float>(p);
        case 8: return load<double>(p);
      }
      break;
  }
  if (value) return *value;
  throw NpzError("unsupported dtype '" + descr + "'");
}

std::string Array::dtype_name() const {
  switch (kind) {
    case 'b': return "bool";
    case 'u': return "uint" + std::to_string(itemsize * 8);
    case 'i': return "int" + std::to_string(itemsize * 8);
    case 'f': return "float" + std::to_string(itemsize * 8);
  }
  return descr;
}

std::string Array::shape_text() const {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::map<std::string, Array> read_npz(const std::string& path) {
  int error = 0;
  std::unique_ptr<zip_t, decltype(&zip_discard)> archive(zip_open(path.c_str(), ZIP_RDONLY, &error), &zip_discard);
  if (!archive) {
    zip_error_t zip_error;
    zip_error_init_with_code(&zip_error, error);
    std::string message = zip_error_strerror(&zip_error);
    zip_error_fini(&zip_error);
    throw NpzError("not a zip file (" + message + ")");
  }
  std::map<std::string, Array> arrays;
  const zip_int64_t entries = zip_get_num_entries(archive.get(), 0);
  for (zip_int64_t i = 0; i < entries; ++i) {
    zip_stat_t stat;
    if (zip_stat_index(archive.get(), i, 0, &stat) != 0) throw NpzError("unreadable zip entry");
    std::string name = stat.name;
    std::vector<uint8_t> raw(stat.size);
    std::unique_ptr<zip_file_t, decltype(&zip_fclose)> file(zip_fopen_index(archive.get(), i, 0), &zip_fclose);
    if (!file || zip_fread(file.get(), raw.data(), stat.size) != static_cast<zip_int64_t>(stat.size)) {
      throw NpzError("cannot read zip entry " + name);
    }
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0) name.resize(name.size() - 4);
    arrays[name] = parse_npy(raw);
  }
  return arrays;
}

void write_atomically(const std::string& path, const std::function<void(const std::string& temporary)>& write) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const std::string temporary =
      (target.parent_path() / ("." + target.filename().string() + "." + std::to_string(getpid()) + ".tmp")).string();
  try {
    write(temporary);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
  fs::permissions(temporary, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
  fs::rename(temporary, target);
}

void write_npz(const std::string& path, const std::string& name, const Array& array) {
  const std::string payload = npy_bytes(array);
  write_atomically(path, [&](const std::string& temporary) {
    int error = 0;
    zip_t* archive = zip_open(temporary.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &error);
    if (!archive) throw std::runtime_error(path + ": cannot create the output file");
    zip_source_t* source = zip_source_buffer(archive, payload.data(), payload.size(), 0);
    const zip_int64_t index = source ? zip_file_add(archive, (name + ".npy").c_str(), source, ZIP_FL_OVERWRITE) : -1;
    if (index < 0 || zip_set_file_compression(archive, index, ZIP_CM_DEFLATE, 0) != 0 || zip_close(archive) != 0) {
      if (index < 0 && source) zip_source_free(source);
      zip_discard(archive);
      throw std::runtime_error(path + ": writing the npz failed");
    }
  });
}

}  // namespace qmedsam
