// The provider's HSMSTEK-AES-CBC-PAD cipher (see provider.h for the design).
// Internal to src/provider.
#pragma once

#include <openssl/core.h>

namespace hsmstek::provider::internal {

// TicketCipherFunctions returns the cipher's dispatch table (static storage).
const OSSL_DISPATCH *TicketCipherFunctions();

}  // namespace hsmstek::provider::internal
