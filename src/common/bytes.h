// Byte helpers: hex, big-endian integers, constant-time compare, and a
// buffer that is wiped when it dies (for PINs and legacy key bytes only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace hsmstek {

using Bytes = std::vector<uint8_t>;
using ByteSpan = std::span<const uint8_t>;

// Lower-case hex of `data`.
std::string HexEncode(ByteSpan data);
// Parses hex (either case, no separators). Odd length or a non-hex
// character is kInvalidArgument.
Result<Bytes> HexDecode(std::string_view hex);

void StoreBigEndian64(uint64_t v, uint8_t out[8]);
uint64_t LoadBigEndian64(const uint8_t in[8]);

// QuoteForMessage returns `text` in double quotes for an error or log
// message: at most `max` bytes, then "..."; bytes outside printable ASCII
// (and '"', '\\') as \xNN, so hostile input (a token label, a URI) cannot
// forge log lines. Labels use the default; URIs pass kMaxQuotedUri.
inline constexpr size_t kMaxQuotedUri = 512;
std::string QuoteForMessage(std::string_view text, size_t max = 40);

// Compares in time independent of where the spans differ. Spans of
// different length compare unequal (length is not secret).
bool ConstantTimeEqual(ByteSpan a, ByteSpan b);

// SecretBuffer owns bytes that must not outlive their use: the destructor
// and clear() wipe them with OPENSSL_cleanse. Not copyable.
class SecretBuffer {
 public:
  SecretBuffer() = default;
  explicit SecretBuffer(size_t size) : data_(size) {}
  SecretBuffer(const uint8_t *p, size_t n) : data_(p, p + n) {}
  ~SecretBuffer() { clear(); }
  SecretBuffer(const SecretBuffer &) = delete;
  SecretBuffer &operator=(const SecretBuffer &) = delete;
  SecretBuffer(SecretBuffer &&other) noexcept : data_(std::move(other.data_)) {
    other.data_.clear();
  }
  SecretBuffer &operator=(SecretBuffer &&other) noexcept;

  uint8_t *data() { return data_.data(); }
  const uint8_t *data() const { return data_.data(); }
  size_t size() const { return data_.size(); }
  bool empty() const { return data_.empty(); }
  ByteSpan span() const { return ByteSpan(data_.data(), data_.size()); }
  // Wipes and empties the buffer.
  void clear();
  // Shrinks to `n` bytes, wiping the bytes cut off.
  void truncate(size_t n);

 private:
  std::vector<uint8_t> data_;
};

}  // namespace hsmstek
