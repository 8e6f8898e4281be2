#!/usr/bin/env bash
# The nearest thing to a phone on an x86-64 machine: cross-compile llama.cpp for 64-bit ARM Linux with
# cmake/linux-arm64.cmake, run greedy decoding of a tiny converted Marco Q4_K_M GGUF under qemu-aarch64
# emulation, and compare the tokens with the x86-64 runtime's (the installed llama-cpp-python's libllama).
#
#   apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user   # once
#   bash bench/arm64_check.sh                                              # ~20 min on 2 cores, mostly the build
#
# Too slow for CI; the result goes to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
SRC=.cache/llama.cpp
ARM=$OUT/llama.cpp-arm64
N=${N_TOKENS:-32}
PROMPT=${PROMPT:-"Marco läuft auf Telefonen. Marco chạy trên điện thoại. মার্কো ফোনে চলে। Marco runs on phones:"}
mkdir -p "$OUT"

if [ ! -f "$ARM/bin/libllama.so" ]; then
  cmake -C cmake/linux-arm64.cmake -S "$SRC" -B "$ARM" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_OPENSSL=OFF
  time nice -n 10 cmake --build "$ARM" --target llama -j2
fi
X86_LIB=$(python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
INC="-I$SRC/include -I$SRC/ggml/include"
aarch64-linux-gnu-gcc -O2 $INC bench/greedy.c -L"$ARM/bin" -Wl,-rpath-link,"$ARM/bin" -lllama -o "$OUT/greedy-arm64"
gcc -O2 $INC bench/greedy.c -L"$X86_LIB" -Wl,-rpath-link,"$X86_LIB" -lllama -o "$OUT/greedy-x86"

MODEL=$OUT/tiny-Q4_K_M.gguf
[ -f "$MODEL" ] || python - "$MODEL" <<'PY'
import sys, tempfile
from pathlib import Path
from marco_gguf.convert import convert
from marco_gguf.demo import write_tiny_checkpoint
from marco_gguf.quantize.recipe import preset
with tempfile.TemporaryDirectory() as tmp:
    convert(write_tiny_checkpoint(Path(tmp) / "tiny"), Path(sys.argv[1]), preset("Q4_K_M"), progress=False)
PY

LD_LIBRARY_PATH=$X86_LIB "$OUT/greedy-x86" "$MODEL" "$PROMPT" "$N" > "$OUT/greedy-x86.txt"
file "$OUT/greedy-arm64" "$ARM/bin/libggml-cpu.so" | sed 's/, BuildID.*//'
/usr/bin/time -f "qemu-aarch64: %e s" qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH="$ARM/bin" \
  "$OUT/greedy-arm64" "$MODEL" "$PROMPT" "$N" > "$OUT/greedy-arm64.txt"
python - "$OUT/greedy-x86.txt" "$OUT/greedy-arm64.txt" <<'PY'
import sys
x86, arm = (open(p).read().split("\n") for p in sys.argv[1:])
assert x86[0] == arm[0], f"prompt tokens differ:\n{x86[0]}\n{arm[0]}"
a, b = ([line.split() for line in t[1:] if line] for t in (x86, arm))
same = sum(1 for p, q in zip(a, b) if p[0] == q[0])
first = next((i for i, (p, q) in enumerate(zip(a, b)) if p[0] != q[0]), None)
diff = max(abs(float(p[1]) - float(q[1])) for p, q in zip(a, b))
print(f"prompt: {len(x86[0].split()) - 1} tokens, identical; greedy: {same}/{len(a)} tokens identical "
      f"(first difference at {first}); largest top-1 logit difference {diff:.2e}")
sys.exit(0 if same == len(a) else 1)
PY
