// A loaded PKCS#11 module, initialised once per process (and again in a
// forked child before its first use).
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/fork_registry.h"
#include "common/status.h"
#include "pkcs11/ck.h"

namespace hsmstek::p11 {

class Module final : public atfork::Participant {
 public:
  // Returns the module at `path` (dlopen + C_GetFunctionList). Modules are
  // cached per path for the life of the process: PKCS#11 allows one
  // C_Initialize per process, so every user of a path shares one Module.
  // Errors: kNotFound (no such file / not loadable), kInvalidArgument (no
  // C_GetFunctionList). Thread-safe.
  static Result<std::shared_ptr<Module>> FromPath(const std::string &path);

  // Returns the p11-kit configured modules (all, or the one whose name is
  // `name` when not empty). Thread-safe.
  static Result<std::vector<std::shared_ptr<Module>>> FromP11Kit(
      const std::string &name);

  // Calls C_Initialize(CKF_OS_LOCKING_OK) unless this process already did;
  // CKR_CRYPTOKI_ALREADY_INITIALIZED is accepted (another component of the
  // process may share the module). In a forked child the module is
  // initialised again before use. Thread-safe.
  [[nodiscard]] Status EnsureInitialized();

  // TryReinitialize calls C_Finalize and C_Initialize again, to make a
  // module that reads its token list only at initialisation (SoftHSM) see
  // tokens that changed since. Does nothing and returns false unless this
  // process initialised the module itself and nothing of ours uses it
  // beyond the caller's `own_holds` (finalising would pull sessions or a
  // call in flight from under them, or from another component sharing the
  // module). Thread-safe.
  bool TryReinitialize(int own_holds = 0);

  // Holds: a token counts its module as in use from connect until it is
  // disconnected with no session leased, and every candidate module while
  // it connects, so TryReinitialize knows whether calls of ours may be in
  // flight. Thread-safe.
  void TokenConnected();
  void TokenDisconnected();

  // Counts how often this process has forked a child in which we run: each
  // fork bumps it in the child (atfork::ForkCount). Cheap; lock-free.
  static uint64_t ForkCount();

  CK_FUNCTION_LIST *functions() const { return fn_; }
  const std::string &name() const { return name_; }

  Module(const Module &) = delete;
  Module &operator=(const Module &) = delete;
  ~Module();

  // Fork hooks (rank kModule), called by the module registry's one fork
  // participant (module.cc) with the registry lock held, never registered
  // per module: mu_ is held across fork; the child counts no connected
  // token.
  void ForkPrepare(atfork::Rank rank) override;
  void ForkParent(atfork::Rank rank) override;
  void ForkChild(atfork::Rank rank) override;

 private:
  // The dlopen handle (if any) is deliberately not kept: modules are never
  // dlclosed (see FromPath).
  Module(std::string name, CK_FUNCTION_LIST *fn);

  std::string name_;
  CK_FUNCTION_LIST *fn_;
  std::mutex mu_;
  bool initialized_ = false;
  bool initialized_by_us_ = false;  // C_Initialize returned CKR_OK
  uint64_t initialized_fork_count_ = 0;
  int connected_tokens_ = 0;  // of this process (reset after fork)
};

}  // namespace hsmstek::p11
