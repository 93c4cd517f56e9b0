// The PKCS#11 types and constants, from p11-kit's copy of the OASIS header
// (includes CK_* vendor-neutral definitions up to 2.40 plus p11-kit's extras).
#pragma once

#include <p11-kit/pkcs11.h>
