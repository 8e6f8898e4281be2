# llama.cpp build profile: x86-64 CPU with the AVX-512 extensions llama.cpp uses (VNNI, BF16, VBMI);
# still no AMX. Intel Sapphire Rapids / Ice Lake Xeons, AMD Zen 4 and Zen 5.
#
#   CMAKE_ARGS="-C $PWD/cmake/cpu-avx512.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile cpu-avx512

set(GGML_AVX512_VBMI ON CACHE BOOL "ggml: enable AVX512-VBMI")
set(GGML_AVX512_VNNI ON CACHE BOOL "ggml: enable AVX512-VNNI")
set(GGML_AVX512_BF16 ON CACHE BOOL "ggml: enable AVX512-BF16")
include("${CMAKE_CURRENT_LIST_DIR}/cpu.cmake")
