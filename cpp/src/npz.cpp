#include "npz.hpp"

#include <zip.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <zlib.h>
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

constexpr size_t kMaxMembers = 64;
constexpr size_t kMaxHeaderLength = 10000;
constexpr size_t kMaxDims = 32;
constexpr uint64_t kInt64Max = 9223372036854775807ull;
const char* const kExpectedKeys = "['descr', 'fortran_order', 'shape']";

// The .npy header dict, parsed by the grammar of qmedsam.data.npz._HeaderParser, rule for rule and message
// for message: no regex (std::regex recursed on a long header until the stack overflowed), bounded by the text.
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& text) : text_(text) {}

  void parse(std::string& descr, bool& fortran, std::vector<int64_t>& shape) {
    expect('{');
    bool have[3] = {false, false, false};
    while (peek() != '}') {
      const std::string key = string();
      const int index = key == "descr" ? 0 : key == "fortran_order" ? 1 : key == "shape" ? 2 : -1;
      if (index < 0) throw NpzError("npy header has an unexpected key '" + key + "'; expected exactly " + kExpectedKeys);
      if (have[index]) throw NpzError("npy header names '" + key + "' twice");
      have[index] = true;
      expect(':');
      if (index == 0) {
        if (peek() == '[') throw NpzError("structured dtypes are not accepted; expected bool, integer or float");
        descr = string();
      } else if (index == 1) {
        fortran = boolean();
      } else {
        shape = parse_shape();
      }
      if (peek() == ',') {
        ++pos_;
      } else if (peek() != '}') {
        throw fail("',' or '}'");
      }
    }
    ++pos_;
    skip_space();
    if (pos_ != text_.size()) throw fail("only padding after the dict");
    std::string missing;
    const char* names[3] = {"descr", "fortran_order", "shape"};
    for (int i = 0; i < 3; ++i) {
      if (!have[i]) missing += (missing.empty() ? "'" : ", '") + std::string(names[i]) + "'";
    }
    if (!missing.empty()) throw NpzError("npy header lacks [" + missing + "]; expected exactly " + kExpectedKeys);
  }

 private:
  NpzError fail(const std::string& what) const {
    return NpzError("npy header is not a plain dict: expected " + what + " at offset " + std::to_string(pos_));
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\r' || text_[pos_] == '\n')) ++pos_;
  }
  char peek() {
    skip_space();
    return pos_ < text_.size() ? text_[pos_] : '\0';
  }
  void expect(char c) {
    if (peek() != c || pos_ >= text_.size()) throw fail(std::string("'") + c + "'");
    ++pos_;
  }
  std::string string() {
    const char quote = peek();
    if (pos_ >= text_.size() || (quote != '\'' && quote != '"')) throw fail("a quoted string");
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string::npos) throw fail("a closing quote");
    std::string value = text_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return value;
  }
  bool boolean() {
    skip_space();
    if (text_.compare(pos_, 4, "True") == 0) return pos_ += 4, true;
    if (text_.compare(pos_, 5, "False") == 0) return pos_ += 5, false;
    throw fail("True or False");
  }
  int64_t integer() {
    skip_space();
    const size_t start = pos_;
    const bool negative = pos_ < text_.size() && text_[pos_] == '-';
    if (negative) ++pos_;
    const size_t digits = pos_;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    if (pos_ == digits) throw fail("a whole number");
    const std::string token = text_.substr(start, pos_ - start);
    if (pos_ - digits > 19) throw NpzError("npy header: shape dimension " + token + " is too large");
    uint64_t value = 0;  // at most 19 digits: fits
    for (size_t i = digits; i < pos_; ++i) value = value * 10 + static_cast<uint64_t>(text_[i] - '0');
    if (negative && value != 0) throw NpzError("npy header: shape has a negative dimension (" + token + ")");
    if (value > kInt64Max) throw NpzError("npy header: shape dimension " + token + " is too large");
    return static_cast<int64_t>(value);
  }
  std::vector<int64_t> parse_shape() {
    expect('(');
    std::vector<int64_t> dims;
    while (peek() != ')') {
      if (dims.size() == kMaxDims) throw NpzError("npy header: shape has more than " + std::to_string(kMaxDims) + " dimensions");
      dims.push_back(integer());
      if (peek() == ',') {
        ++pos_;
      } else if (peek() != ')') {
        throw fail("',' or ')'");
      }
    }
    ++pos_;
    return dims;
  }

  const std::string& text_;
  size_t pos_ = 0;
};

