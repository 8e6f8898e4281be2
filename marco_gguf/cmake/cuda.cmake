# llama.cpp build profile: NVIDIA GPUs with CUDA (needs the CUDA toolkit's nvcc at build time).
# CPU part: the portable AVX2 build (experts kept on the CPU with --experts-on-cpu run there).
#
#   CMAKE_ARGS="-C $PWD/cmake/cuda.cmake -DCMAKE_CUDA_ARCHITECTURES=89" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile cuda --cuda-arch 89
#
# CMAKE_CUDA_ARCHITECTURES: the GPU's compute capability without the dot (nvidia-smi
# --query-gpu=compute_cap: 8.6 -> 86, 8.9 -> 89, 9.0 -> 90), from -D or the CUDAARCHS environment
# variable; "native" (the default) asks nvcc for the GPUs of the build machine.

set(GGML_CUDA ON CACHE BOOL "ggml: use CUDA")
if(DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES "$ENV{CUDAARCHS}" CACHE STRING "CUDA architectures")
else()
  set(CMAKE_CUDA_ARCHITECTURES "native" CACHE STRING "CUDA architectures")
endif()
include("${CMAKE_CURRENT_LIST_DIR}/cpu-avx2.cmake")
