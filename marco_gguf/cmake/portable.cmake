# llama.cpp build profile: the README's default install. A library that runs on every machine of its
# kind, not only on the one that compiled it:
#   x86-64      AVX2, FMA, F16C, BMI2 (every x86-64 CPU since Intel Haswell, 2013, and AMD Zen, 2017);
#               no AVX-512 and no AMX, which crash with SIGILL on most laptops and on VMs that
#               advertise AMX without enabling it. `marco-gguf doctor` probes whether the faster
#               `cpu-avx512` profile runs here and what it gains.
#   ARM64 Linux ARMv8.2-A with dot product and FP16 (Raspberry Pi 5, Graviton, Ampere, phones) when
#               the building CPU has them, plain ARMv8-A otherwise (Raspberry Pi 4).
#   macOS       Metal on (llama-cpp-python's own default), CPU kernels for every Apple-silicon chip.
# Every platform gets llama.cpp's RPC backend (`marco-gguf rpc-server`, `--rpc HOST:PORT`).
#
#   CMAKE_ARGS="-C $PWD/cmake/portable.cmake" pip install llama-cpp-python
#   marco-gguf build-runtime --profile portable
#
# CMake initial-cache file: a -D on the command line wins over every value set here.

cmake_host_system_information(RESULT _marco_arch QUERY OS_PLATFORM)
string(TOLOWER "${_marco_arch}" _marco_arch)

if(_marco_arch MATCHES "^(x86_64|amd64|x64)$")
    include("${CMAKE_CURRENT_LIST_DIR}/cpu-avx2.cmake")
elseif(_marco_arch MATCHES "^(aarch64|arm64)$")
    set(GGML_NATIVE OFF CACHE BOOL "ggml: optimize the build for the current system")
    set(_marco_arm "armv8.2-a+dotprod+fp16")
    if(EXISTS "/proc/cpuinfo")
        file(READ "/proc/cpuinfo" _marco_cpuinfo)
        if(NOT _marco_cpuinfo MATCHES "asimddp")
            set(_marco_arm "armv8-a")
        endif()
    endif()
    set(GGML_CPU_ARM_ARCH "${_marco_arm}" CACHE STRING "ggml: CPU architecture for ARM")
endif()

set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
