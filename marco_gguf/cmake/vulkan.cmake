# llama.cpp build profile: any GPU with a Vulkan 1.2 driver (AMD, Intel, NVIDIA, Qualcomm Adreno).
# Needs the Vulkan headers, loader and the glslc shader compiler at build time
# (Debian/Ubuntu: libvulkan-dev glslc; elsewhere the LunarG Vulkan SDK).
# CPU part: the portable AVX2 build on x86-64 (ignored on other CPUs).
#
#   CMAKE_ARGS="-C $PWD/cmake/vulkan.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile vulkan

set(GGML_VULKAN ON CACHE BOOL "ggml: use Vulkan")
include("${CMAKE_CURRENT_LIST_DIR}/cpu-avx2.cmake")