// Python's bytes.decode("utf-8") verdict: no overlong forms, no surrogates, nothing past U+10FFFF.
bool valid_utf8(const std::string& text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t length;
    uint32_t code;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      length = 2, code = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      length = 3, code = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      length = 4, code = c & 0x07;
    } else {
      return false;
    }
    if (n - i < length) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      code = (code << 6) | (p[i + k] & 0x3f);
    }
    if ((length == 3 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff))) || (length == 4 && (code < 0x10000 || code > 0x10ffff))) {
      return false;
    }
    i += length;
  }
  return true;
}

// '<f4', '|u1', '>i2', '|b1' ... as qmedsam.data.npz.parse_dtype accepts them.
void parse_dtype(const std::string& descr, Array& array, char& byte_order) {
  if ((!descr.empty() && descr[0] == 'O') || (descr.size() > 1 && descr[1] == 'O')) {
    throw NpzError("object arrays (pickles) are not accepted");
  }
  const NpzError refused("dtype '" + descr + "' is not accepted; expected bool, (u)int8-64 or float16/32/64");
  if (descr.size() < 3 || descr.size() > 4) throw refused;
  const char order = descr[0], kind = descr[1];
  const std::string size = descr.substr(2);
  if (std::string("<>|=").find(order) == std::string::npos || std::string("buif").find(kind) == std::string::npos) throw refused;
  for (char c : size) {
    if (c < '0' || c > '9') throw refused;
  }
  const int itemsize = std::stoi(size);
  const bool allowed = kind == 'b' ? itemsize == 1
                       : kind == 'f' ? (itemsize == 2 || itemsize == 4 || itemsize == 8)
                                     : (itemsize == 1 || itemsize == 2 || itemsize == 4 || itemsize == 8);
  if (!allowed || (order == '|' && itemsize != 1)) throw refused;
  array.kind = kind;
  array.itemsize = itemsize;
  array.descr = std::string(1, order == '>' && itemsize > 1 ? '<' : order) + kind + size;  // stored native (little-endian)
  byte_order = order;
}

}  // namespace

