// Helpers shared by the formats_test sources.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <string_view>

#include "common/status.h"

namespace hsmstek::keystore::testing {

// Succeeds when `status` has `code` and its message contains `part`.
inline ::testing::AssertionResult HasError(const Status &status, ErrorCode code,
                                           std::string_view part) {
  if (status.ok()) {
    return ::testing::AssertionFailure() << "expected an error, got OK";
  }
  if (status.code() != code) {
    return ::testing::AssertionFailure()
           << "code " << ErrorCodeName(status.code()) << " instead of "
           << ErrorCodeName(code) << " (message: " << status.message() << ")";
  }
  if (status.message().find(part) == std::string::npos) {
    return ::testing::AssertionFailure()
           << "message \"" << status.message() << "\" lacks \"" << part << "\"";
  }
  return ::testing::AssertionSuccess();
}

// Shorthand for the common case.
inline ::testing::AssertionResult IsInvalid(const Status &status,
                                            std::string_view part) {
  return HasError(status, ErrorCode::kInvalidArgument, part);
}

}  // namespace hsmstek::keystore::testing
