// main() of the fault tests: routes every PKCS#11 call of the process
// through the fault-injecting module before SoftHSM is first initialised,
// runs the tests, then fails the run if the module's key-custody audit
// recorded any violation (a recovery path must not weaken custody either).
#include <gtest/gtest.h>

#include <cstdio>

#include "fault_env.h"
#include "faulty/testing.h"
#include "softhsm.h"

int main(int argc, char **argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // The build lists the tests (gtest_discover_tests): no token for that.
  if (::testing::GTEST_FLAG(list_tests)) return RUN_ALL_TESTS();
  hsmstek::testing::InitFaultEnvironment();
  hsmstek::testing::SoftHsm::Get();  // loads the faulty module
  int result = RUN_ALL_TESTS();
  for (const std::string &line :
       hsmstek::faulty::AuditViolations(hsmstek::testing::AuditPath())) {
    std::fprintf(stderr, "key-custody audit violation: %s\n", line.c_str());
    result = 1;
  }
  return result;
}