Array parse_npy(const std::vector<uint8_t>& raw, uint64_t max_bytes) {
  static const char magic[] = "\x93NUMPY";
  if (raw.size() < 10 || std::memcmp(raw.data(), magic, 6) != 0) throw NpzError("not a .npy array (no \\x93NUMPY magic)");
  const int major = raw[6];
  size_t header_length, offset;
  if (major == 1) {
    header_length = raw[8] | (raw[9] << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (raw.size() < 12) throw NpzError("npy header is truncated");
    header_length = load<uint32_t>(raw.data() + 8);
    offset = 12;
  } else {
    throw NpzError("npy format version " + std::to_string(major) + " is not accepted; expected 1, 2 or 3");
  }
  if (header_length > kMaxHeaderLength) {
    throw NpzError("npy header is " + std::to_string(header_length) + " bytes; at most " + std::to_string(kMaxHeaderLength) +
                   " are accepted");
  }
  if (raw.size() - offset < header_length) throw NpzError("npy header is truncated");
  const std::string header(raw.begin() + offset, raw.begin() + offset + header_length);
  if (major == 3 && !valid_utf8(header)) throw NpzError("npy header is not valid UTF-8");
  Array array;
  std::string descr;
  bool fortran = false;
  HeaderParser(header).parse(descr, fortran, array.shape);
  char byte_order = '<';
  parse_dtype(descr, array, byte_order);
  // The nonzero dimensions are bounded even when another is zero: an empty (2^40, 2^40, 0) array holds no byte,
  // but every product of its dimensions (element counts, strides) would overflow.
  const bool empty = std::find(array.shape.begin(), array.shape.end(), 0) != array.shape.end();
  uint64_t span = static_cast<uint64_t>(array.itemsize);
  for (size_t a = 0; a < array.shape.size(); ++a) {
    if (array.shape[a] == 0) continue;
    if (__builtin_mul_overflow(span, static_cast<uint64_t>(array.shape[a]), &span) || span > max_bytes) {
      throw NpzError("array of shape " + array.shape_text() + " and dtype " + array.dtype_name() +
                     (empty ? " is empty, but its nonzero dimensions span more than " : " decodes to more than ") +
                     std::to_string(max_bytes) + " bytes (the limit; " + kMaxBytesEnv + " changes it)");
    }
  }
  const uint64_t bytes = empty ? 0 : span;
  const size_t start = offset + header_length;
  const uint64_t available = raw.size() - start;
  if (available < bytes) {
    throw NpzError("array data is truncated (" + std::to_string(available) + " of " + std::to_string(bytes) + " bytes)");
  }
  if (available > bytes) throw NpzError(std::to_string(available - bytes) + " bytes follow the array data; expected none");
  array.data.assign(raw.begin() + start, raw.end());
  if (byte_order == '>' && array.itemsize > 1) {
    for (size_t i = 0; i < bytes; i += array.itemsize) std::reverse(array.data.begin() + i, array.data.begin() + i + array.itemsize);
  }
  if (fortran && array.ndim() > 1 && bytes) {  // to C order; every index stays below the checked size
    std::vector<uint8_t> c_order(bytes);
    const size_t n = array.ndim();
    const int64_t count = array.size();
    std::vector<int64_t> index(n, 0);
    for (int64_t linear = 0; linear < count; ++linear) {
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

namespace {

// One member's bytes, exactly its declared size (already checked against the limit), CRC-32 verified here.
std::vector<uint8_t> read_member(zip_t* archive, zip_int64_t index, const zip_stat_t& stat, const std::string& name) {
  const NpzError unreadable("member '" + name + "' cannot be read");
  std::vector<uint8_t> raw(stat.size);
  std::unique_ptr<zip_file_t, decltype(&zip_fclose)> file(zip_fopen_index(archive, index, 0), &zip_fclose);
  if (!file) throw unreadable;
  uint64_t filled = 0;
  while (filled < stat.size) {
    const zip_int64_t got = zip_fread(file.get(), raw.data() + filled, stat.size - filled);
    if (got < 0) {
      if (zip_error_code_zip(zip_file_get_error(file.get())) == ZIP_ER_CRC) break;  // checked below
      throw unreadable;
    }
    if (got == 0) throw unreadable;
    filled += static_cast<uint64_t>(got);
  }
  uLong crc = crc32(0L, Z_NULL, 0);
  for (uint64_t done = 0; done < stat.size;) {  // zlib's crc32 takes a uInt length
    const uInt chunk = static_cast<uInt>(std::min<uint64_t>(stat.size - done, 1u << 30));
    crc = crc32(crc, raw.data() + done, chunk);
    done += chunk;
  }
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
  crc = stat.crc;  // fuzz builds only: let mutated members reach the .npy parser and the case checks
#endif
  if (filled != stat.size || static_cast<uint32_t>(crc) != stat.crc) {
    throw NpzError("member '" + name + "' fails its CRC-32 check (corrupted)");
  }
  return raw;
}

std::map<std::string, Array> read_archive(zip_t* archive, uint64_t limit) {
  std::map<std::string, Array> arrays;
  const zip_int64_t entries = zip_get_num_entries(archive, 0);
  if (entries < 0) throw NpzError("not a zip archive");
  if (static_cast<uint64_t>(entries) > kMaxMembers) {
    throw NpzError(std::to_string(entries) + " members; at most " + std::to_string(kMaxMembers) + " are accepted");
  }
  const uint64_t slack = static_cast<uint64_t>(entries) * (kMaxHeaderLength + 12);
  uint64_t declared = 0, remaining = limit;
  for (zip_int64_t i = 0; i < entries; ++i) {
    zip_stat_t stat;
    zip_stat_init(&stat);
    if (zip_stat_index(archive, i, ZIP_FL_ENC_STRICT, &stat) != 0 || !(stat.valid & ZIP_STAT_NAME) || !(stat.valid & ZIP_STAT_SIZE) ||
        !(stat.valid & ZIP_STAT_CRC)) {
      throw NpzError("not a zip archive");
    }
    const std::string name = stat.name;
    std::string key = name;
    if (key.size() >= 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    if (arrays.count(key)) throw NpzError("member '" + name + "' appears twice");
    if ((stat.valid & ZIP_STAT_ENCRYPTION_METHOD) && stat.encryption_method != ZIP_EM_NONE) {
      throw NpzError("member '" + name + "' is encrypted");
    }
    if ((stat.valid & ZIP_STAT_COMP_METHOD) && stat.comp_method != ZIP_CM_STORE && stat.comp_method != ZIP_CM_DEFLATE) {
      throw NpzError("member '" + name + "' uses compression method " + std::to_string(stat.comp_method) +
                     "; expected stored or deflate");
    }
    // Checked before a byte is allocated: a zip bomb or a forged entry declares its size.
    if (__builtin_add_overflow(declared, static_cast<uint64_t>(stat.size), &declared) || declared > limit + slack) {
      throw NpzError("members declare " + std::to_string(declared) + " bytes, more than the " + std::to_string(limit) +
                     "-byte limit (" + kMaxBytesEnv + " changes it)");
    }
    const std::vector<uint8_t> raw = read_member(archive, i, stat, name);
    try {
      Array array = parse_npy(raw, remaining);
      remaining -= array.data.size();
      arrays.emplace(key, std::move(array));
    } catch (const NpzError& error) {
      throw NpzError("member '" + name + "': " + error.what());
    }
  }
  return arrays;
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

int64_t Array::size() const {  // every Array comes from parse_npy or our own code: its nonzero span was checked
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
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

uint64_t max_case_bytes() {
  const char* text = std::getenv(kMaxBytesEnv);
  if (!text || !*text) return kDefaultMaxBytes;
  std::string value(text);
  value.erase(0, value.find_first_not_of(" \t\r\n"));
  value.erase(value.find_last_not_of(" \t\r\n") + 1);
  if (value.empty()) return kDefaultMaxBytes;
  bool digits = true;
  for (char c : value) digits &= c >= '0' && c <= '9';
  if (!digits || value.find_first_not_of('0') == std::string::npos) {
    throw NpzError(std::string("environment variable ") + kMaxBytesEnv + "='" + text + "'; expected a whole number of bytes >= 1");
  }
  const size_t first = value.find_first_not_of('0');
  const std::string significant = value.substr(first);
  if (significant.size() > 19 || (significant.size() == 19 && significant > "9223372036854775807")) return kInt64Max;
  return std::stoull(significant);
}

std::map<std::string, Array> read_npz(const std::string& path, uint64_t max_bytes) {
  zip_error_t error;
  zip_error_init(&error);
  zip_source_t* source = zip_source_file_create(path.c_str(), 0, -1, &error);
  zip_error_fini(&error);
  if (!source) throw NpzError("not a zip archive");
  return read_npz_source(source, max_bytes);
}

std::map<std::string, Array> read_npz_bytes(const uint8_t* data, size_t size, uint64_t max_bytes) {
  zip_error_t error;
  zip_error_init(&error);
  zip_source_t* source = zip_source_buffer_create(data, size, 0, &error);
  zip_error_fini(&error);
  if (!source) throw NpzError("not a zip archive");
  return read_npz_source(source, max_bytes);
}

std::map<std::string, Array> read_npz_source(zip_source_t* source, uint64_t max_bytes) {
  zip_error_t error;
  zip_error_init(&error);
  std::unique_ptr<zip_t, decltype(&zip_discard)> archive(zip_open_from_source(source, ZIP_RDONLY | ZIP_CHECKCONS, &error), &zip_discard);
  zip_error_fini(&error);
  if (!archive) {
    zip_source_free(source);
    throw NpzError("not a zip archive");
  }
  return read_archive(archive.get(), max_bytes);
}

void write_atomically(const std::string& path, const std::function<void(const std::string& temporary)>& write) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  // mkstemp (O_EXCL): a unique name that no planted symlink can redirect, as Python's tempfile does.
  std::string pattern = (target.parent_path() / ("." + target.filename().string() + ".XXXXXX")).string();
  const int fd = mkstemp(pattern.data());
  if (fd < 0) throw std::runtime_error(path + ": cannot create a temporary file beside it");
  close(fd);
  const std::string temporary = pattern;
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
