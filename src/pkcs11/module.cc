#include "pkcs11/module.h"

#include <dlfcn.h>
#include <p11-kit/p11-kit.h>

#include <atomic>
#include <map>

#include "common/bytes.h"
#include "common/exit_guard.h"
#include "common/fork_registry.h"
#include "common/log.h"
#include "pkcs11/error.h"

namespace hsmstek::p11 {
namespace {

std::mutex g_registry_mu;
// Modules live for the process: PKCS#11 allows one C_Initialize per process,
// and unloading a module other components may share is unsafe.
std::map<std::string, std::shared_ptr<Module>> &Registry() {
  static auto *registry = new std::map<std::string, std::shared_ptr<Module>>;
  return *registry;
}

}  // namespace

// The module registry's fork participant: g_registry_mu is held across
// dlopen and C_GetFunctionList, so a fork from another thread in that
// window would hand the child a held lock and hang its first open. It also
// stands in for every module (modules live for the process), so no module
// registers itself under g_registry_mu: that would wait on the fork
// registry's lock, which a forking thread holds while it waits for ours.
class ModuleRegistryFork final : public atfork::Participant {
 public:
  void ForkPrepare(atfork::Rank rank) override {
    if (rank != atfork::Rank::kModule) return;
    g_registry_mu.lock();
    for (auto &[key, module] : Registry()) module->ForkPrepare(rank);
  }
  void ForkParent(atfork::Rank rank) override {
    if (rank != atfork::Rank::kModule) return;
    for (auto &[key, module] : Registry()) module->ForkParent(rank);
    g_registry_mu.unlock();
  }
  void ForkChild(atfork::Rank rank) override {
    if (rank != atfork::Rank::kModule) return;
    for (auto &[key, module] : Registry()) module->ForkChild(rank);
    g_registry_mu.unlock();
  }

  // Registers once; call without holding g_registry_mu.
  static void Ensure() {
    static ModuleRegistryFork *participant = [] {
      auto *p = new ModuleRegistryFork;  // leaked, like the registry
      atfork::Register(p);
      return p;
    }();
    (void)participant;
  }

