# llama.cpp build profile: 64-bit ARM Linux (Raspberry Pi 5, Ampere Altra, AWS Graviton, NVIDIA
# Jetson's CPU; also Termux on an Android phone). ARMv8.2-A with the dot-product and fp16 extensions
# (Cortex-A76 / Neoverse N1 and later); for an older core (Raspberry Pi 4's Cortex-A72) pass
# -DGGML_CPU_ARM_ARCH=armv8-a, for a core with int8 matrix multiply (Graviton 3, Cortex-A710 and
# later) -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm.
#
# On an ARM machine:
#   CMAKE_ARGS="-C $PWD/cmake/linux-arm64.cmake" pip install --no-cache-dir --force-reinstall llama-cpp-python
#   marco-gguf build-runtime --profile linux-arm64
# On an x86-64 machine the profile cross-compiles llama.cpp itself with Debian's aarch64 GCC
# (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu):
#   cmake -C cmake/linux-arm64.cmake -S llama.cpp -B build-arm64 && cmake --build build-arm64 -j

set(GGML_NATIVE OFF CACHE BOOL "ggml: optimize the build for the current system")
set(GGML_CPU_ARM_ARCH "armv8.2-a+dotprod+fp16" CACHE STRING "ggml: CPU architecture for ARM")

cmake_host_system_information(RESULT _marco_host_arch QUERY OS_PLATFORM)
if(NOT _marco_host_arch MATCHES "^(aarch64|arm64|ARM64)$")
  set(CMAKE_SYSTEM_NAME Linux CACHE STRING "Target system")
  set(CMAKE_SYSTEM_PROCESSOR aarch64 CACHE STRING "Target processor")
  set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc CACHE FILEPATH "C compiler")
  set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++ CACHE FILEPATH "C++ compiler")
endif()

# llama.cpp RPC backend, for `marco-gguf rpc-server` and `--rpc HOST:PORT`
set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
