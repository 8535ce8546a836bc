// swift-tools-version:5.7
// Swift bindings for the mesh-llm C API (include/mesh.h).
//
// CMesh is a system-library target: its module map includes the repository's
// include/mesh.h in place (no copy) and links libmesh_ffi. Build mesh-ffi
// first, then point the linker (and, at run time, the loader) at it:
//
//   cargo build -p mesh-ffi
//   swift build -Xlinker -L"$HOME/.cache/mesh-llm/target/debug"
//   LD_LIBRARY_PATH="$HOME/.cache/mesh-llm/target/debug" swift run ...
import PackageDescription

let package = Package(
    name: "MeshLLM",
    products: [
        .library(name: "MeshLLM", targets: ["MeshLLM"]),
    ],
    targets: [
        .systemLibrary(name: "CMesh", path: "Sources/CMesh"),
        .target(name: "MeshLLM", dependencies: ["CMesh"], path: "Sources/MeshLLM"),
    ]
)
