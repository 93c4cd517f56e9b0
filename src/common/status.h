// Status and Result: the one way errors propagate inside hsmstek.
//
// Every fallible internal function returns Status or Result<T>; both are
// [[nodiscard]] so a dropped error is a compile error under -Werror. No
// exceptions are thrown by our code; the C API turns a Status into a return
// code plus a thread-local message (see src/api/).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace hsmstek {

// Closed set of error kinds, chosen so callers can act on them.
enum class ErrorCode : uint8_t {
  kOk = 0,
  kInvalidArgument,     // bad input from outside: URI, file, bundle, config
  kNotFound,            // no such token, store, key or object
  kAlreadyExists,       // e.g. provisioning a label that already has a store
  kFailedPrecondition,  // state forbids it: non-replicable export, retired key
  kPermissionDenied,    // wrong PIN, key attributes weaker than required
  kUnavailable,         // token fault; retrying later may succeed
  kUnsupported,         // token lacks a mechanism or feature
  kInternal,            // a bug or an unexpected library failure
};

// Returns a stable lower-case name ("invalid-argument", ...) for messages.
std::string_view ErrorCodeName(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(ErrorCode code, std::string message, unsigned long ckr = 0)
      : code_(code), ckr_(ckr), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  // The CK_RV that caused this error, or 0 when it did not come from a token.
  unsigned long ckr() const { return ckr_; }
  const std::string &message() const { return message_; }

  // Returns a copy whose message is "context: message".
  Status WithContext(std::string_view context) const;

 private:
  ErrorCode code_ = ErrorCode::kOk;
  unsigned long ckr_ = 0;
  std::string message_;
};

// The error a Result built from an OK Status holds (see Result).
Status OkStatusMisuse();

// Result<T> holds either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  // A Result is a value or an error: built from an OK Status (a bug in the
  // caller) it holds a kInternal error instead, so ok() and status().ok()
  // never disagree.
  Result(Status status)  // NOLINT: implicit by design
      : v_(status.ok() ? OkStatusMisuse() : std::move(status)) {}

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status &status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T &value() & { return std::get<T>(v_); }
  const T &value() const & { return std::get<T>(v_); }
  T &&value() && { return std::get<T>(std::move(v_)); }
  T *operator->() { return &value(); }
  const T *operator->() const { return &value(); }
  T &operator*() & { return value(); }
  const T &operator*() const & { return value(); }

 private:
  std::variant<T, Status> v_;
};

inline Status InvalidArgument(std::string m) {
  return Status(ErrorCode::kInvalidArgument, std::move(m));
}
inline Status NotFound(std::string m) {
  return Status(ErrorCode::kNotFound, std::move(m));
}
inline Status AlreadyExists(std::string m) {
  return Status(ErrorCode::kAlreadyExists, std::move(m));
}
inline Status FailedPrecondition(std::string m) {
  return Status(ErrorCode::kFailedPrecondition, std::move(m));
}
inline Status PermissionDenied(std::string m) {
  return Status(ErrorCode::kPermissionDenied, std::move(m));
}
inline Status Unavailable(std::string m) {
  return Status(ErrorCode::kUnavailable, std::move(m));
}
inline Status Unsupported(std::string m) {
  return Status(ErrorCode::kUnsupported, std::move(m));
}
inline Status Internal(std::string m) {
  return Status(ErrorCode::kInternal, std::move(m));
}

}  // namespace hsmstek
