// Shared rig of the ticket fuzz targets (fuzz_ticket_tls12.cc,
// fuzz_ticket_tls13.cc): a real server SSL_CTX whose tickets are sealed and
// opened by the hsmstek callback in a SoftHSM token of this process, and a
// client that offers the fuzz input as its ticket (TLS 1.2 session ticket
// extension) or PSK identity (TLS 1.3).
//
// Set-up (once per process and version, on first use): a SoftHSM token in a
// temp dir (SoftHsm), one master provisioned with the keystore API
// (period 1 h, decrypt window 7 d = kMaxWindowEpochs), a FakeClock that
// never moves, server and client SSL_CTXs that are reused for every input,
// and one full handshake whose session (the "base" session) and ticket
// (the "genuine" ticket) every input is checked against. The server's
// session cache is off, so a resumption can only come from a ticket.
//
// Input transform: if the input starts with the 8 bytes kStoreIdPlaceholder,
// they are replaced by this process's random store id. Seeds and crash
// reproducers can so name the live store (and, the clock being fixed, any
// epoch of it) across processes; every other input is used unchanged.
//
// Invariants checked for every input (abort on failure):
//   - the handshake completes (a ticket never aborts a handshake);
//   - it resumes iff the ticket equals the genuine ticket (the only ticket
//     that can resume the base session: any other ticket the server issued
//     belongs to another session whose secret the client does not hold);
//   - the token reports no error (a forged ticket costs at most a
//     derivation and a failed MAC check, never a token fault).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace hsmstek::fuzz {

// Stands for the live store id at the start of an input (see above).
inline constexpr uint8_t kStoreIdPlaceholder[8] = {'H', 'S', 'T', 'K',
                                                   'F', 'U', 'Z', 'Z'};

// The fixed time of the rig's clock: ten minutes into epoch 493000 of a
// one-hour period (seeds name epochs relative to it).
inline constexpr int64_t kFuzzPeriod = 3600;
inline constexpr uint64_t kFuzzEpoch = 493000;

// FuzzTicket runs one input through a handshake of `version`
// (TLS1_2_VERSION or TLS1_3_VERSION), setting up the rig on first use, and
// checks the invariants above. Inputs longer than 8192 bytes are skipped (a
// client cannot send them in one extension anyway). Returns 0.
int FuzzTicket(int version, const uint8_t *data, size_t size);

// WriteLiveSeeds sets up the rig of `version` and writes its genuine ticket
// and a few single-byte mutations of it (as seen by a live server: in-window
// name, bad MAC) into `dir`, which libFuzzer then reads as corpus. Also
// runs those seeds through FuzzTicket. Returns the number of files written.
int WriteLiveSeeds(int version, const std::string &dir);

// FirstCorpusDir returns the first command-line argument that names an
// existing directory (libFuzzer's output corpus), or "" if there is none.
std::string FirstCorpusDir(int argc, char **argv);

}  // namespace hsmstek::fuzz
