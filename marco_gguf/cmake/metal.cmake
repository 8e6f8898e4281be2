# llama.cpp build profile: Apple silicon Macs (Metal GPU, Accelerate BLAS, NEON CPU kernels).
# Needs the Xcode command line tools (xcode-select --install).
#
#   CMAKE_ARGS="-C $PWD/cmake/metal.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile metal

set(GGML_METAL ON CACHE BOOL "ggml: use Metal")
# the Metal shaders compiled into the library, so no .metal file has to be found at run time
set(GGML_METAL_EMBED_LIBRARY ON CACHE BOOL "ggml: embed Metal library")
set(GGML_ACCELERATE ON CACHE BOOL "ggml: enable Accelerate framework")
set(GGML_BLAS ON CACHE BOOL "ggml: use BLAS")
set(GGML_BLAS_VENDOR "Apple" CACHE STRING "ggml: BLAS library vendor")
# an Apple GPU shares memory with the CPU; the build machine is the machine that runs it, and Apple
# silicon has no AMX-style trap, so -mcpu=native is safe here
set(GGML_NATIVE ON CACHE BOOL "ggml: optimize the build for the current system")

# llama.cpp RPC backend, for `marco-gguf rpc-server` and `--rpc HOST:PORT`
set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
