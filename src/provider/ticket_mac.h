// The provider's HMAC: token mode for ticket keys, delegation for raw keys
// (see provider.h for the design). Internal to src/provider.
#pragma once

#include <openssl/core.h>

namespace hsmstek::provider::internal {

// TicketMacFunctions returns the MAC's dispatch table (static storage).
const OSSL_DISPATCH *TicketMacFunctions();

}  // namespace hsmstek::provider::internal
