// A throwaway SoftHSM2 installation for one test process: its own token
// directory and config (SOFTHSM2_CONF), never the system's. Tokens are
// initialised through the PKCS#11 API.
#pragma once

#include <memory>
#include <string>

#include "pkcs11/module.h"

namespace hsmstek::testing {

inline constexpr char kSoPin[] = "12345678";
inline constexpr char kUserPin[] = "1234";

// The path of SoftHSM's PKCS#11 module on this machine.
const std::string &SoftHsmModulePath();

class SoftHsm {
 public:
  // Returns the process-wide instance, creating the directory and config on
  // first use and setting SOFTHSM2_CONF. Must run before the module is
  // initialised in this process (i.e. first thing in a test binary).
  static SoftHsm &Get();

  // Initialises a new token labelled `label` with kSoPin / kUserPin.
  // Aborts the test binary on failure (set-up bug).
  void CreateToken(const std::string &label);

  // A URI for `label` with module-path and pin-source (a file with the user
  // PIN and a trailing newline), plus `object` when not empty.
  std::string Uri(const std::string &label,
                  const std::string &object = "") const;

  const std::string &dir() const { return dir_; }
  const std::string &pin_file() const { return pin_file_; }
  const std::string &conf_path() const { return conf_; }
  std::shared_ptr<p11::Module> module() const { return module_; }

 private:
  SoftHsm();
  std::string dir_;
  std::string conf_;
  std::string pin_file_;
  std::shared_ptr<p11::Module> module_;
};

// Makes a fresh empty directory under the test temp dir.
std::string MakeTempDir(const std::string &prefix);

}  // namespace hsmstek::testing
