/* The CMesh module's umbrella: the repository's C API header, not a copy.
 * (This file is bindings/swift/Sources/CMesh/shim.h.) */
#ifndef CMESH_SHIM_H
#define CMESH_SHIM_H
#include "../../../../include/mesh.h"
#endif
