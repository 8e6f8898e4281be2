# llama.cpp build profile: the default x86-64 CPU build (AVX2, FMA, F16C and AVX-512F; no AMX).
# The same build as the README's install command
# (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON").
# Needs a CPU with AVX-512 (Intel Skylake-SP and later Xeons, Ice Lake, AMD Zen 4); on other x86-64
# CPUs use cpu-avx2 (`marco-gguf doctor` says which).
#
#   CMAKE_ARGS="-C $PWD/cmake/cpu.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile cpu

set(GGML_AVX512 ON CACHE BOOL "ggml: enable AVX512F")
include("${CMAKE_CURRENT_LIST_DIR}/cpu-avx2.cmake")
