#!/usr/bin/env bash
# Issue 10's GPU crash (`marco-gguf bench -ngl -1` segfaulted on an H200), looked for on the CPU: llama.cpp
# built from the installed version's source with AddressSanitizer and UndefinedBehaviorSanitizer (the
# portable profile, RelWithDebInfo), laid into a copy of the llama_cpp package (bench/build_speed.py's
# package()), and `bench` run with full offload, --experts-on-cpu and --n-cpu-moe 2 on the tiny and the
# 4-layer Q4_K_M files under python -X faulthandler. Prints each run's exit code and sanitizer reports.
#   bash bench/sanitize_check.sh        (about 15 minutes on 2 cores, most of it the build)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=bench/out/llama.cpp-lib-asan
if [ ! -f "$BUILD/bin/libllama.so" ]; then
  cmake -C cmake/portable.cmake -S .cache/llama.cpp -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DLLAMA_SANITIZE_ADDRESS=ON \
    -DGGML_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON -DGGML_SANITIZE_UNDEFINED=ON >/dev/null
  nice -n 10 cmake --build "$BUILD" --target llama ggml-rpc -j2 >/dev/null
fi
PKG=$(cd bench && python -c "from build_speed import package; from pathlib import Path; print(package('asan', Path('../$BUILD/bin').resolve()))")
(cd bench && python -c "from runtime_speed import nano_file; nano_file(4)")
TINY=bench/out/tiny-Q4_K_M.gguf
if [ ! -f "$TINY" ]; then  # the demo's tiny Q4_K_M file
  marco-gguf demo --dir bench/out/demo >/dev/null
  TINY=$(ls bench/out/demo/*.gguf | head -1)
fi
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
export PYTHONPATH=$PKG LD_LIBRARY_PATH=$PKG/llama_cpp/lib MARCO_GGUF_CPU_KERNELS=portable  # the sanitized ggml-cpu
for model in "$TINY" bench/out/marco-nano-L4-Q4_K_M.gguf; do
  [ -f "$model" ] || { echo "missing $model"; continue; }
  for extra in "" "--experts-on-cpu" "--n-cpu-moe 2"; do
    set +e
    python -X faulthandler -m marco_gguf bench "$model" -ngl -1 $extra -p 32 -n 8 -r 1 --json >/dev/null 2>/tmp/sanitize_err.txt
    rc=$?
    set -e
    echo "$(basename "$model") -ngl -1 $extra: exit $rc, sanitizer reports: $(grep -c -E 'ERROR: AddressSanitizer|runtime error' /tmp/sanitize_err.txt || true)"
    grep -E "ERROR: AddressSanitizer|runtime error" /tmp/sanitize_err.txt | head -3 || true
  done
done
