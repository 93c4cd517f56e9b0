// Fuzz target: arbitrary bytes as the TLS 1.3 PSK identity (ticket) offered to
// a real server SSL whose tickets the hsmstek callback seals and opens in a
// SoftHSM token. Rig and invariants: ticket_fuzz.h.
#include <openssl/ssl.h>

#include <cstddef>
#include <cstdint>

#include "ticket_fuzz.h"

namespace hsmstek::fuzz {

int FuzzTicketTls13(const uint8_t *data, size_t size) {
  return FuzzTicket(TLS1_3_VERSION, data, size);
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
// Sets up the token and server before the first input, and adds this
// process's genuine ticket (and near misses) to the output corpus.
extern "C" int LLVMFuzzerInitialize(int *argc, char ***argv) {
  hsmstek::fuzz::WriteLiveSeeds(TLS1_3_VERSION,
                                hsmstek::fuzz::FirstCorpusDir(*argc, *argv));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzTicketTls13(data, size);
}
#endif
