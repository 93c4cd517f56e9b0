#include "common/status.h"

namespace hsmstek {

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "ok";
    case ErrorCode::kInvalidArgument:
      return "invalid-argument";
    case ErrorCode::kNotFound:
      return "not-found";
    case ErrorCode::kAlreadyExists:
      return "already-exists";
    case ErrorCode::kFailedPrecondition:
      return "failed-precondition";
    case ErrorCode::kPermissionDenied:
      return "permission-denied";
    case ErrorCode::kUnavailable:
      return "unavailable";
    case ErrorCode::kUnsupported:
      return "unsupported";
    case ErrorCode::kInternal:
      return "internal";
    default:
      return "unknown";
  }
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  m += ": ";
  m += message_;
  return Status(code_, std::move(m), ckr_);
}

Status OkStatusMisuse() {
  return Status(ErrorCode::kInternal,
                "internal error: a Result was built from an OK Status");
}

}  // namespace hsmstek
