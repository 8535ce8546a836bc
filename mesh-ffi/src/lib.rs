//! C ABI over mesh-core. The surface grows with mesh-core; see include/mesh.h.
