{
  "variables": {
    "have_ucx%": "<!(test \"$DYAD_BUILD_UCX\" != 0 && test -f /usr/include/ucp/api/ucp.h && echo 1 || echo 0)"
  },
  "targets": [
    {
      "target_name": "dyadfuse",
      "sources": ["src/device.cc", "src/mount.cc", "src/sender.cc", "src/receiver.cc", "src/crc32c.cc", "src/sys.cc", "src/creds.cc", "src/addon.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ],
  "conditions": [
    ["have_ucx==1", {
      "targets": [
        {
          "target_name": "dyaducx",
          "sources": ["ucx/addon.cc", "ucx/worker.cc", "ucx/endpoint.cc", "ucx/region.cc", "ucx/mover.cc", "ucx/context.cc", "src/crc32c.cc"],
          "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
          "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
          "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
          "libraries": ["<!@(pkg-config --libs ucx 2>/dev/null || echo -lucp -lucs)"]
        }
      ]
    }]
  ]
}
