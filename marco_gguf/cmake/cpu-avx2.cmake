# llama.cpp build profile: portable x86-64 CPU (AVX2, FMA, F16C; no AVX-512, no AMX).
# Runs on every x86-64 CPU since Intel Haswell (2013) and AMD Zen (2017).
#
#   CMAKE_ARGS="-C $PWD/cmake/cpu-avx2.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile cpu-avx2
#
# These are CMake initial-cache files: set(... CACHE ...) never overwrites a value that is already
# there, so a -D on the command line wins over the profile, and a profile that includes another sets
# its own values first.

# GGML_NATIVE=ON would compile for the build machine (-march=native); on Xeons that advertise AMX it
# builds AMX kernels that crash with SIGILL where AMX is not usable (virtual machines), so never native.
set(GGML_NATIVE OFF CACHE BOOL "ggml: optimize the build for the current system")
set(GGML_SSE42 ON CACHE BOOL "ggml: enable SSE 4.2")
set(GGML_AVX ON CACHE BOOL "ggml: enable AVX")
set(GGML_AVX2 ON CACHE BOOL "ggml: enable AVX2")
set(GGML_BMI2 ON CACHE BOOL "ggml: enable BMI2")
set(GGML_FMA ON CACHE BOOL "ggml: enable FMA")
set(GGML_F16C ON CACHE BOOL "ggml: enable F16C")
set(GGML_AVX512 OFF CACHE BOOL "ggml: enable AVX512F")
set(GGML_AVX512_VBMI OFF CACHE BOOL "ggml: enable AVX512-VBMI")
set(GGML_AVX512_VNNI OFF CACHE BOOL "ggml: enable AVX512-VNNI")
set(GGML_AVX512_BF16 OFF CACHE BOOL "ggml: enable AVX512-BF16")
set(GGML_AMX_TILE OFF CACHE BOOL "ggml: enable AMX-TILE")
set(GGML_AMX_INT8 OFF CACHE BOOL "ggml: enable AMX-INT8")
set(GGML_AMX_BF16 OFF CACHE BOOL "ggml: enable AMX-BF16")
# llama.cpp RPC backend, for `marco-gguf rpc-server` and `--rpc HOST:PORT`
set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
