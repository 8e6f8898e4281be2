# llama.cpp build profile: x86-64 with AVX-512F (AVX2, FMA, F16C and AVX-512F; no VNNI/BF16, no AMX).
# Needs a CPU with AVX-512 (Intel Skylake-SP and later Xeons, Ice Lake, AMD Zen 4); it dies with
# SIGILL on every AVX2-only CPU, which is most laptops: the README installs `portable` instead, and
# `marco-gguf doctor` says whether this profile runs here and what it gains.
#
#   CMAKE_ARGS="-C $PWD/cmake/cpu.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile cpu

set(GGML_AVX512 ON CACHE BOOL "ggml: enable AVX512F")
include("${CMAKE_CURRENT_LIST_DIR}/cpu-avx2.cmake")