 protected:
  ~ModuleRegistryFork() = default;
};

uint64_t Module::ForkCount() { return atfork::ForkCount(); }

Module::Module(std::string name, CK_FUNCTION_LIST *fn)
    : name_(std::move(name)), fn_(fn) {}

void Module::ForkPrepare(atfork::Rank rank) {
  if (rank == atfork::Rank::kModule) mu_.lock();
}

void Module::ForkParent(atfork::Rank rank) {
  if (rank == atfork::Rank::kModule) mu_.unlock();
}

void Module::ForkChild(atfork::Rank rank) {
  if (rank != atfork::Rank::kModule) return;
  // The parent's tokens are not connected here (their holds are the
  // parent's); EnsureInitialized initialises the module again before use.
  connected_tokens_ = 0;
  mu_.unlock();
}

Result<std::shared_ptr<Module>> Module::FromPath(const std::string &path) {
  ModuleRegistryFork::Ensure();
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = Registry().find("path:" + path);
  if (it != Registry().end()) return it->second;

  void *dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (dl == nullptr) {
    const char *why = dlerror();
    return NotFound("cannot load PKCS#11 module " + path + ": " +
                    (why ? why : "unknown error"));
  }
  auto get_list =
      reinterpret_cast<CK_C_GetFunctionList>(dlsym(dl, "C_GetFunctionList"));
  if (get_list == nullptr) {
    dlclose(dl);
    return InvalidArgument(path +
                           " is not a PKCS#11 module (no C_GetFunctionList)");
  }
  CK_FUNCTION_LIST *fn = nullptr;
  CK_RV rv = get_list(&fn);
  if (rv != CKR_OK || fn == nullptr) {
    dlclose(dl);
    return CkError("C_GetFunctionList", rv == CKR_OK ? CKR_GENERAL_ERROR : rv,
                   path);
  }
  std::shared_ptr<Module> module(new Module(path, fn));
  Registry().emplace("path:" + path, module);
  return module;
}

Result<std::vector<std::shared_ptr<Module>>> Module::FromP11Kit(
    const std::string &name) {
  ModuleRegistryFork::Ensure();
  std::lock_guard<std::mutex> lock(g_registry_mu);
  // Unmanaged: we call C_Initialize ourselves, with our own flags.
  CK_FUNCTION_LIST **list =
      p11_kit_modules_load(nullptr, P11_KIT_MODULE_UNMANAGED);
  if (list == nullptr) {
    return NotFound(std::string("cannot load p11-kit modules: ") +
                    (p11_kit_message() ? p11_kit_message() : "unknown error"));
  }
  std::vector<std::shared_ptr<Module>> out;
  for (CK_FUNCTION_LIST **p = list; *p != nullptr; ++p) {
    char *raw_name = p11_kit_module_get_name(*p);
    std::string module_name = raw_name ? raw_name : "";
    free(raw_name);
    if (!name.empty() && module_name != name) continue;
    auto key = "p11kit:" + module_name;
    auto it = Registry().find(key);
    if (it == Registry().end()) {
      it = Registry()
               .emplace(key,
                        std::shared_ptr<Module>(new Module(module_name, *p)))
               .first;
    }
    out.push_back(it->second);
  }
  // The list array itself is ours; the modules stay loaded for the process.
  free(list);
  if (out.empty()) {
    return NotFound(name.empty() ? "no p11-kit modules are configured"
                                 : "no p11-kit module named " + name);
  }
  return out;
}

Status Module::EnsureInitialized() {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t forks = ForkCount();
  if (initialized_ && initialized_fork_count_ == forks) return Status::Ok();

  CK_C_INITIALIZE_ARGS args = {};
  args.flags = CKF_OS_LOCKING_OK;
  Status init = P11_CHECK(name_, fn_, C_Initialize, &args);
  initialized_by_us_ = init.ok();
  // CKR_CRYPTOKI_ALREADY_INITIALIZED: another component of this process (an
  // engine, p11-kit) initialised the module, or the module survived a fork
  // with its own state: both usable.
  if (!init.ok() && init.ckr() != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    return init;
  }
  initialized_ = true;
  initialized_fork_count_ = forks;
  // The module (and the OpenSSL it may use) registered its teardown just
  // now: ours must run before it (common/exit_guard.h). Once per module and
  // process, not on every re-initialisation of a token that is out.
  exit_guard::RegisterAfterInit();
  return Status::Ok();
}

bool Module::TryReinitialize(int own_holds) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!initialized_ || !initialized_by_us_ || connected_tokens_ > own_holds ||
      initialized_fork_count_ != ForkCount()) {
    return false;
  }
  P11_CLEANUP(fn_, C_Finalize, nullptr);
  CK_C_INITIALIZE_ARGS args = {};
  args.flags = CKF_OS_LOCKING_OK;
  Status init = P11_CHECK(name_, fn_, C_Initialize, &args);
  const CK_RV rv = init.ckr();
  initialized_ = init.ok() || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED;
  initialized_by_us_ = init.ok();
  // Debug: the prober of a token that is out does this every second.
  log::Debug("re-initialised PKCS#11 module " +
             QuoteForMessage(name_, kMaxQuotedUri) + ": " +
             std::string(init.ok() ? "CKR_OK" : CkrName(rv)));
  return initialized_;
}

void Module::TokenConnected() {
  std::lock_guard<std::mutex> lock(mu_);
  ++connected_tokens_;
}

void Module::TokenDisconnected() {
  std::lock_guard<std::mutex> lock(mu_);
  if (connected_tokens_ > 0) --connected_tokens_;
}

Module::~Module() = default;

}  // namespace hsmstek::p11
