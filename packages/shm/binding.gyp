{
  "targets": [{
    "target_name": "virtmesh_shm",
    "sources": ["native/shm.cc"],
    "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
    "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions"],
    "cflags_cc": ["-O2", "-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    "libraries": ["-lpthread"]
  }]
}
