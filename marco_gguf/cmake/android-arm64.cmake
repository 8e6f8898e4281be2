# llama.cpp build profile: Android phones (arm64-v8a), cross-compiled with the Android NDK.
# Set ANDROID_NDK to the NDK's folder first. ARMv8.2-A with dot product, fp16 and int8 matrix multiply
# (Snapdragon 8 Gen 1, Dimensity 9000, Tensor G2 and later: Cortex-A710/X2 and newer cores); for
# older phones (Cortex-A76/A77/A78) pass -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16.
#
#   cmake -C cmake/android-arm64.cmake -S llama.cpp -B build-android && cmake --build build-android -j
#
# gives libllama.so / libggml*.so (and llama-cli) for an app or Termux; see docs/android.md in llama.cpp.

if(NOT DEFINED ENV{ANDROID_NDK})
  message(FATAL_ERROR "android-arm64 profile: set ANDROID_NDK to the Android NDK folder")
endif()
set(CMAKE_TOOLCHAIN_FILE "$ENV{ANDROID_NDK}/build/cmake/android.toolchain.cmake" CACHE FILEPATH "Android NDK toolchain")
set(ANDROID_ABI arm64-v8a CACHE STRING "Android ABI")
set(ANDROID_PLATFORM android-28 CACHE STRING "Android API level")
set(GGML_NATIVE OFF CACHE BOOL "ggml: optimize the build for the current system")
set(GGML_CPU_ARM_ARCH "armv8.2-a+dotprod+fp16+i8mm" CACHE STRING "ggml: CPU architecture for ARM")
# the NDK ships no OpenMP runtime that CMake can find, llamafile's kernels do not support Android,
# and OpenSSL is not part of the NDK's stable API (llama.cpp's docs/android.md)
set(GGML_OPENMP OFF CACHE BOOL "ggml: use OpenMP")
set(GGML_LLAMAFILE OFF CACHE BOOL "ggml: use LLAMAFILE")
set(LLAMA_OPENSSL OFF CACHE BOOL "llama: use openssl to support HTTPS")

# llama.cpp RPC backend, for `marco-gguf rpc-server` and `--rpc HOST:PORT`
set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
